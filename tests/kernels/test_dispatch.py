"""`attention` / `paged_attention`: one dispatch over impl, clear errors for what is missing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import kernels
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


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_xla_and_auto(impl):
    q, k, v, seg = _self_inputs()
    out = kernels.attention(q, k, v, seg, impl=impl)
    np.testing.assert_allclose(out, attention_reference(q, k, v, seg), atol=1e-6)
    paged = _paged_inputs()
    out = kernels.paged_attention(*paged, impl=impl)
    np.testing.assert_allclose(out, paged_attention_reference(*paged), atol=1e-5)


@pytest.mark.skipif(not ON_CPU, reason="auto picks pallas off CPU")
def test_auto_is_xla_on_cpu():
    assert kernels.resolve_impl("auto") == "xla"


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
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
        kernels.paged_attention(*_paged_inputs(), impl="cudnn")
    with pytest.raises(ValueError, match="'pallas' has no lowering on backend 'cpu'"):
        kernels.paged_attention(*_paged_inputs(), impl="pallas")
