"""`attention` / `paged_attention`: one dispatch over impl, clear errors for what is missing."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import kernels
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.kernels.reference import attention_reference, paged_attention_reference

ON_CPU = jax.default_backend() == "cpu"


def _self_inputs(T=24):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, T, 4, 64))
    k, v = (jax.random.normal(kk, (1, T, 2, 64)) for kk in ks[1:])
    seg = jnp.asarray([[0] * 10 + [1] * (T - 10)], jnp.int32)
    return q, k, v, seg


def _paged_inputs(N=20, P=8):
    """Two rows of 8 pages of 8 slots each, out of order in a pool of 20; positions 5 and 60."""
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (2, 1, 4, 64))
    k, v = (jax.random.normal(kk, (N, P, 2, 64)) for kk in ks[1:])
    table = jax.random.permutation(jax.random.key(2), N)[:16].reshape(2, 8).astype(jnp.int32)
    return q, k, v, table, jnp.asarray([[5], [60]], jnp.int32)


def _numpy_attention(q, k, v, visible):
    """softmax(Q K^T / sqrt(D)) V in float64, one (row, query head) at a time: query head h reads kv head
    h // (H / K); `visible[b, t, s]` says whether query t of row b sees key s."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kv = h // (H // k.shape[2])
            scores = q[b, :, h] @ k[b, :, kv].T / np.sqrt(D)
            scores = np.where(visible[b], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = probs / probs.sum(-1, keepdims=True) @ v[b, :, kv]
    return out


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_xla_and_auto_equal_a_direct_softmax(impl):
    q, k, v, seg = _self_inputs()
    T = q.shape[1]
    causal = np.tril(np.ones((1, T, T), bool))
    same_document = np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]
    np.testing.assert_allclose(kernels.attention(q, k, v, impl=impl), _numpy_attention(q, k, v, causal), atol=2e-5)
    np.testing.assert_allclose(kernels.attention(q, k, v, seg, impl=impl),
                               _numpy_attention(q, k, v, causal & same_document), atol=2e-5)
    # Paged: each row's pages gathered in page-table order, the query at position p sees positions 0..p.
    q, k_pages, v_pages, table, positions = _paged_inputs()
    P = k_pages.shape[1]
    gather = lambda pages: np.asarray(pages)[np.asarray(table)].reshape(2, -1, *pages.shape[2:])  # noqa: E731
    visible = np.arange(8 * P)[None, None, :] <= np.asarray(positions)[:, :, None]
    want = np.concatenate([_numpy_attention(q[b:b + 1], gather(k_pages)[b:b + 1], gather(v_pages)[b:b + 1],
                                            visible[b:b + 1]) for b in range(2)])
    out = kernels.paged_attention(q, k_pages, v_pages, table, positions, impl=impl)
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(paged_attention_reference(q, k_pages, v_pages, table, positions), want, atol=2e-5)


@pytest.mark.parametrize("platform, want", [("cuda", "cudnn"), ("tpu", "splash"), ("cpu", "flash_xla"),
                                             ("rocm", "flash_xla")])
def test_auto_picks_the_verified_path_of_each_platform(platform, want, monkeypatch):
    # Our Pallas kernels only by name until bench/device_check passes on a platform: auto never picks them,
    # not for whole rows, not under context parallelism, not for the engine's pages.
    monkeypatch.setattr(kernels, "platform", lambda: platform)
    assert kernels.resolve_impl("auto") == want
    assert {f.name: f.default for f in dataclasses.fields(LlamaConfig)}["attention_impl"] == "auto"
    assert kernels.AUTO_CONTEXT_PARALLEL == "flash_xla" and kernels.AUTO_PAGED == "xla"


def test_the_default_model_builds_no_t_by_t_scores_on_cpu():
    """The default config on CPU runs the blocked XLA path: no [.., T, T] array in the traced step."""
    T = 768  # three blocks of 256 (and not the tiny vocabulary, 512)
    cfg = LlamaConfig.preset("tiny", max_seq_len=T)
    tokens = jnp.zeros((1, T), jnp.int32)
    params = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), tokens))

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    loss = lambda p: Llama(cfg).apply(p, tokens).sum()  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    assert not [shape for shape in shapes(jaxpr) if list(shape).count(T) >= 2]


