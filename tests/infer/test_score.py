"""Prompt logprobs (infer/score.py) against log_softmax of the model's full forward pass."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama
from llama_jax.infer.requests import MAX_LOGPROBS
from llama_jax.infer.score import Scorer, prompt_logprobs


@pytest.fixture(scope="module")
def scorer(tiny):
    cfg, params = tiny
    return Scorer(cfg, params)


def reference(cfg, params, prompt):
    """log_softmax of Llama(cfg).apply over the prompt alone: [T, V]."""
    logits = Llama(cfg).apply({"params": params}, jnp.asarray([prompt], jnp.int32))[0]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_logprobs_and_top_equal_the_full_forward_pass(tiny, scorer):
    cfg, params = tiny
    prompt, = prompts_of([21], cfg.vocab_size)
    scored, = scorer([prompt], top_n=5)
    lsm = reference(cfg, params, prompt)
    assert scored.logprobs[0] is None and scored.top[0] is None
    expected = [lsm[i - 1, prompt[i]] for i in range(1, len(prompt))]
    np.testing.assert_allclose(scored.logprobs[1:], expected, atol=1e-5, rtol=0)
    for i in range(1, len(prompt)):
        want = np.argsort(-lsm[i - 1], kind="stable")[:5]
        ids, lps = zip(*scored.top[i])
        assert list(ids) == want.tolist()
        np.testing.assert_allclose(lps, lsm[i - 1, want], atol=1e-5, rtol=0)


def test_prompts_scored_together_equal_each_alone(tiny, scorer):
    cfg, _ = tiny
    prompts = prompts_of([3, 40, 1, 17, 9], cfg.vocab_size, seed=1)  # two padded lengths, one-token prompt
    together = scorer(prompts, top_n=2)
    for prompt, scored in zip(prompts, together):
        alone, = scorer([prompt], top_n=2)
        assert len(scored.logprobs) == len(prompt) == len(scored.top)
        np.testing.assert_allclose(np.array(scored.logprobs[1:], float), np.array(alone.logprobs[1:], float),
                                   atol=1e-5, rtol=0)
        assert [[i for i, _ in t] for t in scored.top[1:]] == [[i for i, _ in t] for t in alone.top[1:]]
    assert together[2].logprobs == [None] and together[2].top == [None]


def test_calls_are_split_by_max_batch_tokens(tiny):
    cfg, params = tiny
    prompts = prompts_of([30, 5, 12], cfg.vocab_size, seed=2)
    small = Scorer(cfg, params, max_batch_tokens=32)  # the 30-token prompt fills a call alone
    assert small._groups([len(p) for p in prompts]) == [[0], [2, 1]]
    np.testing.assert_allclose(np.array(small(prompts)[1].logprobs[1:], float),
                               np.array(prompt_logprobs(cfg, params, [prompts[1]])[0].logprobs[1:], float),
                               atol=1e-5, rtol=0)


def test_top_n_zero_reports_no_alternatives(tiny, scorer):
    cfg, _ = tiny
    scored, = scorer(prompts_of([4], cfg.vocab_size), top_n=0)
    assert scored.top == [None, (), (), ()]


@pytest.mark.parametrize("prompts, top_n, words", [
    ([[]], 0, "empty"),
    ([[1, 512]], 0, "512"),
    ([[1] * 257], 0, "context of 256"),
    ([[1, 2]], MAX_LOGPROBS + 1, "top_n"),
])
def test_bad_input_is_one_value_error(scorer, prompts, top_n, words):
    with pytest.raises(ValueError, match=words):
        scorer(prompts, top_n=top_n)


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


@pytest.fixture
def compiles_here():
    """The compile events on this thread while the test runs."""
    here, events = threading.get_ident(), []

    def on_event(event, duration, **kwargs):
        if event in COMPILE_EVENTS and threading.get_ident() == here:
            events.append((event, kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    yield events
    jax.monitoring.unregister_event_duration_listener(on_event)


def test_background_compile_keeps_calls_compile_free(tiny, compiles_here):
    """A server's scorer: `prepare` compiles a prompt's own program beforehand; a batch whose
    program is not ready runs prompt by prompt while a worker compiles it, then runs batched."""
    cfg, params = tiny
    scorer = Scorer(cfg, params, background_compile=True)
    prompts = prompts_of([5, 9, 12], cfg.vocab_size, seed=3)
    alone = [prompt_logprobs(cfg, params, [p], top_n=1)[0] for p in prompts]
    scorer.prepare([len(p) for p in prompts])  # one program: (1 row, 16 tokens)
    compiles_here.clear()
    first = scorer(prompts, top_n=1)
    assert compiles_here == []
    deadline = time.monotonic() + 120
    while not scorer._ready((4, 16)):  # the worker's compile of the batch of three (padded to four rows)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = scorer(prompts, top_n=1)
    assert compiles_here == []
    for a, b, c in zip(alone, first, second):
        np.testing.assert_allclose(np.array(b.logprobs[1:], float), np.array(a.logprobs[1:], float), atol=1e-5)
        np.testing.assert_allclose(np.array(c.logprobs[1:], float), np.array(a.logprobs[1:], float), atol=1e-5)
        assert b.top == c.top or all(x[0][0] == y[0][0] for x, y in zip(b.top[1:], c.top[1:]))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")
def test_sharded_weights_score_as_one_device(tiny):
    """On a dp2 x tp4 mesh (the engine's weights placed as the rules say): rows padded to the batch
    split, the same scores."""
    from llama_jax.sharding import make_mesh

    cfg, params = tiny
    prompts = prompts_of([7, 3, 11], cfg.vocab_size, seed=4)
    sharded = Scorer(cfg, jax.device_get(params), mesh=make_mesh("dp2,tp4"))(prompts, top_n=3)
    for prompt, scored, alone in zip(prompts, sharded, prompt_logprobs(cfg, params, prompts, top_n=3)):
        np.testing.assert_allclose(np.array(scored.logprobs[1:], float), np.array(alone.logprobs[1:], float),
                                   atol=1e-5, rtol=0)
        assert [[i for i, _ in t] for t in scored.top[1:]] == [[i for i, _ in t] for t in alone.top[1:]]
