"""Weight-only quantization, a weight representation that loading, serving and QLoRA training all
read: int8 (any backend) or float8_e4m3fn values, one float32 scale per output channel of every
matmul weight.

A quantized weight is a `QuantizedArray`, a pytree of (values, scale) that stands in for the array
inside the parameter tree. The model reads every weight as `w.astype(compute_dtype)`, which for a
QuantizedArray is the dequantization, so it happens per layer inside the layer scan, beside the
einsum that consumes it; the embedding lookup reads the table through `__jax_array__`, and XLA
fuses that dequantization into the gather (only the looked-up rows are converted). Dequantizing
the whole tree before `apply` instead materialises a compute-dtype copy of every weight each step,
a slower decode step (bench/RESULTS.md has the measurement).

Speed: XLA's CPU backend does not fuse the conversion into the matmul, so each step still converts
every layer's weights in an elementwise pass before multiplying; on CPU int8 halves the memory but
decodes slower than unquantized weights (bench/decode.py). GPU backends can fuse the conversion
into the matmul's operand load; that is not measured here.

`values` keeps the weight's shape; `scale` has the same rank with the contracted (input) dims
reduced to 1, so `values * scale` broadcasts and the stacked `layers` axis is scanned over like
any other parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZED_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}

# Contracted (input) axes of each matmul weight, counted from the end so stacked layers keep axis 0.
# The tied embedding is the output matrix "btd,vd->btv": its output channel is the vocab row.
CONTRACTED_AXES = {
    "wq": (-3,), "wk": (-3,), "wv": (-3,),  # [L, D, H|K, E]
    "wo": (-3, -2),  # [L, H, E, D]
    "w1": (-2,), "w3": (-2,),  # [L, D, F]
    "w2": (-2,),  # [L, F, D]
    "output": (-2,),  # [D, V]
    "tok_embeddings": (-1,),  # [V, D]; also gathered from, a row per token: XLA fuses the dequantize into the gather
}


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """values [..] int8 | float8_e4m3fn and scale [..] float32 (contracted dims of size 1)."""

    def __init__(self, values, scale):
        self.values, self.scale = values, scale

    def tree_flatten(self):
        return (self.values, self.scale), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    @property
    def shape(self):
        return self.values.shape

    @property
    def ndim(self):
        return self.values.ndim

    @property
    def dtype(self):
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes

    def astype(self, dtype):
        # Multiply in float32 so a bfloat16 compute dtype rounds once, not the scale and the product.
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

    def __jax_array__(self):  # jnp.take of the embedding table
        return self.astype(self.scale.dtype)

    def __repr__(self):
        return f"QuantizedArray({self.values.dtype.name}{list(self.shape)})"


def quantize(w, contracted_axes: tuple[int, ...], kind: str) -> QuantizedArray:
    """Symmetric per-output-channel quantization: scale = max|w| over the contracted dims / qmax."""
    if kind not in QUANTIZED_DTYPES:
        raise ValueError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANTIZED_DTYPES)}")
    w32 = jnp.asarray(w, jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=contracted_axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / _QMAX[kind], 1.0)
    q = w32 / scale
    if kind == "int8":
        q = jnp.clip(jnp.round(q), -127, 127)
    return QuantizedArray(q.astype(QUANTIZED_DTYPES[kind]), scale)


def quantize_params(params, kind: str):
    """A copy of `params` with every matmul weight and the embedding quantized; norms stay as they are."""
    if kind not in QUANTIZED_DTYPES:
        raise ValueError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANTIZED_DTYPES)}")

    def convert(path, leaf):
        name = path[-1].key
        if name not in CONTRACTED_AXES:
            return leaf
        return _quantize_jit(leaf, CONTRACTED_AXES[name], kind)

    return jax.tree_util.tree_map_with_path(convert, params)


_quantize_jit = jax.jit(quantize, static_argnums=(1, 2))


def dequantize_params(params, dtype):
    """The tree with every QuantizedArray replaced by its dequantized array (tests, export)."""
    return jax.tree.map(lambda x: x.astype(dtype) if isinstance(x, QuantizedArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QuantizedArray))


def param_bytes(params) -> int:
    """Bytes the parameter tree holds (values and scales)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


__all__ = ["QuantizedArray", "quantize", "quantize_params", "dequantize_params", "param_bytes",
           "QUANTIZED_DTYPES", "CONTRACTED_AXES"]
