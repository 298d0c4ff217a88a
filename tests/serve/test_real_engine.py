"""The server over the real BatchingEngine, loaded as the CLI loads it, on a tiny checkpoint with
the real Llama 3 tokenizer: what clients get equals `generate` on each prompt alone."""

import asyncio
import re
import threading
import time

import httpx
import jax
import openai
import pytest

from llama_jax import checkpoint
from llama_jax.infer.text import generate
from llama_jax.serve.__main__ import build_parser, load_engine
from llama_jax.serve.app import create_app
from tests.serve.common import live_server, wait_for

MODEL = "tiny-llama3"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
SERVER_COMPILES = []  # (event, function) of every trace, lowering or compile on the engine thread after warm-up


@pytest.fixture(scope="module")
def served(checkpoint_dir):
    args = build_parser().parse_args(["--checkpoint", str(checkpoint_dir), "--max-batch", "4", "--page-size", "8"])
    engine, tokenizer = load_engine(args)
    engine.warm_up()  # as main does: no test's timing includes a compile

    def on_event(event, duration, **kwargs):
        if event in COMPILE_EVENTS and threading.current_thread().name == "llama_jax-engine":
            SERVER_COMPILES.append((event, kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    cfg, params = checkpoint.load(checkpoint_dir)
    try:
        with live_server(create_app(engine, tokenizer, MODEL)) as url:
            yield url, tokenizer, lambda prompt, **kw: generate(cfg, params, tokenizer, [prompt], **kw), engine
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def metric(url, name) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M).group(1))


def test_concurrent_greedy_requests_equal_generate_alone(served):
    url, tokenizer, alone, _ = served
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Llamas are"]
    chats = [[{"role": "user", "content": "Name a colour."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]]

    async def completion(api, i, prompt):
        max_tokens = 12
        if i % 2:
            stream = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                  stream=True)
            chunks = [c async for c in stream]
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        result = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return result.choices[0].text, result.choices[0].finish_reason

    async def chat(api, i, messages):
        stream = await api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                   stream=True)
        chunks = [c async for c in stream]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    async def everything():
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*[completion(api, i, p) for i, p in enumerate(prompts)],
                                    *[chat(api, i, m) for i, m in enumerate(chats)])

    results = asyncio.run(everything())  # 6 requests for 4 batch slots: some wait, then join
    expected = []
    for i, prompt in enumerate(prompts):
        ref = alone(prompt, max_new_tokens=12, temperature=0)
        expected.append((ref.texts[0], ref.finish_reasons[0]))
    for i, messages in enumerate(chats):
        ref = alone(tokenizer.encode_dialog(messages), max_new_tokens=12, temperature=0)
        expected.append((ref.texts[0], ref.finish_reasons[0]))
    assert results == expected
    assert metric(url, "llama_jax_kv_pages_used") == 0  # every page came back
    assert metric(url, "llama_jax_requests_running") == 0


def test_seeded_sampling_equals_generate(served):
    url, _, alone, _ = served
    result = client(url).completions.create(model=MODEL, prompt="Tell me", max_tokens=12, temperature=0.8, top_p=1.0,
                                            seed=5)
    assert result.choices[0].text == alone("Tell me", max_new_tokens=12, temperature=0.8, top_p=1.0, seed=5).texts[0]


def test_stop_string_cuts_the_greedy_text(served):
    url, _, alone, _ = served
    text = alone("The capital of France is", max_new_tokens=16, temperature=0).texts[0]
    stop = text[5:9]
    assert text.find(stop) == 5
    result = client(url).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16,
                                            temperature=0, stop=stop)
    assert (result.choices[0].text, result.choices[0].finish_reason) == (text[:5], "stop")


def test_greedy_logprobs_are_the_top_choice(served):
    url, _, _, _ = served
    result = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert len(content) == 6
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert (token.token, token.logprob) == (token.top_logprobs[0].token, pytest.approx(token.top_logprobs[0].logprob))
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob


def test_too_long_is_400_naming_both_numbers(served):
    url, _, _, _ = served
    with pytest.raises(openai.BadRequestError, match=r"60 tokens.*max_tokens 10.*64"):
        client(url).completions.create(model=MODEL, prompt=list(range(1, 61)), max_tokens=10)


def test_disconnect_frees_the_pages(served, monkeypatch):
    url, _, _, engine = served
    step = engine.step
    # Slow enough to leave mid-way: 50 tokens take at least 5 s. The waits below are generous, as a
    # loaded CI host can stall the server's thread for seconds (it once missed a 10 s one).
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.1), step())[1])
    generated = metric(url, "llama_jax_generation_tokens_total")
    body = {"model": MODEL, "prompt": "Count to a hundred:", "max_tokens": 50, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")
        wait_for(lambda: metric(url, "llama_jax_kv_pages_used") > 0, timeout=30)  # the gauge follows each step
    wait_for(lambda: metric(url, "llama_jax_kv_pages_used") == 0, timeout=30)
    assert metric(url, "llama_jax_generation_tokens_total") - generated < 50  # aborted, not run to its end


def test_usage_counts_prompt_tokens_served_from_the_prefix_cache(served):
    url, tokenizer, _, _ = served
    messages = [{"role": "system", "content": "You are a helpful assistant who answers in one line."},
                {"role": "user", "content": "Hi"}]
    first, second = (client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
                     for _ in range(2))
    prompt_len = len(tokenizer.encode_dialog(messages))
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == prompt_len
    # Pages of 8 tokens: the second request finds every full page of the first's prompt (all but
    # the last token is looked up, so the last position is always prefilled).
    assert second.usage.prompt_tokens_details.cached_tokens == (prompt_len - 1) // 8 * 8 > 0


def test_no_request_compiles_after_warm_up(served):
    """warm_up compiles the very programs requests run (shapes, dtypes, input shardings), so no
    request waits on a compile; the first request used to compile one more (its pages were
    committed to the device, warm-up's were not). Last in this file: it checks every request above
    too, and runs a mix of its own (each decode batch, with and without a prefill chunk)."""
    url, _, _, _ = served

    async def mix():
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await api.completions.create(model=MODEL, prompt="Hello", max_tokens=3)  # alone: a batch of 1
        await asyncio.gather(*[api.completions.create(model=MODEL, prompt=list(range(1, 10 + 9 * i)), max_tokens=4,
                                                      logprobs=2, temperature=0.5, seed=i) for i in range(4)])

    asyncio.run(mix())
    assert SERVER_COMPILES == []
