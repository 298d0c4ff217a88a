"""Shared test helpers: random parameters with O(1) logits, and the HF transformers twin of a model."""

import dataclasses
import random

import jax
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.convert.keymap import HF_KEYS, export_tensors
from llama_jax.params import param_shapes


def random_params(cfg: LlamaConfig, seed: int = 0):
    """Weights ~N(0, 0.1) and norm scales ~1 +- 0.2: large enough that logits are O(1-10), so a
    wrong rotary, mask or norm shows up well above float32 noise (0.02-std init gives ~0 logits)."""
    shapes = param_shapes(cfg)  # shapes and dtypes only: no init program to compile
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        value = 1.0 + 0.2 * noise if is_norm else 0.1 * noise
        out.append(jax.numpy.asarray(value, dtype=leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def hf_model(cfg: LlamaConfig, params):
    """transformers.LlamaForCausalLM in float32 holding exactly `params`."""
    import torch
    import transformers

    hf_config = {k: v for k, v in cfg.to_hf_config(dtype="float32").items() if k not in ("architectures",)}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    state = {name: torch.from_numpy(np.array(value, np.float32)) for name, value in export_tensors(HF_KEYS, cfg, params)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (cfg.tie_embeddings and k == "lm_head.weight")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def f32(cfg: LlamaConfig) -> LlamaConfig:
    return dataclasses.replace(cfg, dtype="float32", param_dtype="float32")


def random_unicode_texts(seed: int, count: int, extra: tuple[str, ...] = ()) -> list[str]:
    """Short strings of 0-79 characters that stress a tokenizer's split regex: ASCII, unusual
    whitespace, zero-width joiners, CJK-range and emoji code points, contractions, digit runs."""
    rng = random.Random(seed)
    alphabet = (
        [chr(c) for c in range(0x20, 0x7F)]
        + list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000\u200b\u200d\ufe0f")
        + [chr(rng.randrange(0xA0, 0x3000)) for _ in range(200)]
        + [chr(rng.randrange(0x1F300, 0x1FAFF)) for _ in range(50)]
        + ["'s", "'LL", "123", *extra]
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80))) for _ in range(count)]