@pytest.mark.parametrize("segments", [False, True])
def test_flash_xla_equals_the_reference_with_grads(segments):
    q, k, v, seg = _self_inputs(T=40)
    seg = seg if segments else None
    _assert_same_attention(lambda *a: kernels.attention(*a, impl="flash_xla"), (q, k, v, seg), atol=1e-5)


def test_cudnn_call_maps_our_layout_grouped_heads_and_scale():
    # The same call with JAX's XLA implementation: what differs on a GPU is only the backend.
    q, k, v = (x.astype(jnp.bfloat16) for x in _self_inputs()[:3])
    out = kernels._cudnn_attention(q, k, v, None, False, implementation="xla")
    want = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2)


@pytest.mark.parametrize("case", ["packed documents", "float32"])
def test_what_cudnn_does_not_take_runs_the_blocked_xla_path(case):
    # jax.nn.dot_product_attention has no segment ids (a dense mask would be T x T) and cuDNN computes in
    # half precision. This runs on CPU: the cuDNN call is never reached.
    q, k, v, seg = _self_inputs()
    seg = seg if case == "packed documents" else None
    out = kernels._IMPLS["cudnn"](q, k, v, seg, False)
    np.testing.assert_allclose(out, attention_reference(q, k, v, seg), atol=1e-5)


@pytest.mark.parametrize("T, segments", [(100, True), (256, False)])
def test_splash_interpreted_equals_the_reference_with_grads(T, segments):
    """JAX's TPU kernel in the Pallas interpreter: GQA (4 query heads on 2 kv heads), packed documents, a
    length the kernel's blocks do not divide (padded), one that they do."""
    q, k, v, seg = _self_inputs(T)
    seg = seg if segments else None
    _assert_same_attention(lambda *a: kernels.attention(*a, impl="splash", interpret=True), (q, k, v, seg), atol=1e-5)


def test_splash_kernel_built_once_serves_later_traces():
    # The kernel is cached per shape; built inside the first jit it would carry that trace's tracers.
    q, k, v, seg = _self_inputs(T=30)
    for dtype in (jnp.bfloat16, jnp.float32):
        args = (q.astype(dtype), k.astype(dtype), v.astype(dtype))
        out = jax.jit(lambda q, k, v: kernels.attention(q, k, v, seg, impl="splash", interpret=True))(*args)
        np.testing.assert_allclose(out.astype(jnp.float32), attention_reference(q, k, v, seg), atol=3e-2)


def _assert_same_attention(fn, args, atol):
    q, k, v, seg = args

    def out_and_grads(f):
        """f's output and input gradients under the cotangent cos(reference output), one compiled program
        (op by op, every op of the reference and of the interpreted kernel compiled on its own)."""
        def run(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg), q, k, v)
            return (out, *vjp(jnp.cos(attention_reference(q, k, v, seg))))
        return jax.jit(run)(q, k, v)

    got, want = out_and_grads(fn), out_and_grads(attention_reference)
    np.testing.assert_allclose(got[0], want[0], atol=atol)
    for name, g, w in zip("qkv", got[1:], want[1:]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol, err_msg=f"d{name}")


def test_pallas_reaches_the_kernels():
    q, k, v, seg = _self_inputs()
    out = kernels.attention(q, k, v, seg, impl="pallas", interpret=True)
    np.testing.assert_allclose(out, attention_reference(q, k, v, seg), atol=1e-5)
    paged = _paged_inputs()
    out = kernels.paged_attention(*paged, impl="pallas", interpret=True)
    np.testing.assert_allclose(out, paged_attention_reference(*paged), atol=1e-5)


def test_unknown_impl():
    q, k, v, seg = _self_inputs()
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        kernels.attention(q, k, v, seg, impl="flash")
    with pytest.raises(ValueError, match="unknown attention impl"):
        kernels.paged_attention(*_paged_inputs(), impl="triton")


@pytest.mark.skipif(not ON_CPU, reason="checks what CPU lacks")
def test_impls_unavailable_on_cpu():
    q, k, v, seg = _self_inputs()
    with pytest.raises(ValueError, match="'pallas' has no lowering on backend 'cpu'"):
        kernels.attention(q, k, v, seg, impl="pallas")
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
        kernels.attention(q, k, v, seg, impl="cudnn")
    with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
        kernels.attention(q, k, v, seg, impl="splash")
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
        kernels.paged_attention(*_paged_inputs(), impl="cudnn")
    with pytest.raises(ValueError, match="'pallas' has no lowering on backend 'cpu'"):
        kernels.paged_attention(*_paged_inputs(), impl="pallas")
