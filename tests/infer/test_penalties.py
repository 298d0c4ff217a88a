"""The engine's penalties, logit_bias and min_tokens against the model's full forward pass: at every
step, the engine's greedy token is the argmax of the full forward's logits adjusted by a plain numpy
implementation of each formula (OpenAI's presence / frequency penalties and logit_bias, vLLM's
repetition_penalty and min_tokens), over the tokens generated so far."""

import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.penalties import pack_terms, padded_length, row_terms
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.sampling import SamplingParams
from llama_jax.infer.text import generate
from llama_jax.infer.tokens import stream_tokens
from tests.infer.common import _forward, collect, run_cli

PROMPT = [1, 7, 9, 30, 31, 32, 33, 40, 41, 7, 9]
STEPS = 12


@pytest.fixture(scope="module")
def engine(tiny):
    cfg, params = tiny
    return BatchingEngine(cfg, params, max_batch=4, max_seq_len=64, page_size=8, decode_batches=[4],
                          chunk_shapes=[(1, 32)])


def adjusted(logits, params: RequestParams, prompt, generated):
    """The formulas, in the documented order, on one row of raw logits (float64)."""
    x = logits.astype(np.float64).copy()
    r = params.repetition_penalty
    seen = np.unique(np.asarray(prompt + generated))
    x[seen] = np.where(x[seen] > 0, x[seen] / r, x[seen] * r)
    counts = np.bincount(np.asarray(generated, np.int64), minlength=x.size)
    x -= params.presence_penalty * (counts > 0) + params.frequency_penalty * counts
    for token, bias in params.logit_bias:
        x[token] += bias
    if len(generated) < params.min_tokens:
        x[list(params.stop_token_ids)] = -np.inf
    return x


def reference(tiny, prompt, params: RequestParams):
    """(tokens, finish reason) of greedy decoding on the full forward's adjusted logits."""
    cfg, model_params = tiny
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :len(prompt)] = prompt
    generated = []
    while len(generated) < params.max_tokens:
        t = len(prompt) + len(generated)
        logits = np.asarray(_forward(model_params, jnp.asarray(tokens), cfg))[0, t - 1]
        token = int(np.argmax(adjusted(logits, params, prompt, generated)))
        generated.append(token)
        tokens[0, t] = token
        if token in params.stop_token_ids:
            return generated, "stop"
    return generated, "length"


def run(engine, requests):
    """{request id: (tokens, finish reason)} of requests {id: (prompt, RequestParams)} run together."""
    for request_id, (prompt, params) in requests.items():
        engine.add(request_id, prompt, params)
    out = {}
    while engine.has_work():
        for o in engine.step():
            tokens, _ = out.get(o.request_id, ([], None))
            out[o.request_id] = (tokens + [o.token_id], o.finish_reason)
    return out


def greedy(**penalties):
    return RequestParams(STEPS, temperature=0.0, **penalties)


@pytest.mark.parametrize("penalties", [
    dict(presence_penalty=2.0), dict(presence_penalty=-2.0), dict(frequency_penalty=0.15),
    dict(frequency_penalty=-0.3, presence_penalty=0.2), dict(repetition_penalty=3.0), dict(repetition_penalty=0.2),
    dict(logit_bias={50: -0.3, 61: 0.25, 7: 0.2}), dict(repetition_penalty=1.5, frequency_penalty=0.1,
                                                      logit_bias=((9, 0.3),)),
], ids=lambda p: ",".join(p))
def test_the_greedy_tokens_follow_the_adjusted_full_forward_logits(tiny, engine, penalties):
    params = greedy(**penalties)
    want = reference(tiny, PROMPT, params)
    plain = reference(tiny, PROMPT, greedy())
    assert want != plain  # the setting changes what greedy decoding picks: the test can fail
    # Beside a plain request in the same steps, which the other's penalties must not touch.
    out = run(engine, {"penalized": (PROMPT, params), "plain": (PROMPT, greedy())})
    assert out["penalized"] == want
    assert out["plain"] == plain


def test_a_bias_of_100_forces_a_token_and_minus_100_bans_one(tiny, engine):
    plain, _ = reference(tiny, PROMPT, greedy())
    forced = run(engine, {"forced": (PROMPT, greedy(logit_bias={300: 100}))})["forced"]
    assert forced == ([300] * STEPS, "length")
    # Banning the first greedy token changes the first token, and the ban holds at every step.
    banned = greedy(logit_bias={plain[0]: -100, plain[2]: -100})
    out, _ = run(engine, {"banned": (PROMPT, banned)})["banned"]
    assert out[0] != plain[0] and plain[0] not in out and plain[2] not in out
    assert (out, "length") == reference(tiny, PROMPT, banned)


def test_min_tokens_keeps_a_stop_token_from_ending_the_request(tiny, engine):
    plain, _ = reference(tiny, PROMPT, greedy())
    stop = plain[1]  # greedy picks it second: without min_tokens the request stops there
    early = run(engine, {"early": (PROMPT, greedy(stop_token_ids=(stop,)))})["early"]
    assert early == (plain[:2], "stop")
    params = greedy(stop_token_ids=(stop,), min_tokens=5)
    want = reference(tiny, PROMPT, params)
    assert len(want[0]) >= 5 and stop not in want[0][:5]
    assert run(engine, {"late": (PROMPT, params)})["late"] == want


