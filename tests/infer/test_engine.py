"""The engine against a cache-free reference: greedy tokens, batching of unequal prompts, seeds,
stop tokens and limits, compile counts and buffer donation."""

import collections
import dataclasses

import jax
import jax.monitoring
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.infer import engine
from llama_jax.infer.engine import PromptTooLongError, SamplingParams, check_prompts, stream_tokens
from tests.infer.common import collect, greedy_reference, random_params

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.95)
# Unequal lengths, all in the first (32-token) prefill bucket.
PROMPTS = [[1, 7, 9], [1] + list(range(30, 40)), [1] + list(range(100, 120))]

_compiles = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: _compiles.update([kw.get("fun_name", "?")])
    if event == "/jax/core/compile/backend_compile_duration" else None)


# Tests share one token budget and prompt set where they can, so they share compiled programs.
def run(cfg, params, prompts=PROMPTS, **kw):
    kw = dict(max_new_tokens=10, sampling=GREEDY, stop_ids=(), batch_size=2) | kw
    return collect(stream_tokens(cfg, params, prompts, **kw))


@pytest.mark.parametrize("preset", ["tiny", "tiny-3.2"])
def test_greedy_with_cache_equals_argmax_of_full_forward(preset, tiny):
    # tiny-3.2: tied embeddings, 4 kv heads, scaled rope. Batches of 2 prompts of unequal lengths,
    # then one prompt beside a padding row.
    cfg, params = tiny if preset == "tiny" else (LlamaConfig.preset(preset), random_params(LlamaConfig.preset(preset)))
    out = run(cfg, params)
    for i, prompt in enumerate(PROMPTS):
        assert out[i] == (greedy_reference(cfg, params, prompt, 10), "length")


def test_long_prompts_prefill_in_chunks(tiny):
    cfg, params = tiny
    # A 128-token bucket in chunks of 32: the rows' last prompt tokens lie in chunks 3, 1 and 2.
    prompts = [[1] + list(range(3, 90)), [1, 5, 6], [1] + list(range(200, 240))]
    out = run(cfg, params, prompts, prefill_chunk=32, batch_size=3)
    for i, prompt in enumerate(prompts):
        assert out[i] == (greedy_reference(cfg, params, prompt, 10), "length")


def test_batch_of_unequal_prompts_equals_each_prompt_alone(tiny):
    # Greedy: the full-forward test above already compares each batched row with its prompt alone.
    cfg, params = tiny
    together = run(cfg, params, sampling=SAMPLED, seed=5, batch_size=3)
    for i, prompt in enumerate(PROMPTS):
        # Keys follow the prompt's index, so the prompt alone sits at index i behind one-token fillers.
        alone = run(cfg, params, [[1]] * i + [prompt], sampling=SAMPLED, seed=5, batch_size=1)
        assert alone[i] == together[i]


def test_sampling_is_reproducible_with_a_seed(tiny):
    cfg, params = tiny
    first = run(cfg, params, sampling=SAMPLED, seed=11, batch_size=3)
    assert run(cfg, params, sampling=SAMPLED, seed=11, batch_size=3) == first
    assert run(cfg, params, sampling=SAMPLED, seed=12, batch_size=3) != first
    assert first != run(cfg, params, sampling=GREEDY)


def test_stop_token_ends_a_row_and_is_not_returned(tiny):
    cfg, params = tiny
    reference = greedy_reference(cfg, params, PROMPTS[1], 10)
    k = next(k for k in range(2, 10) if reference[k] not in reference[:k])
    out = run(cfg, params, stop_ids=(reference[k],))
    assert out[1] == (reference[:k], "stop")
    # The other rows run on to the limit unless they meet the same token.
    for i in (0, 2):
        tokens, reason = out[i]
        assert (reason == "stop" and reference[k] not in tokens) or (reason, len(tokens)) == ("length", 10)


def test_limits_token_count_and_context_end(tiny):
    cfg, params = tiny
    out = run(cfg, params, max_new_tokens=3)
    assert all(len(t) == 3 and r == "length" for t, r in out.values())
    assert run(cfg, params, max_new_tokens=0) == {i: ([], "length") for i in range(3)}
    near_end = [[1] + [5] * (cfg.max_seq_len - 4)]  # 3 free positions
    (tokens, reason), = run(cfg, params, near_end, max_new_tokens=50).values()
    assert (len(tokens), reason) == (3, "length")
    assert tokens == greedy_reference(cfg, params, near_end[0], 3)


