"""Echo with logprobs (the prompt scored by infer/score.py on the engine thread), /tokenize,
/detokenize and the model card, through the official openai client where it has the call. The
engine is the fake one (tests/serve/common.py: its generated tokens and logprobs are known); the
scorer is real, on the tiny Llama 3 model, checked against log_softmax of its full forward pass."""

import asyncio
import threading

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from llama_jax import Llama
from llama_jax.infer.score import Scorer
from tests.infer.common import random_params
from tests.serve.common import MODEL, assert_error, client, post, server
from tests.serve.conftest import LLAMA3_TINY

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def params():
    return random_params(LLAMA3_TINY, 0)


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


class RecordingScorer:
    """The real scorer as the server makes one (compiling in the background), each call's prompts
    and thread recorded, and every compile on the engine thread."""

    def __init__(self, params):
        self.scorer = Scorer(LLAMA3_TINY, params, background_compile=True)
        self.calls, self.engine_compiles = [], []
        self.prepare = self.scorer.prepare

    def __call__(self, prompts, top_n):
        self.calls.append(([list(p) for p in prompts], top_n, threading.current_thread().name))
        return self.scorer(prompts, top_n)

    def on_event(self, event, duration, **kwargs):
        if event in COMPILE_EVENTS and threading.current_thread().name == "llama_jax-engine":
            self.engine_compiles.append((event, kwargs.get("fun_name")))


@pytest.fixture(scope="module")
def scorer(params):
    recording = RecordingScorer(params)
    jax.monitoring.register_event_duration_secs_listener(recording.on_event)
    yield recording
    jax.monitoring.unregister_event_duration_listener(recording.on_event)


def reference(params, ids):
    """log_softmax of the full forward pass [T, V], the prompt right-padded to 16 tokens (causal: the
    padding changes nothing read) so every prompt here shares one compiled forward."""
    tokens = np.zeros((1, max(16, len(ids))), np.int32)
    tokens[0, :len(ids)] = ids
    logits = jax.jit(lambda p, t: Llama(LLAMA3_TINY).apply({"params": p}, t))(params, jnp.asarray(tokens))
    return np.asarray(jax.nn.log_softmax(logits[0, :len(ids)], axis=-1))


def check_prompt_logprobs(lp, ids, lsm, tokenizer, n):
    """The first len(ids) entries of a choice's logprobs against the reference."""
    assert lp.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], [lsm[i - 1, ids[i]] for i in range(1, len(ids))],
                               atol=1e-5, rtol=0)
    for i in range(1, len(ids)):
        best = np.argsort(-lsm[i - 1], kind="stable")[:n]
        top = lp.top_logprobs[i]
        assert list(top) == [tokenizer.decode([int(t)]) for t in best]
        np.testing.assert_allclose(list(top.values()), lsm[i - 1, best], atol=1e-5, rtol=0)


def test_echo_logprobs_with_no_new_tokens_score_the_prompt(tokenizer, params, scorer):
    ids = tokenizer.encode(PROMPT, bos=True, eos=False)
    with server(tokenizer, app_options={"scorer": scorer}) as (engine, url):
        result = client(url).completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    assert not engine.added  # no engine request: the scorer alone
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason) == (PROMPT, "length")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    check_prompt_logprobs(lp, ids, reference(params, ids), tokenizer, 1)
    # Offsets index the echoed text; the BOS token the encoding added is not in it.
    pieces = [tokenizer.decode([t]) for t in ids[1:]]
    assert lp.text_offset == [0] + [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    assert scorer.calls[-1][2] == "llama_jax-engine"


def test_echo_alone_streamed_and_without_logprobs(tokenizer, scorer):
    with server(tokenizer, app_options={"scorer": scorer}) as (engine, url):
        api = client(url)
        chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0,
                                             stream=True, stream_options={"include_usage": True}))
        whole = api.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0)
        plain = api.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0)
    assert not engine.added
    first, usage = chunks
    assert (first.choices[0].text, first.choices[0].finish_reason) == (PROMPT, "length")
    assert first.choices[0].logprobs == whole.choices[0].logprobs
    assert whole.choices[0].logprobs.top_logprobs[1:] == [{}] * (len(whole.choices[0].logprobs.tokens) - 1)
    assert usage.choices == [] and usage.usage == whole.usage
    assert (plain.choices[0].text, plain.choices[0].logprobs) == (PROMPT, None)


