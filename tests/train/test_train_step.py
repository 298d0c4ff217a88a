"""The train step: same loss and grads on every mesh, sharded state, exact gradient accumulation,
packing that never leaks across documents, overfitting one batch, mixed precision."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.config import LlamaConfig
from llama_jax.params import init_params as init_single
from llama_jax.sharding import make_mesh
from llama_jax.params import param_shardings
from llama_jax.train.optim import OptimConfig, lr_schedule, make_optimizer
from llama_jax.train.step import abstract_batch, grads_and_sums, init_state, loss_sums, make_train_step, put_batch, \
    sharded_abstract_state

CFG = LlamaConfig.preset("tiny", n_heads=8, n_kv_heads=2)  # float32; D=64, F=192, V=512
B, T = 8, 32


def packed_batch(seed=0, B=B, T=T):
    """Rows of 1-3 documents each (segment ids, positions restarting per document), some padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(4, T - 4), rng.integers(0, 3), replace=False))
        bounds = [0, *cuts.tolist(), T - rng.integers(0, 3)]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg[b, lo:hi] = s
            pos[b, lo:hi] = np.arange(hi - lo)
    weights = (seg > 0).astype(np.float32) * (rng.random((B, T)) > 0.1)
    return {"inputs": rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32),
            "targets": rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32),
            "weights": weights.astype(np.float32), "positions": pos, "segment_ids": seg}


def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_matches_reference(grads, sums, want_grads, want_sums):
    for k, v in sums.items():
        assert float(v) == pytest.approx(want_sums[k], rel=1e-5), k
    for name, g in flat(grads).items():
        np.testing.assert_allclose(g, want_grads[name], rtol=1e-5, atol=1e-5 * np.abs(want_grads[name]).max(),
                                   err_msg=name)


@pytest.fixture(scope="module")
def reference():
    """Loss and grads on one device, no mesh."""
    params = init_single(CFG, 0)
    batch = packed_batch()
    one = make_mesh("dp1", devices=jax.devices()[:1])
    grads, sums = jax.jit(lambda p, b: grads_and_sums(CFG, p, b, one))(params, batch)
    return params, batch, flat(grads), {k: float(v) for k, v in sums.items()}


@pytest.mark.parametrize("mesh_spec", ["dp8", "fsdp8", "tp8", "dp2,fsdp2,tp2", "cp8", "dp2,cp4", "fsdp2,cp2,tp2"])
def test_same_loss_and_grads_on_every_mesh(reference, mesh_spec):
    """Context parallel meshes (cp) included: rows of T=32 cut into up to 16 chunks of 2 tokens, so
    the packed documents cross chunk boundaries. cp2 and cp4 split rows here beside fsdp and tp, and
    dp (cp2 alone: the flash kernel test below and tests/kernels/test_context_parallel.py)."""
    params, batch, want_grads, want_sums = reference
    devices = math.prod(int(item.lstrip("dpfsct")) for item in mesh_spec.split(","))
    mesh = make_mesh(mesh_spec, devices=jax.devices()[:devices])
    shardings = param_shardings(CFG, mesh)
    params = jax.device_put(params, shardings)
    compute = jax.jit(lambda p, b: grads_and_sums(CFG, p, b, mesh), out_shardings=(shardings, None))
    grads, sums = compute(params, put_batch(batch, mesh))
    assert_matches_reference(grads, sums, want_grads, want_sums)