def test_prompt_checks(tiny):
    cfg, params = tiny
    L = cfg.max_seq_len
    long = [1] + list(range(3, 3 + L))
    with pytest.raises(PromptTooLongError, match=f"has {L + 1} tokens.*context is {L} tokens.*at most {L - 1}"):
        check_prompts(cfg, [[1, 2], long], 8)
    assert check_prompts(cfg, [long], 8, truncate=True) == [[1] + long[-(L - 9):]]  # bos + the end: L - 8
    assert check_prompts(cfg, [list(range(1, L))], 8) == [list(range(1, L))]  # L - 1 fits without truncation
    with pytest.raises(ValueError, match="prompt 1: token id 512 is outside"):
        check_prompts(cfg, [[1], [1, 512]], 8)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        check_prompts(cfg, [[]], 8)
    with pytest.raises(ValueError, match="prefill_chunk must be a power of two, got 48"):
        run(cfg, params, prefill_chunk=48)


def test_one_decode_compile_and_prefill_per_bucket_only():
    # A config of its own, so nothing compiled by other tests is reused.
    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), norm_eps=2e-5)
    params = random_params(cfg)
    _compiles.clear()
    run(cfg, params, [[1, 2, 3, 4, 5], [1] * 9], max_new_tokens=80)  # cache: 9 + 80 -> 128 slots
    assert _compiles["jit(decode_step)"] == 1 and _compiles["jit(prefill)"] == 1
    _compiles.clear()
    # Other lengths in the same bucket, another token budget in the same cache bucket, other seed
    # and stop tokens, and a last batch with a padding row.
    run(cfg, params, [[1, 2, 3], [1] * 30, [1] * 7], max_new_tokens=60, seed=3, stop_ids=(5, 6))
    assert sum(_compiles.values()) == 0, _compiles
    # A longer prompt needs the 64-token prefill; the decode step is reused.
    run(cfg, params, [[1] * 40, [1, 2]], max_new_tokens=50)
    assert _compiles == {"jit(prefill)": 1}, _compiles


def test_decode_step_donates_its_state(tiny):
    cfg, params = tiny
    static = dict(cfg=cfg, sampling=GREEDY, mesh=None)
    # The shapes `run` uses (2 rows, 32-token bucket, 32 cache slots): no new compile.
    tokens = np.ones((2, 32), np.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    state, _ = engine.prefill_jit(params, tokens, np.array([3, 5], np.int32), np.full(2, 20, np.int32), keys,
                                  np.full(8, -1, np.int32), cache_len=32, **static)
    new_state, report = engine.decode_step_jit(params, state, **static)
    assert state.cache.k.is_deleted() and state.cache.v.is_deleted()
    assert np.asarray(report).shape == (4, 2) and not new_state.cache.k.is_deleted()


def test_prepared_per_layer_params_decode_the_same_tokens_in_place(tiny):
    """engine.prepare's layout (a buffer per layer, the cache too) generates what the stacked one
    does, and the decode step updates every layer's cache buffer in place (donated)."""
    cfg, params = tiny
    split_cfg, split = engine.prepare(cfg, params)
    assert split_cfg.per_layer_params and "layers_0" in split
    assert run(split_cfg, split, sampling=SAMPLED, seed=2) == run(cfg, params, sampling=SAMPLED, seed=2)

    static = dict(cfg=split_cfg, sampling=GREEDY, mesh=None)
    keys = jax.random.split(jax.random.key(0), 2)
    state, _ = engine.prefill_jit(split, np.ones((2, 32), np.int32), np.array([3, 5], np.int32),
                                  np.full(2, 20, np.int32), keys, np.full(8, -1, np.int32), cache_len=32, **static)
    assert isinstance(state.cache.k, tuple) and len(state.cache.k) == cfg.n_layers
    new_state, _ = engine.decode_step_jit(split, state, **static)
    assert all(k.is_deleted() for k in state.cache.k + state.cache.v)
    assert not any(k.is_deleted() for k in new_state.cache.k)
