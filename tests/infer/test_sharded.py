"""Sharded generation on 8 fake CPU devices equals single-device generation."""

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import LlamaConfig
from llama_jax.infer.engine import BatchingEngine, prefill_shapes
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.weights import decode_params
from llama_jax.params import param_shardings
from llama_jax.infer.tokens import stream_tokens
from llama_jax.infer.sampling import SamplingParams
from llama_jax.quantize import quantize_params
from llama_jax.sharding import batch_split, make_mesh
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


def sharded_pages(cfg, params, mesh):
    """The page pools of a batching engine on `mesh` after one step."""
    engine = BatchingEngine(cfg, params, mesh=mesh, max_batch=4, max_seq_len=32, page_size=16,
                            chunk_shapes=prefill_shapes(32, multiple=batch_split(mesh), max_rows=4))
    engine.add("a", PROMPTS[1], RequestParams(2, temperature=0.0))
    engine.step()
    return engine.pages


@pytest.mark.parametrize("spec, page_spec", [
    ("tp8", P(None, None, "tp")),
    ("dp2,tp4", P(None, None, "tp")),
])
def test_sharded_decode_equals_single_device(params, spec, page_spec):
    mesh = make_mesh(spec)
    assert generate(CFG, params, mesh) == generate(CFG, params)
    # The pages really are split as the rules say: kv heads over tp (the pool is shared by all rows).
    placed = place(CFG, params, mesh)
    assert all(kv.sharding.spec == page_spec for layer in sharded_pages(CFG, placed, mesh) for kv in layer)
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
    """prepare on a mesh: per-layer weights keep the rules' split (without the layer axis), and the
    tokens are the single-device ones."""
    mesh = make_mesh("dp2,tp4")
    split_cfg, split = decode_params(CFG, jax.device_get(params), mesh)
    assert split.layers[0]["attention"]["wk"].sharding.spec == P(None, "tp", None)
    assert split.layers[1]["feed_forward"]["w1"].sharding.spec == P(None, "tp")
    out = collect(stream_tokens(split_cfg, split, PROMPTS, max_new_tokens=8, sampling=SAMPLED, seed=1, mesh=mesh))
    assert out == generate(CFG, params)
