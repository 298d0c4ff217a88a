"""LoRA (llama_jax/lora.py) and its train step: adapters only get gradients, and exactly the projected
full-weight ones; the merged weights give the unmerged logits; step 0 is the base; a sharded mesh
trains exactly as one device; adapters are a few percent of a 1B model; bad specs are one line."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import lora
from llama_jax.config import PRESETS, LlamaConfig
from llama_jax.model import Llama
from llama_jax.params import init_params
from llama_jax.sharding import make_mesh
from llama_jax.train.lora import adapted
from llama_jax.train.optim import OptimConfig, make_optimizer
from llama_jax.train.step import init_state, loss_sums, make_train_step, put_batch
from tests.train.test_train_step import packed_batch

CFG = LlamaConfig.preset("tiny", n_heads=8, n_kv_heads=2)  # float32; D=64, F=192, V=512, 2 layers
SPEC = lora.LoraConfig(rank=4, alpha=8.0)
B, T = 8, 32


def random_adapters(cfg=CFG, spec=SPEC, seed=1):
    """Adapters with B != 0 too (the init's B = 0 would hide any error in the merge)."""
    adapters = lora.init_adapters(cfg, spec, seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(adapters))))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)


def numpy_merge(params, adapters, spec):
    """W + alpha/r * A @ B written out with numpy, one weight at a time: the reference."""
    merged = jax.tree.map(np.asarray, params)
    for group, weights in adapters["layers"].items():
        for name, ab in weights.items():
            a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
            w = merged["layers"][group][name]
            L, r = a.shape[0], a.shape[-1]
            delta = np.stack([a[i].reshape(-1, r) @ b[i].reshape(r, -1) for i in range(L)]).reshape(w.shape)
            merged["layers"][group][name] = (w + spec.scale * delta).astype(w.dtype)
    return merged


def test_adapter_shapes_and_logical_axes_follow_the_weights():
    shapes = lora.adapter_shapes(CFG, SPEC)
    logical = lora.adapter_logical_axes(CFG, SPEC)
    D, H, K, E, F, r = CFG.dim, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.hidden_dim, SPEC.rank
    attn, mlp = shapes["layers"]["attention"], shapes["layers"]["feed_forward"]
    assert attn["wq"]["a"].shape == (2, D, r) and attn["wq"]["b"].shape == (2, r, H, E)
    assert attn["wk"]["b"].shape == (2, r, K, E)
    assert attn["wo"]["a"].shape == (2, H, E, r) and attn["wo"]["b"].shape == (2, r, D)
    assert mlp["w2"]["a"].shape == (2, F, r) and mlp["w2"]["b"].shape == (2, r, D)
    assert tuple(logical["layers"]["attention"]["wq"]["a"]) == ("layers", "embed", "lora_rank")
    assert tuple(logical["layers"]["attention"]["wq"]["b"]) == ("layers", "lora_rank", "heads", "head_dim")
    assert tuple(logical["layers"]["attention"]["wo"]["a"]) == ("layers", "heads", "head_dim", "lora_rank")
    assert tuple(logical["layers"]["feed_forward"]["w2"]["a"]) == ("layers", "mlp", "lora_rank")
    # On fsdp2,tp4: A split like W's input dims, B like its output dims, r whole on every device.
    mesh = make_mesh("fsdp2,tp4")
    sh = lora.adapter_shardings(CFG, SPEC, mesh)["layers"]
    assert tuple(sh["attention"]["wq"]["a"].spec) == (None, "fsdp")  # trailing None left out
    assert tuple(sh["attention"]["wq"]["b"].spec) == (None, None, "tp")
    assert tuple(sh["feed_forward"]["w2"]["a"].spec) == (None, "tp")
    assert tuple(sh["feed_forward"]["w2"]["b"].spec) == (None, None, "fsdp")
    only_q = lora.LoraConfig(rank=2, targets=("wv", "wq"))
    assert only_q.targets == ("wq", "wv") and set(lora.adapter_shapes(CFG, only_q)["layers"]) == {"attention"}


