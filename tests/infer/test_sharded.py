"""Sharded generation on 8 fake CPU devices equals single-device generation."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import LlamaConfig
from llama_jax.infer import engine
from llama_jax.infer.engine import SamplingParams, param_shardings, stream_tokens
from llama_jax.infer.quantize import quantize_params
from llama_jax.sharding import axes, logical_to_sharding, make_mesh
from tests.infer.common import collect, random_params

# 8 kv heads and 16 query heads, so tp8 really splits the cache's kv heads.
CFG = dataclasses.replace(LlamaConfig.preset("tiny"), n_heads=16, n_kv_heads=8, dim=128)
PROMPTS = [[1, 7, 9], [1] + list(range(30, 40)), [1, 4], [1] + list(range(200, 212))]
SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.95)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, 3)


def place(cfg, params, mesh):
    # From host memory: resharding device arrays would compile a slicing program per shape.
    return jax.device_put(jax.device_get(params), param_shardings(cfg, mesh, params))


def generate(cfg, params, mesh=None, sampling=SAMPLED):
    if mesh is not None:
        params = place(cfg, params, mesh)
    return collect(stream_tokens(cfg, params, PROMPTS, max_new_tokens=8, sampling=sampling, seed=1, mesh=mesh))


def sharded_prefill(cfg, placed, mesh):
    """The DecodeState after a prefill of 4 rows, inputs placed as the engine places them (the
    shapes `generate` used, so the compiled prefill is reused)."""
    rows = logical_to_sharding((axes.CACHE_BATCH,), mesh, (4,))
    tokens = jax.device_put(np.ones((4, 32), np.int32), logical_to_sharding((axes.CACHE_BATCH, None), mesh, (4, 32)))
    lengths = jax.device_put(np.full(4, 3, np.int32), rows)
    keys = jax.device_put(jax.random.split(jax.random.key(0), 4), rows)
    state, _ = engine.prefill_jit(placed, tokens, lengths, lengths + 4, keys, np.full(8, -1, np.int32),
                                  cfg=cfg, sampling=SAMPLED, cache_len=32, mesh=mesh)
    return state


@pytest.mark.parametrize("spec, cache_spec", [
    ("tp8", P(None, None, None, "tp")),
    ("dp2,tp4", P(None, "dp", None, "tp")),
])
def test_sharded_decode_equals_single_device(params, spec, cache_spec):
    mesh = make_mesh(spec)
    assert generate(CFG, params, mesh) == generate(CFG, params)
    # The cache really is split as the rules say: batch over dp, kv heads over tp.
    placed = place(CFG, params, mesh)
    assert sharded_prefill(CFG, placed, mesh).cache.k.sharding.spec == cache_spec
    assert placed["layers"]["attention"]["wk"].sharding.spec == P(None, None, "tp")


def test_quantized_on_a_mesh_that_does_not_divide_the_kv_heads(tiny):
    cfg, params = tiny  # 2 kv heads and 4 query heads on tp8: replicated; MLP and vocab split 8 ways
    q = quantize_params(params, "int8")
    mesh = make_mesh("tp8")
    placed = param_shardings(cfg, mesh, q)
    assert placed["layers"]["attention"]["wk"].values.spec == P()
    assert placed["layers"]["feed_forward"]["w1"].values.spec == P(None, None, "tp")
    assert placed["layers"]["feed_forward"]["w1"].scale.spec == P(None, None, "tp")  # [L, 1, F]
    assert generate(cfg, q, mesh) == generate(cfg, q)


def test_prepare_keeps_each_layer_on_the_mesh(params):
    """engine.prepare on a mesh: per-layer weights keep the rules' split (without the layer axis),
    the per-layer cache is split like the stacked one, and the tokens are the single-device ones."""
    mesh = make_mesh("dp2,tp4")
    split_cfg, split = engine.prepare(CFG, jax.device_get(params), mesh)
    assert split["layers_0"]["attention"]["wk"].sharding.spec == P(None, "tp", None)
    assert split["layers_1"]["feed_forward"]["w1"].sharding.spec == P(None, "tp")
    out = collect(stream_tokens(split_cfg, split, PROMPTS, max_new_tokens=8, sampling=SAMPLED, seed=1, mesh=mesh))
    assert out == generate(CFG, params)
    assert all(k.sharding.spec == P("dp", None, "tp") for k in sharded_prefill(split_cfg, split, mesh).cache.k)
