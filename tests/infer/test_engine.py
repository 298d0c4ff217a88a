"""stream_tokens (on the continuous-batching engine) against a cache-free reference: greedy tokens,
batching of unequal prompts, seeds, stop tokens and limits, compile counts, buffer donation and the
engine's per-layer layout."""

import collections
import dataclasses

import jax
import jax.monitoring
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.infer.engine import BatchingEngine, prefill_shapes
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.weights import DecodeParams, decode_params
from llama_jax.infer.tokens import PromptTooLongError, check_prompts, stream_tokens
from llama_jax.infer.sampling import SamplingParams
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


def test_no_prompt_length_budget_seed_or_stop_set_compiles_anything_new():
    # A config of its own, so nothing compiled by other tests is reused.
    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), norm_eps=2e-5)
    params = random_params(cfg)
    _compiles.clear()
    # 2 rows, a 128-token context, prompts in the 32 bucket: one decode step, and prefill chunks of
    # 32 or 64 tokens as 1 or 2 rows: 5 programs at most, however many lengths, budgets, seeds and
    # stop sets the calls bring.
    run(cfg, params, [[1, 2, 3, 4, 5], [1] * 9], max_new_tokens=80)
    first = _compiles["jit(model_step)"]
    assert first >= 2, _compiles  # the decode step and a prefill chunk
    _compiles.clear()
    lengths = [3, 30, 7, 12, 20, 31, 2, 16, 25, 4]
    for call, budget in enumerate([60, 70, 90, 65]):
        prompts = [[1] + [7 + call] * (n - 1) for n in lengths[call * 2:call * 2 + 4]]
        run(cfg, params, prompts, max_new_tokens=budget, seed=call, stop_ids=(5, 6 + call), sampling=SAMPLED)
    assert set(_compiles) <= {"jit(model_step)"} and first + _compiles["jit(model_step)"] <= 5, _compiles


def test_steps_update_the_pages_in_place(tiny):
    """The engine's step donates each layer's pages: the old buffers are gone, not copied."""
    cfg, params = tiny
    engine = BatchingEngine(cfg, params, max_batch=2, max_seq_len=32, page_size=16,
                            chunk_shapes=prefill_shapes(32, max_rows=2))
    engine.add("a", PROMPTS[1], RequestParams(4, temperature=0.0))
    for _ in range(2):  # the prefill, then a decode step
        before = engine.pages
        assert engine.step()
        assert all(a.is_deleted() for layer in before for a in layer)
        assert not any(a.is_deleted() for layer in engine.pages for a in layer)


def test_prepared_per_layer_params_decode_the_same_tokens(tiny):
    """prepare: the engine's layout (a buffer per layer) holds each layer's slice of the stacked
    weights, generates what the model's params do, and with donate frees the stacked weights."""
    cfg, params = tiny
    _, split = decode_params(cfg, params)
    assert isinstance(split, DecodeParams) and len(split.layers) == cfg.n_layers
    np.testing.assert_array_equal(split.layers[1]["feed_forward"]["w2"], params["layers"]["feed_forward"]["w2"][1])
    assert split.output is params["output"] and split.norm is params["norm"]
    assert decode_params(cfg, split)[1] is split
    assert run(cfg, split, sampling=SAMPLED, seed=2) == run(cfg, params, sampling=SAMPLED, seed=2)

    copy = jax.tree.map(lambda x: x.copy(), params)
    _, donated = decode_params(cfg, copy, donate=True)
    jax.tree.map(np.testing.assert_array_equal, donated, split)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(copy["layers"]))
    assert not copy["norm"]["scale"].is_deleted()