def test_step_zero_is_the_base_and_merged_logits_equal_unmerged():
    params = init_params(CFG, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)))
    model = Llama(CFG)
    apply = jax.jit(model.apply)
    base_logits = apply({"params": params}, tokens)
    fresh = lora.init_adapters(CFG, SPEC, 1)
    b_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(fresh) if path[-1].key == "b"]
    assert len(b_leaves) == 7 and not any(np.any(np.asarray(b)) for b in b_leaves)
    np.testing.assert_array_equal(apply({"params": lora.adapt(params, fresh, SPEC)}, tokens), base_logits)
    assert lora.adapt(params, None, SPEC) is params  # DPO's reference: the same frozen arrays
    # Jitted as the base is: op-by-op execution rounds differently from the fused program.
    no_adapters = jax.jit(lambda p, t: lora.apply(CFG, p, None, SPEC, t))(params, tokens)
    np.testing.assert_array_equal(no_adapters, base_logits)

    adapters = random_adapters()
    unmerged = apply({"params": lora.adapt(params, adapters, SPEC)}, tokens)
    reference = apply({"params": numpy_merge(params, adapters, SPEC)}, tokens)
    merged = apply({"params": lora.merge(params, adapters, SPEC)}, tokens)
    assert float(jnp.max(jnp.abs(unmerged - base_logits))) > 0.1  # the adapters do something
    np.testing.assert_allclose(unmerged, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged, reference, rtol=1e-5, atol=1e-5)


def test_adapter_gradients_are_the_full_weight_gradients_projected():
    """d/dA and d/dB of the loss are s * dW @ B^T and s * A^T @ dW, with dW the gradient of the
    plain model at the merged weights; and only the adapters get one."""
    params = init_params(CFG, 0)
    adapters = random_adapters()
    batch = jax.tree.map(jnp.asarray, packed_batch(0))
    loss = lambda ad: loss_sums(CFG, lora.adapt(params, ad, SPEC), batch)[0]  # noqa: E731
    grads = jax.jit(jax.grad(loss))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    merged = numpy_merge(params, adapters, SPEC)
    full = jax.jit(jax.grad(lambda p: loss_sums(CFG, p, batch)[0]))(jax.tree.map(jnp.asarray, merged))
    for group, weights in adapters["layers"].items():
        for name, ab in weights.items():
            a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
            L, r = a.shape[0], a.shape[-1]
            dw = np.asarray(full["layers"][group][name]).reshape(L, a[0].size // r, -1)
            a2, b2 = a.reshape(L, -1, r), b.reshape(L, r, -1)
            want_a = SPEC.scale * dw @ b2.transpose(0, 2, 1)
            want_b = SPEC.scale * a2.transpose(0, 2, 1) @ dw
            got = grads["layers"][group][name]
            np.testing.assert_allclose(np.asarray(got["a"]).reshape(want_a.shape), want_a, rtol=2e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(got["b"]).reshape(want_b.shape), want_b, rtol=2e-4, atol=1e-5)


def lora_steps(mesh_spec, steps=2, quantize=False):
    """(losses, adapters, base before, base after) of `steps` LoRA train steps on `mesh_spec`."""
    devices = jax.devices()[:1] if mesh_spec == "dp1" else None
    mesh = make_mesh(mesh_spec, devices)
    from llama_jax.params import init_sharded_params as init_sharded

    base = init_sharded(CFG, mesh, 0)
    if quantize:
        from llama_jax.quantize import quantize_params
        base = quantize_params(base, "int8")
    before = jax.tree.map(np.asarray, base)
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10))
    trained = lora.sharded_adapter_shapes(CFG, SPEC, mesh)
    step = make_train_step(CFG, optimizer, mesh, batch_shape=(B, T), trained=trained,
                           adapt=adapted(SPEC))
    adapters = jax.device_put(random_adapters(), jax.tree.map(lambda s: s.sharding, trained))
    state = init_state(CFG, optimizer, mesh, params=adapters, trained=trained)
    losses = []
    for i in range(steps):
        state, metrics = step(state, put_batch(packed_batch(0), mesh), base)  # one batch: its loss falls
        losses.append(float(metrics["loss"]))
    return losses, state, before, base


