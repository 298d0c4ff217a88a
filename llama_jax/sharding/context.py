"""Context parallelism's load balance: the order in which a row's tokens are laid out over `cp`.

Causal attention's work grows along a row: the last tokens see every key, the first almost none.
Cut into cp contiguous pieces, the last device would do 2*cp-1 times the attention work of the
first. So, as in the Llama 3 paper, the row is cut into 2*cp chunks and device i holds chunks i
and 2*cp-1-i, one cheap and one dear: the same causal work on every device.

The permutation is applied once, to the global batch on the host (train.step.put_batch), to every
[B, T] array alike (tokens, targets, positions, segment ids, loss weights), so each token keeps its
own position, document and weight. Nothing downstream needs the original order: RoPE reads the
positions, attention masks by positions and segment ids (kernels/context_parallel.py), and the
loss is a sum over tokens.
"""

from __future__ import annotations

import math

import numpy as np
from jax.sharding import Mesh

from llama_jax.sharding import axes
from llama_jax.sharding.rules import logical_to_spec


def context_size(mesh: Mesh) -> int:
    """How many ways the rules split a row's tokens on `mesh` (the cp axis size; 1 without one)."""
    spec = logical_to_spec((axes.ACTIVATION_LENGTH,), mesh=mesh)
    split = spec[0] if len(spec) else ()
    return math.prod(mesh.shape[a] for a in ((split,) if isinstance(split, str) else split))


def check_seq_len(seq_len: int, cp: int) -> None:
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2 x cp = {2 * cp}: context parallelism "
                         f"cuts each row into 2 x cp equal chunks")


def balanced_order(seq_len: int, cp: int) -> np.ndarray:
    """Token indices [T] of the load-balanced row: device i's T/cp tokens are chunks i and 2*cp-1-i."""
    check_seq_len(seq_len, cp)
    if cp == 1:
        return np.arange(seq_len)
    chunks = np.arange(seq_len).reshape(2 * cp, seq_len // (2 * cp))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * cp - 1 - i]]) for i in range(cp)])


def load_balance(x: np.ndarray, cp: int, axis: int = 1) -> np.ndarray:
    """`x` with its sequence axis in the load-balanced order for `cp` devices."""
    return np.take(x, balanced_order(x.shape[axis], cp), axis=axis)


def restore_order(x: np.ndarray, cp: int, axis: int = 1) -> np.ndarray:
    """The inverse of load_balance: per-token results (logits, losses) back in the row's order."""
    return np.take(x, np.argsort(balanced_order(x.shape[axis], cp)), axis=axis)
