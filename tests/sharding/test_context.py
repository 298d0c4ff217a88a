"""Context parallelism's load balance: the permutation, its inverse, equal causal work per device."""

import jax
import numpy as np
import pytest

from llama_jax.sharding import make_mesh
from llama_jax.sharding.context import balanced_order, context_size, load_balance, restore_order


def test_device_i_holds_chunks_i_and_2cp_minus_1_minus_i():
    # T=8 over cp2: 4 chunks of 2 tokens; device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
    assert balanced_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert balanced_order(8, 1).tolist() == list(range(8))


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_every_device_does_the_same_causal_work_and_the_inverse_restores_the_row(cp):
    T = 64
    order = balanced_order(T, cp)
    assert sorted(order.tolist()) == list(range(T))
    # Causal work of a query at index t: t + 1 keys. Equal on every device's T/cp tokens.
    work = (order + 1).reshape(cp, T // cp).sum(axis=1)
    assert work.tolist() == [work[0]] * cp
    batch = np.random.default_rng(0).integers(0, 100, (3, T, 2))
    balanced = load_balance(batch, cp)
    np.testing.assert_array_equal(balanced[:, :, 1], batch[:, order, 1])
    np.testing.assert_array_equal(restore_order(balanced, cp), batch)


def test_rows_must_split_into_2cp_equal_chunks():
    with pytest.raises(ValueError, match="multiple of 2 x cp = 8"):
        balanced_order(36, 4)


def test_context_size_is_the_cp_axis():
    assert context_size(make_mesh("dp2,cp4")) == 4
    assert context_size(make_mesh("fsdp2,cp2,tp2")) == 2
    assert context_size(make_mesh("dp2,fsdp2,tp2")) == 1
    assert context_size(make_mesh("dp1", devices=jax.devices()[:1])) == 1