@pytest.mark.parametrize("mesh_spec", ["cp2", "dp2,cp2"])
def test_cp_running_the_flash_kernel_gives_the_single_device_loss_and_grads(reference, mesh_spec):
    """attention_impl 'pallas' under cp: each device's query chunks against the gathered keys in the
    flash kernel (interpreted here), against the single-device XLA run."""
    params, batch, want_grads, want_sums = reference
    cfg = dataclasses.replace(CFG, attention_impl="pallas", attention_interpret=True)
    devices = math.prod(int(item.lstrip("dpc")) for item in mesh_spec.split(","))
    mesh = make_mesh(mesh_spec, devices=jax.devices()[:devices])
    shardings = param_shardings(cfg, mesh)
    compute = jax.jit(lambda p, b: grads_and_sums(cfg, p, b, mesh), out_shardings=(shardings, None))
    params, batch = jax.device_put(params, shardings), put_batch(batch, mesh)
    assert "pallas_call" in str(jax.make_jaxpr(compute)(params, batch))
    grads, sums = compute(params, batch)
    assert_matches_reference(grads, sums, want_grads, want_sums)


def test_train_step_keeps_params_and_adam_moments_sharded_by_the_rules():
    mesh = make_mesh("dp2,fsdp2,tp2")
    optim = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10)
    optimizer = make_optimizer(optim)
    state = init_state(CFG, optimizer, mesh, seed=0)
    step = make_train_step(CFG, optimizer, mesh, batch_shape=(B, T), schedule=lr_schedule(optim))
    batch = put_batch(packed_batch(), mesh)
    # The model's block-boundary constraints are in the compiled step: activations split over
    # dp x fsdp (rows) and cp (tokens).
    hlo = step.lower(state, batch).as_text()
    assert hlo.count('sharding_constraint') >= 2 and '[{"dp", "fsdp"}, {"cp"}, {}]' in hlo
    state, metrics = step(state, batch)
    want = {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_leaves_with_path(param_shardings(CFG, mesh))}
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for tree in (state.params, adam.mu, adam.nu):
        for k, v in jax.tree_util.tree_leaves_with_path(tree):
            assert v.sharding.spec == want[jax.tree_util.keystr(k)], jax.tree_util.keystr(k)
    wo = state.params["layers"]["attention"]["wo"]  # [L, H, E, D] -> (None, tp, None, fsdp)
    assert wo.addressable_shards[0].data.shape == (2, 4, 8, 32)
    assert state.step.sharding.is_equivalent_to(NamedSharding(mesh, P()), 0) and int(state.step) == 1
    assert metrics["loss"].sharding.is_fully_replicated
    assert float(metrics["lr"]) == pytest.approx(1e-3)
    assert float(metrics["tokens"]) == packed_batch()["weights"].sum()


def test_gradient_accumulation_equals_one_big_batch(reference):
    params, batch, want_grads, want_sums = reference
    mesh = make_mesh("fsdp2", devices=jax.devices()[:2])
    compute = jax.jit(lambda p, b: grads_and_sums(CFG, p, b, mesh, grad_accum=4))
    grads, sums = compute(jax.device_put(params, param_shardings(CFG, mesh)), put_batch(batch, mesh))
    assert_matches_reference(grads, sums, want_grads, want_sums)


def test_packed_documents_lose_exactly_what_they_lose_alone():
    params = init_single(CFG, 1)
    batch = packed_batch(seed=5, B=2)
    nll = jax.jit(lambda b: loss_sums(CFG, params, b)[1]["nll"])
    checked = 0
    for row in range(2):
        for s in set(batch["segment_ids"][row].tolist()) - {0}:
            idx = np.flatnonzero(batch["segment_ids"][row] == s)
            only_this = {k: v[row:row + 1] for k, v in batch.items()}
            only_this["weights"] = np.where(batch["segment_ids"][row:row + 1] == s, only_this["weights"], 0)
            # The document alone: at the start of its own row, nothing before it, padding after.
            alone = {k: np.zeros_like(v[:1]) for k, v in batch.items()}
            for k in ("inputs", "targets", "weights", "positions"):
                alone[k][0, :len(idx)] = batch[k][row, idx]
            alone["segment_ids"][0, :len(idx)] = 1
            assert float(nll(only_this)) == pytest.approx(float(nll(alone)), rel=1e-5)
            checked += 1
    assert checked >= 3