def test_echo_logprobs_then_generated_tokens(tokenizer, params, scorer):
    ids = tokenizer.encode(PROMPT, bos=False, eos=False)  # a token prompt, without BOS
    with server(tokenizer, app_options={"scorer": scorer}, reply="a b c d") as (engine, url):
        api = client(url)
        whole = api.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=2, max_tokens=3)
        chunks = list(api.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=2, max_tokens=3,
                                             stream=True))
    choice = whole.choices[0]
    assert (choice.text, choice.finish_reason) == (PROMPT + "a b c", "length")
    lp = choice.logprobs
    check_prompt_logprobs(lp, ids, reference(params, ids), tokenizer, 2)
    assert lp.tokens[len(ids):] == ["a", " b", " c"]
    assert lp.token_logprobs[len(ids):] == pytest.approx([-0.1, -0.2, -0.3])  # the fake engine's
    assert lp.text_offset[len(ids):] == [len(PROMPT), len(PROMPT) + 1, len(PROMPT) + 3]
    assert engine.added[0][2].logprobs == 2 and engine.added[0][2].max_tokens == 3
    # Streamed: the echo and its logprobs first, then the generated pieces.
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[0].choices[0].text == PROMPT
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [v for s in streamed for v in s.token_logprobs] == lp.token_logprobs
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_echo_logprobs_list_the_stop_token(tokenizer, scorer):
    """lm-eval reads token_logprobs[ctxlen:-1], one entry per token the model produced: the stop
    token that ended the text is listed (not in the text), as OpenAI and vLLM list it."""
    ids = tokenizer.encode(PROMPT, bos=True, eos=False)
    stop = tokenizer.stop_tokens[-1]
    with server(tokenizer, app_options={"scorer": scorer}, reply="a") as (_, url):
        scored = client(url).completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=5)
        plain = client(url).completions.create(model=MODEL, prompt=ids, logprobs=1, max_tokens=5)
    assert scored.choices[0].text == tokenizer.decode(ids) + "a" and scored.choices[0].finish_reason == "stop"
    assert scored.choices[0].logprobs.tokens[len(ids):] == ["a", tokenizer.decode([stop])]
    assert scored.choices[0].logprobs.token_logprobs[len(ids):] == pytest.approx([-0.1, -0.2])
    assert plain.choices[0].logprobs.tokens == ["a"]  # without echo: as before, the text's tokens


def test_concurrent_scores_share_one_scorer_call(tokenizer, params, scorer):
    """Scores posted while the engine steps are run together, between two steps, each getting its own."""
    prompts = ["Once upon a time", "1, 2, 3,", "Llamas are"]

    async def everything(url):
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await api.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True)
        first = await anext(aiter(stream))  # the engine is stepping now: 0.3 s a step
        results = await asyncio.gather(*[api.completions.create(model=MODEL, prompt=p, echo=True, logprobs=1,
                                                                max_tokens=0) for p in prompts])
        return first, [r async for r in stream], results

    with server(tokenizer, app_options={"scorer": scorer}, step_seconds=0.3) as (_, url):
        before = len(scorer.calls)
        _, _, results = asyncio.run(everything(url))
    calls = scorer.calls[before:]
    assert sorted(len(p) for p, _, _ in calls) == [3] and all(t == "llama_jax-engine" for *_, t in calls)
    # Their batch's program was not compiled yet: they ran one by one, none compiled on the engine thread.
    assert scorer.engine_compiles == []
    for prompt, result in zip(prompts, results):
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        check_prompt_logprobs(result.choices[0].logprobs, ids, reference(params, ids), tokenizer, 1)