def test_lora_step_trains_adapters_only_and_fsdp2_tp4_equals_one_device():
    losses, state, before, base = lora_steps("dp1")
    # The state is adapters and their Adam moments, nothing of the base's size.
    adapter_leaves = jax.tree.leaves(lora.adapter_shapes(CFG, SPEC))
    assert [x.shape for x in jax.tree.leaves(state.params)] == [x.shape for x in adapter_leaves]
    assert [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim] == [x.shape for x in adapter_leaves] * 2
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(base)):  # the base is read, never written
        np.testing.assert_array_equal(b, np.asarray(a))
    assert losses[1] < losses[0]
    sharded_losses, sharded_state, _, _ = lora_steps("fsdp2,tp4")
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
    # Adam's first moments: linear in the gradients (its steps, g / sqrt(v), amplify the rounding of
    # gradients near zero).
    moments = lambda s: [x for x in jax.tree.leaves(s.opt_state) if x.ndim][:len(adapter_leaves)]  # noqa: E731
    for got, want in zip(moments(sharded_state), moments(state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    for got, want in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3)  # a tenth of an Adam step
    assert tuple(sharded_state.params["layers"]["attention"]["wq"]["b"].sharding.spec) == (None, None, "tp")


def test_qlora_step_keeps_the_base_int8_and_matches_the_dequantized_reference():
    from llama_jax.quantize import QuantizedArray, dequantize_params

    losses, state, _, base = lora_steps("fsdp2,tp4", steps=1, quantize=True)
    wq = base["layers"]["attention"]["wq"]
    assert isinstance(wq, QuantizedArray) and wq.values.dtype == jnp.int8
    # The first loss is that of the int8 base, dequantized by hand, with the same adapters unmerged.
    reference = lora.adapt(dequantize_params(base, jnp.float32), random_adapters(), SPEC)
    _, sums = jax.jit(lambda p, b: loss_sums(CFG, p, b))(reference, jax.tree.map(jnp.asarray, packed_batch(0)))
    assert losses[0] == pytest.approx(float(sums["nll"] / sums["weight"]), rel=1e-5)


def test_adapter_checkpoint_is_under_5_percent_of_a_1b_base():
    """From shapes only: r=8 on every target of Llama-3.2-1B, float32 adapters vs its bf16 weights."""
    cfg = PRESETS["llama3.2-1b"]
    spec = lora.LoraConfig(rank=8)
    n = lora.num_adapter_params(cfg, spec)
    per_layer = 8 * ((2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3)  # wq wo, wk wv, w1 w2 w3
    assert n == cfg.n_layers * per_layer
    base_bytes = cfg.num_params() * 2  # bfloat16, as Meta ships it
    assert 4 * n / base_bytes < 0.05  # OUT/adapters
    assert 3 * 4 * n / base_bytes < 0.05  # a train checkpoint: adapters + two Adam moments


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "--lora-rank must be a positive integer, got 0"),
    (dict(rank=-2), "--lora-rank must be a positive integer"),
    (dict(rank=4, targets=("wq", "wx")), "--lora-targets: unknown weight 'wx'; choose from wq,wk,wv,wo,w1,w2,w3"),
    (dict(rank=4, targets="wq,output"), "unknown weight 'output'"),
    (dict(rank=4, alpha=0.0), "--lora-alpha must be > 0"),
])
def test_bad_lora_specs_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**kwargs)


def test_merge_keeps_the_base_dtype():
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
    params = init_params(cfg, 0)
    merged = lora.merge(params, random_adapters(cfg), SPEC)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype("bfloat16")}
    assert math.isfinite(float(jnp.sum(merged["layers"]["attention"]["wq"].astype(jnp.float32))))
