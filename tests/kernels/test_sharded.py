"""The Pallas kernels inside a sharded model: each device runs them on its own batch rows and heads
(shard_map), and the numbers equal the unsharded XLA model's."""

import dataclasses
import functools

import jax
import jax.extend
import numpy as np
import pytest

from llama_jax.config import PRESETS
from llama_jax.infer import tokens as token_generation
from llama_jax.infer.weights import decode_params
from llama_jax.infer.sampling import SamplingParams
from llama_jax.model import Llama
from llama_jax.sharding import activation_sharding, make_mesh
from llama_jax.params import param_shardings
from tests.infer.common import collect
from tests.reference import random_params

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")

# 8 query heads over 4 kv heads: tp4 splits both, two query heads per kv head on every shard.
CFG = dataclasses.replace(PRESETS["tiny"], dim=128, n_heads=8, n_kv_heads=4)
KERNEL_CFG = dataclasses.replace(CFG, attention_impl="pallas", attention_interpret=True)


TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 16))
SEGMENT_IDS = np.repeat(np.array([[1, 2]] * 4), 8, axis=1)


def loss(cfg, params):
    logits = Llama(cfg).apply({"params": params}, TOKENS, segment_ids=SEGMENT_IDS)
    return (jax.nn.log_softmax(logits)[..., 0]).mean(), logits


@functools.cache
def xla_reference(kv_heads):
    """Params, and the grads and logits of the unsharded XLA model with that many kv heads (compiled once)."""
    cfg = dataclasses.replace(CFG, n_kv_heads=kv_heads)
    params = random_params(cfg, seed=8)
    grads, logits = jax.jit(jax.grad(lambda p: loss(cfg, p), has_aux=True))(params)
    return params, grads, logits


def kernel_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The shape of the first operand (q) of every pallas_call, however deeply nested."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            shapes.append(tuple(eqn.invars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += kernel_operand_shapes(sub)
    return shapes


@pytest.mark.parametrize("spec, kv_heads, per_shard_q", [
    ("dp2,tp4", 4, (2, 16, 2, 16)),  # rows over dp, heads over tp
    ("fsdp2,tp4", 2, (2, 16, 8, 16)),  # 2 kv heads do not divide over tp4: heads stay whole
])
def test_sharded_model_runs_the_kernels_per_shard_with_the_xla_numbers(spec, kv_heads, per_shard_q):
    cfg = dataclasses.replace(CFG, n_kv_heads=kv_heads)
    kernel_cfg = dataclasses.replace(cfg, attention_impl="pallas", attention_interpret=True)
    params, ref_grads, ref_logits = xla_reference(kv_heads)
    mesh = make_mesh(spec)

    @jax.jit
    def sharded(p):
        with activation_sharding(mesh):
            return jax.grad(lambda p: loss(kernel_cfg, p), has_aux=True)(p)

    placed = jax.device_put(params, param_shardings(cfg, mesh))
    # Forward and backward kernels alike see one shard: [B / batch split, T, H / head split, E].
    assert set(kernel_operand_shapes(jax.make_jaxpr(sharded)(placed).jaxpr)) == {per_shard_q}
    grads, logits = sharded(placed)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, ref_grads)


def test_sharded_model_runs_splash_per_shard_with_the_xla_numbers():
    """JAX's TPU kernel (interpreted), like ours: a pallas_call inside the shard_map over rows and heads."""
    params, ref_grads, ref_logits = xla_reference(CFG.n_kv_heads)  # the dp2,tp4 case's above
    mesh, splash_cfg = make_mesh("dp2,tp4"), dataclasses.replace(CFG, attention_impl="splash", attention_interpret=True)

    @jax.jit
    def sharded(p):
        with activation_sharding(mesh):
            return jax.grad(lambda p: loss(splash_cfg, p), has_aux=True)(p)

    placed = jax.device_put(params, param_shardings(CFG, mesh))
    assert "pallas_call" in str(jax.make_jaxpr(sharded)(placed)).split("shard_map", 1)[-1]
    grads, logits = sharded(placed)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, ref_grads)


def test_sharded_decode_with_the_kernel_equals_single_device_xla():
    params = random_params(CFG, seed=9)
    prompts = [[1, 7, 9], [1] + list(range(30, 40)), [1, 4], [1] + list(range(200, 212))]
    sampling = SamplingParams(temperature=0.0)

    def generate(cfg, mesh=None):
        cfg, placed = decode_params(cfg, params, mesh)
        return collect(token_generation.stream_tokens(cfg, placed, prompts, max_new_tokens=4, sampling=sampling, mesh=mesh))

    assert generate(KERNEL_CFG, make_mesh("dp2,tp4")) == generate(CFG)