def test_tokenize_and_detokenize(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    with server(tokenizer, max_seq_len=96) as (_, url):
        text = post(url, "/tokenize", {"model": MODEL, "prompt": PROMPT}).json()
        bare = post(url, "/tokenize", {"model": MODEL, "prompt": PROMPT, "add_special_tokens": False}).json()
        chat = post(url, "/tokenize", {"model": MODEL, "messages": messages}).json()
        back = post(url, "/detokenize", {"model": MODEL, "tokens": bare["tokens"]}).json()
        chat_back = post(url, "/detokenize", {"tokens": chat["tokens"]}).json()  # model is optional, as in vLLM
    ids = tokenizer.encode(PROMPT, bos=True, eos=False)
    assert text == {"tokens": ids, "count": len(ids), "max_model_len": 96}
    assert bare["tokens"] == ids[1:]
    assert chat["tokens"] == tokenizer.encode_dialog(messages) and chat["count"] == len(chat["tokens"])
    assert back == {"prompt": PROMPT}
    assert chat_back == {"prompt": tokenizer.decode(tokenizer.encode_dialog(messages))}


@pytest.mark.parametrize("path, body, status, words, param", [
    ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, ["gpt-4", MODEL], "model"),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, ["gpt-4", MODEL], "model"),
    ("/detokenize", {"model": MODEL, "tokens": [5, 128256]}, 400, ["128256", "outside the vocabulary"], "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, ["-1", "outside the vocabulary"], "tokens"),
    ("/detokenize", {"model": MODEL}, 400, ["Field required"], "tokens"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400,
     ["prompt or messages, not both"], "messages"),
    ("/tokenize", {"model": MODEL}, 400, ["pass prompt", "or messages"], None),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "add_special_tokens": True}, 400,
     ["add_special_tokens must be false with messages"], "add_special_tokens"),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False},
     400, ["add_generation_prompt"], "add_generation_prompt"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "return_token_strs": True}, 400, ["unknown or unsupported"],
     "return_token_strs"),
])
def test_tokenize_errors_name_the_field(tokenizer, path, body, status, words, param):
    with server(tokenizer) as (_, url):
        assert_error(post(url, path, body), status, *words, param=param)


def test_the_key_guards_tokenize_too(tokenizer):
    with server(tokenizer, api_key="secret") as (_, url):
        assert_error(post(url, "/tokenize", {"prompt": "x"}), 401, "API key")
        assert post(url, "/tokenize", {"prompt": "x"}, Authorization="Bearer secret").status_code == 200


def test_echo_logprobs_errors(tokenizer, scorer):
    with server(tokenizer, app_options={"scorer": scorer}, max_seq_len=8) as (engine, url):
        assert_error(post(url, "/v1/completions", {"model": MODEL, "prompt": list(range(1, 10)), "echo": True,
                                                   "logprobs": 1, "max_tokens": 0}), 400, "9 tokens", "context of 8",
                     param="prompt")
        assert_error(post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}), 400,
                     "max_tokens 0 needs echo")
    assert not engine.added


def test_model_card_lists_what_the_server_supports(tokenizer, scorer):
    with server(tokenizer, max_seq_len=96) as (_, url):
        fake, = client(url).models.list().data
    with server(tokenizer, max_seq_len=96, app_options={"scorer": scorer}) as (_, url):
        card, = client(url).models.list().data
    assert (card.id, card.object, card.owned_by, card.max_model_len) == (MODEL, "model", "llama_jax", 96)
    assert "echo_logprobs" in card.features and "echo_logprobs" not in fake.features
    assert card.max_logprobs == 20
    assert {"echo", "logprobs", "max_tokens", "top_k"} <= set(card.parameters["/v1/completions"])
    assert {"logit_bias", "presence_penalty", "min_tokens"} <= set(card.parameters["/v1/completions"])
    assert "best_of" not in card.parameters["/v1/completions"]  # a no-op only
    assert card.parameters["/detokenize"] == ["model", "tokens"]
