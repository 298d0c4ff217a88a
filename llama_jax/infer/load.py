"""A checkpoint loaded for inference, in one call: what `python -m llama_jax.infer`, `python -m
llama_jax.serve` and a Python program each start from.

    model = load_for_inference("ckpt/8b", mesh=make_mesh("tp8"), quantize="int8", lora="runs/qlora/adapters")
    generate(model.cfg, model.params, model.tokenizer, ["Why is the sky blue?"], mesh=model.mesh)

Every argument is checked against the checkpoint's stored config before a weight is read, each
failure a ValueError of one line (naming the CLI flag, as the CLIs print it), and config.json is
read once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import psutil
from jax.sharding import Mesh

from llama_jax import checkpoint, kernels, lora as lora_lib
from llama_jax.config import LlamaConfig, compute_dtype
from llama_jax.infer.weights import DecodeParams, decode_params
from llama_jax.infer.text import check_tokenizer
from llama_jax.quantize import QUANTIZED_DTYPES, quantize_params
from llama_jax.sharding.context import context_size
from llama_jax.sharding.mesh import mesh_str
from llama_jax.tokenizer import load_tokenizer, resolve_tokenizer


class InferenceModel(NamedTuple):
    cfg: LlamaConfig  # as it runs: the compute dtype, the weights' dtype, the attention implementation
    params: DecodeParams  # the engine's per-layer layout (weights.decode_params), placed on `mesh`
    tokenizer: object  # llama_jax.tokenizer.load_tokenizer's
    mesh: Mesh | None
    path: Path  # the checkpoint directory read (a training run's final model, given its --out)


def load_for_inference(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
                       quantize: str | None = None, lora: str | os.PathLike | None = None,
                       merge_lora: bool = False, tokenizer: str | os.PathLike | None = None,
                       attention_impl: str | None = None,
                       check_config: Callable[[LlamaConfig], None] | None = None) -> InferenceModel:
    """The checkpoint at `path` (or a training run's --out: its final model) ready for the engine.

    mesh: the weights split over it as the rules table says (dp, fsdp, tp; not cp); None: one device.
    dtype: compute dtype (config.compute_dtype's default: float32 on CPU, the stored one elsewhere);
    the weights are held in it, unless `quantize` ('int8', 'fp8': weight-only, from the stored
    weights without a float32 copy first). lora: an adapter directory (a LoRA run's OUT/adapters),
    served unmerged beside the (quantized) weights, or merged into them as they load (merge_lora,
    then quantized). tokenizer: a `--tokenizer` value (tokenizer.resolve_tokenizer); None: the
    checkpoint's. attention_impl: one of kernels.IMPLS, checked on this backend now.
    check_config: called with the stored config once these arguments are checked and before the
    tokenizer and the weights load: a caller's own limits against the model (the CLIs' token
    budgets against its context), so they fail first without reading config.json again.
    """
    path = checkpoint.find(path)
    stored = checkpoint.load_config(path)
    if quantize is not None and quantize not in QUANTIZED_DTYPES:
        raise ValueError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZED_DTYPES)}")
    if merge_lora and not lora:
        raise ValueError("--merge-lora needs --lora DIR")
    if lora:
        lora_lib.check_adapters(lora, base_config=stored, base_path=path)  # before any weight loads
    if attention_impl:
        kernels.resolve_impl(attention_impl)  # one line now, not a trace error mid-prefill
    if mesh is not None and context_size(mesh) > 1:
        raise ValueError(f"--mesh {mesh_str(mesh)}: context parallelism (cp) is for training; decoding splits over "
                         "dp, fsdp and tp")
    # Weights are held in the compute dtype (llama_jax.load's default too): a bfloat16 model then
    # holds half the bytes. Quantizing reads the stored weights as they are and converts them leaf by leaf.
    dtype = compute_dtype(dtype, stored.dtype)
    param_dtype = stored.param_dtype if quantize else dtype
    check_host_memory(stored, param_dtype, quantize)
    if check_config is not None:
        check_config(stored)
    tok = load_tokenizer(tokenizer_path(path, tokenizer))
    check_tokenizer(stored, tok)

    overrides = {"attention_impl": attention_impl} if attention_impl else {}
    cfg, params = checkpoint.load(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, stored_config=stored,
                                  **overrides)
    base = dict(base_config=stored, base_path=path, mesh=mesh)
    if lora and merge_lora:
        params = lora_lib.merge_from(lora, params, cfg, donate=True, **base)
    if quantize:
        params = quantize_params(params, quantize)
    if lora and not merge_lora:
        params = lora_lib.adapt_from(lora, params, cfg, **base)
    # The engine's per-layer layout, once for every generation; never two copies of the weights.
    cfg, params = decode_params(cfg, params, mesh, donate=True)
    return InferenceModel(cfg, params, tok, mesh, path)


def tokenizer_path(checkpoint_dir: Path, choice: str | os.PathLike | None = None) -> str | Path:
    """The tokenizer file `choice` names (what train and data accept too), else the checkpoint's own."""
    if choice:
        return resolve_tokenizer(str(choice))
    found = checkpoint.tokenizer_path(checkpoint_dir)
    if found is None:
        raise ValueError(f"{checkpoint_dir} has no tokenizer ({checkpoint.TOKENIZER_FILE} or tokenizer.json): "
                         f"pass --tokenizer PATH")
    return found


def check_host_memory(cfg: LlamaConfig, param_dtype: str, quantize: str | None) -> None:
    """On CPU a model larger than the free memory is killed by the kernel without a word: say so first."""
    if jax.default_backend() != "cpu":
        return
    available = psutil.virtual_memory().available
    n = cfg.num_params()
    need = n * np.dtype(param_dtype).itemsize + (n if quantize else 0)
    if need > available:
        held = f"{param_dtype} weights" + (f" and their {quantize} copy" if quantize else "")
        raise ValueError(f"this {n / 1e9:.3g}B-parameter model needs about {need / 1e9:.3g} GB for its {held}, "
                         f"but {available / 1e9:.3g} GB of memory is available: pass --dtype bfloat16 (half the "
                         f"bytes, slower on CPU) or --quantize int8")


__all__ = ["InferenceModel", "load_for_inference", "tokenizer_path"]
