"""Sharded init and restore: values equal the single-device ones, shards are really split, any
saving mesh restores into any target mesh, and the model's activation constraints take effect."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import checkpoint
from llama_jax.checkpoint import load as load_params
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.params import init_params as init_single, init_sharded_params as init_params, param_shardings
from llama_jax.sharding import activation_sharding, make_mesh

CFG = LlamaConfig.preset("tiny", n_heads=8, n_kv_heads=2)  # D=64, F=192, V=512: all split 8 ways but kv heads


def leaves(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("mesh_spec", ["fsdp4,tp2"])
def test_sharded_init_matches_single_device_and_is_split(mesh_spec):
    mesh = make_mesh(mesh_spec)
    params = leaves(init_params(CFG, mesh, seed=3))
    reference = leaves(init_single(CFG, 3))
    expected = leaves(param_shardings(CFG, mesh))
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(reference[name]), err_msg=name)
        assert value.sharding.is_equivalent_to(expected[name], value.ndim), name
    wq = params["['layers']['attention']['wq']"]  # [L, D, H, E]
    fsdp, tp = mesh.shape["fsdp"], mesh.shape["tp"]
    assert wq.addressable_shards[0].data.shape == (2, 64 // fsdp, 8 // tp, 8)
    emb = params["['tok_embeddings']"]
    assert emb.addressable_shards[0].data.shape == (512 // tp, 64 // fsdp)


def test_checkpoint_saved_on_one_mesh_restores_into_another(tmp_path):
    params = init_params(CFG, make_mesh("fsdp8"), seed=5)
    checkpoint.save(tmp_path / "ckpt", CFG, params)
    target = make_mesh("dp2,tp4")
    cfg, restored = load_params(tmp_path / "ckpt", target)
    assert cfg == CFG
    want = leaves(param_shardings(CFG, target))
    for name, value in leaves(restored).items():
        assert value.sharding.is_equivalent_to(want[name], value.ndim), name
        np.testing.assert_array_equal(np.asarray(value), np.asarray(leaves(params)[name]), err_msg=name)
    assert leaves(restored)["['output']"].sharding.spec == P(None, "tp")


def test_activation_constraints_take_effect_under_jit():
    mesh = make_mesh("dp2,fsdp2,tp2")
    params = init_params(CFG, mesh, seed=0)
    tokens = jnp.zeros((4, 16), jnp.int32)

    def forward(p, t):
        with activation_sharding(mesh):
            return Llama(CFG).apply({"params": p}, t)

    logits = jax.jit(forward)(params, tokens)
    # The logits constraint (batch over dp x fsdp, vocab over tp) decides the output's layout.
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P(("dp", "fsdp"), None, "tp")), 3)
    # Without the context the same jit leaves the layout to XLA (the constraints are no-ops).
    plain = jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t))(params, tokens)
    assert not plain.sharding.is_equivalent_to(logits.sharding, 3)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), atol=1e-5)