def test_z_loss_adds_the_squared_log_partition():
    params = init_single(CFG, 0)
    batch = packed_batch()
    objective = jax.jit(lambda z: loss_sums(CFG, params, batch, z_loss=z))
    plain, sums = objective(0.0)
    with_z, _ = objective(1e-3)
    assert float(sums["z"]) > 0
    assert float(with_z) == pytest.approx(float(plain) + 1e-3 * float(sums["z"]), rel=1e-6)


def test_tiny_model_overfits_one_batch():
    mesh = make_mesh("fsdp2", devices=jax.devices()[:2])
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=60, weight_decay=0.0)
    optimizer = make_optimizer(optim)
    state = init_state(CFG, optimizer, mesh, seed=0)
    step = make_train_step(CFG, optimizer, mesh, batch_shape=(B, T))
    batch = put_batch(packed_batch(), mesh)
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5 and losses[-1] < 0.1, losses[::10]


def test_bf16_compute_keeps_float32_master_weights_and_moments():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    mesh = make_mesh("fsdp2", devices=jax.devices()[:2])
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10))
    state = init_state(cfg, optimizer, mesh, seed=0)
    step = make_train_step(cfg, optimizer, mesh, batch_shape=(B, T))
    state, metrics = step(state, put_batch(packed_batch(), mesh))
    dtypes = {v.dtype for v in jax.tree.leaves((state.params, state.opt_state[1][0].mu, state.opt_state[1][0].nu))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


def test_batch_size_must_split_evenly():
    mesh = make_mesh("dp2,fsdp2,tp2")
    with pytest.raises(ValueError, match=r"multiple of dp x fsdp \(4\) x grad_accum \(2\) = 8"):
        make_train_step(CFG, make_optimizer(OptimConfig()), mesh, batch_shape=(4, T), grad_accum=2)


def test_a_32k_row_trains_on_cp8_and_needs_an_eighth_of_one_devices_memory():
    """Two steps of a 32,768-token row on cp8, and the per-device temporaries of that compiled step
    against one device's at the same length, whose dense XLA attention holds [T, T] scores per head
    while cp8 runs the blocked flash_xla on T/8 queries (one device's is only compiled). One layer of
    the tiny preset with one head of its 16 dims (grouped heads: the tests above): running the step
    at 32K tokens is what takes the time, attention most of it. A 32K step's temporaries are ~33 MiB
    per device, one device's ~6x that."""
    cfg = LlamaConfig.preset("tiny", n_layers=1, dim=16, n_heads=1, n_kv_heads=1, max_seq_len=32768)
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10))
    T = 32768
    one = make_mesh("dp1", devices=jax.devices()[:1])
    one_device = make_train_step(cfg, optimizer, one, batch_shape=(1, T)).lower(
        sharded_abstract_state(cfg, optimizer, one), abstract_batch(one, (1, T))).compile()

    cp8 = make_mesh("cp8")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T + 1), dtype=np.int32)
    batch = put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((1, T), np.float32),
                       "positions": np.arange(T, dtype=np.int32)[None], "segment_ids": np.ones((1, T), np.int32)}, cp8)
    state = init_state(cfg, optimizer, cp8, seed=0)
    # Compiled with LLVM's optimizations, which tests/conftest.py turns off elsewhere: at 32K tokens
    # running the step, not compiling it, is what takes the time.
    step = make_train_step(cfg, optimizer, cp8, batch_shape=(1, T)).lower(state, batch).compile(
        {"xla_backend_optimization_level": 2})
    split, whole = step.memory_analysis().temp_size_in_bytes, one_device.memory_analysis().temp_size_in_bytes
    assert split <= whole / 4, (split, whole)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses


def test_rows_must_split_into_2cp_chunks():
    with pytest.raises(ValueError, match="sequence length 36 must be a multiple of 2 x cp = 8"):
        make_train_step(CFG, make_optimizer(OptimConfig()), make_mesh("dp2,cp4"), batch_shape=(2, 36))