def test_sampled_rows_never_draw_a_banned_token(tiny, engine):
    plain, _ = reference(tiny, PROMPT, greedy())
    banned = {t: -100 for t in plain[:4]}
    requests = {f"s{i}": (PROMPT, RequestParams(8, temperature=0.05, seed=i, logit_bias=banned)) for i in range(3)}
    for tokens, _ in run(engine, requests).values():
        assert not set(tokens) & set(banned)
    # At that temperature, the same requests without the bias draw the banned (greedy) tokens.
    unbiased = {f"u{i}": (PROMPT, RequestParams(8, temperature=0.05, seed=i)) for i in range(3)}
    assert any(set(tokens) & set(banned) for tokens, _ in run(engine, unbiased).values())


def test_generate_s_sampling_params_carry_the_penalties(tiny):
    cfg, params = tiny
    sampling = SamplingParams(temperature=0.0, presence_penalty=2.0, logit_bias={61: 0.25})
    out = collect(stream_tokens(cfg, params, [PROMPT], max_new_tokens=STEPS, sampling=sampling))
    want, _ = reference(tiny, PROMPT, greedy(presence_penalty=2.0, logit_bias={61: 0.25}))
    assert out[0] == (want, "length")


def test_the_row_lists_are_distinct_tokens_padded_to_powers_of_two():
    params = RequestParams(9, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                           logit_bias={5: 1.0, 11: -2.0}, min_tokens=3, stop_token_ids=(2,))
    terms = row_terms(params, np.array([5, 6]), {6: 2, 9: 1}, generated=3)
    got = {t: (b, p) for t, b, p in zip(*terms)}
    assert got == {5: (1.0, True), 6: (-1.0, True), 9: (-0.75, True), 11: (-2.0, False)}
    early = dict(zip(row_terms(params, None, {}, generated=2).ids, row_terms(params, None, {}, 2).bias))
    assert early[2] == -np.inf
    assert [padded_length(n) for n in (0, 3, 16, 17, 100)] == [16, 16, 16, 32, 128]
    ids, bias, penalized, repetition = pack_terms([terms, None], [2.0, 1.0], L=4)
    assert ids.shape == (4, 16) and (ids[1:] == -1).all() and repetition.tolist() == [2.0, 1.0, 1.0, 1.0]
    assert pack_terms([None, row_terms(RequestParams(3), None, {}, 0)], [1.0, 1.0], 2) == (None,) * 4


@pytest.mark.parametrize("bad, message", [
    (dict(presence_penalty=2.5), "presence_penalty must be in"), (dict(frequency_penalty=float("nan")), "frequency"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"), (dict(logit_bias={3: 101}), "logit_bias values"),
    (dict(logit_bias={-1: 1}), "logit_bias keys"), (dict(logit_bias={"x": 1}), "logit_bias keys"),
    (dict(min_tokens=13), "min_tokens must be"), (dict(min_tokens=-1), "min_tokens must be"), (dict(n=0), "n must be"),
])
def test_bad_settings_are_one_line_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        RequestParams(12, **bad)


def test_a_bias_outside_the_vocabulary_is_refused_by_the_engine(engine):
    with pytest.raises(ValueError, match="logit_bias token id 512 is outside the vocabulary"):
        engine.add("x", PROMPT, RequestParams(3, logit_bias={512: 1.0}))
    assert RequestParams(3, logit_bias={"7": 1}).logit_bias == ((7, 1.0),)  # JSON's string keys


def test_the_cli_s_penalty_flags_reach_the_engine(capsys, checkpoint_dir, llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    flags = ["--temperature", "0", "--max-new-tokens", "8", "--presence-penalty", "-2", "--repetition-penalty", "0.05"]
    status, out, _ = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "the the the", *flags)
    want = generate(cfg, params, tokenizer, ["the the the"], max_new_tokens=8, temperature=0.0,
                    presence_penalty=-2.0, repetition_penalty=0.05).texts[0]
    plain = generate(cfg, params, tokenizer, ["the the the"], max_new_tokens=8, temperature=0.0).texts[0]
    assert status == 0 and out == want + "\n" and want != plain


@pytest.mark.parametrize("flag, value, message", [
    ("--presence-penalty", 3, "presence_penalty must be in [-2, 2], got 3.0"),
    ("--repetition-penalty", 0, "repetition_penalty must be > 0 (1 is off), got 0.0"),
    ("--min-tokens", -1, "min_tokens must be an integer in [0, max_tokens=1], got -1"),
])
def test_a_bad_penalty_flag_is_one_line_before_the_model_loads(capsys, tmp_path, flag, value, message):
    status, out, err = run_cli(capsys, "--checkpoint", tmp_path, "--prompt", "hi", flag, value)
    assert (status, out, err) == (1, "", f"error: {message}\n")
