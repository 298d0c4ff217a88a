"""Checkpoints in other formats, built the way their owners build them, for the converter tests.

The HF model is transformers' own LlamaForCausalLM with random weights; its Meta twin is derived
here with the well-known q/k row permutation written out in torch (not llama_jax's key map), then
split into model-parallel shards by llama_models' own `reshard_mp`.
"""

from __future__ import annotations

import base64
import json
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import transformers

VOCAB = 512  # 256 byte tokens + Llama 3's 256 special tokens
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, norm_eps=1e-5,
            rope_theta=500000.0)
LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# name -> (params.json, the HF config.json of the same model). 3.0: untied, no rope scaling;
# 3.1: rope scaling 8; 3.2: tied embeddings, rope scaling 32.
VERSIONS = {
    "3.0": (dict(TINY), dict(tie_word_embeddings=False, rope_scaling=None)),
    "3.1": (dict(TINY, use_scaled_rope=True),
            dict(tie_word_embeddings=False, rope_scaling=dict(LLAMA3_ROPE, factor=8.0))),
    "3.2": (dict(TINY, use_scaled_rope=True),
            dict(tie_word_embeddings=True, rope_scaling=dict(LLAMA3_ROPE, factor=32.0))),
}
ROPE_FACTOR = {"3.0": None, "3.1": 8.0, "3.2": 32.0}
HIDDEN = 192  # Meta's rule for dim 64, multiple_of 32: 32 * ceil(int(2 * 256 / 3) / 32)


def hf_config(version: str, **overrides) -> dict:
    params, extra = VERSIONS[version]
    config = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=params["vocab_size"],
        hidden_size=params["dim"], intermediate_size=HIDDEN, num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"], num_key_value_heads=params["n_kv_heads"], hidden_act="silu",
        max_position_embeddings=131072 if extra["rope_scaling"] else 8192, rms_norm_eps=params["norm_eps"],
        rope_theta=params["rope_theta"],
        bos_token_id=256, eos_token_id=257, torch_dtype="float32", **extra)
    return config | overrides


def hf_model(version: str, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """Random weights ~N(0, 0.1), norms ~1 +- 0.2: logits O(1-10), so layout errors show."""
    config = hf_config(version, **overrides)
    config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt, steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(hf_logits(model, [tokens])[0, -1].argmax()))
    return tokens[len(prompt):]


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half q/k row order -> Meta's interleaved pairs (inverse of HF's conversion script's permute)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state_dict(model: transformers.LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Meta's names and layout; tied models keep an output copy, as Meta's do."""
    cfg = model.config
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"].clone()}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for theirs, ours in names.items():
            w = hf[f"model.layers.{i}.{theirs}.weight"]
            if theirs == "self_attn.q_proj":
                w = _unpermute(w, cfg.num_attention_heads)
            elif theirs == "self_attn.k_proj":
                w = _unpermute(w, cfg.num_key_value_heads)
            out[f"layers.{i}.{ours}.weight"] = w
    return out


def meta_reshard_mp():
    """llama_models.checkpoint.reshard_mp, Meta's own resharding. Its module imports fairscale's
    model-parallel state at the top, which reshard_mp never uses: stub it for the import."""
    initialize = types.ModuleType("fairscale.nn.model_parallel.initialize")
    initialize.get_model_parallel_rank = initialize.get_model_parallel_world_size = lambda: 0
    stubs = {"fairscale": types.ModuleType("fairscale"), "fairscale.nn": types.ModuleType("fairscale.nn"),
             "fairscale.nn.model_parallel": types.ModuleType("fairscale.nn.model_parallel"),
             "fairscale.nn.model_parallel.initialize": initialize}
    with mock.patch.dict(sys.modules, stubs):
        sys.modules.pop("llama_models.checkpoint", None)
        from llama_models.checkpoint import reshard_mp
    return reshard_mp


def shard(state: dict[str, torch.Tensor], n_kv_heads: int, n_shards: int, kv_layout: str = "tiled") -> list[dict]:
    """Split one full state dict into `n_shards` model-parallel shards with Meta's reshard_mp.

    kv_layout, when n_shards > n_kv_heads: "tiled" is reshard_mp splitting the full dict directly
    (shard s holds kv head s % n_kv_heads); "grouped" goes through n_kv_heads shards first, as
    Meta's 405B MP16 comes from MP8 (shard s holds kv head s // (n_shards / n_kv_heads)).
    """
    reshard_mp = meta_reshard_mp()
    if kv_layout == "grouped" and n_shards > n_kv_heads:
        first = shard(state, n_kv_heads, n_kv_heads)
        r = n_shards // n_kv_heads
        return [reshard_mp([first[s // r]], size=r, rank=s % r, repeat_qk_qv=r) for s in range(n_shards)]
    if n_shards == 1:
        return [dict(state)]
    return [reshard_mp([state], size=n_shards, rank=s, repeat_qk_qv=max(n_shards // n_kv_heads, 1))
            for s in range(n_shards)]


def byte_tokenizer(path: Path) -> Path:
    """A Llama 3 tiktoken file of the 256 single bytes: with its 256 special tokens, 512 ids."""
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def write_meta(directory: Path, version: str, model, n_shards: int, *, dtype=torch.float32,
               kv_layout: str = "tiled", tokenizer: bool = True) -> Path:
    """A Meta download of `model`: params.json, consolidated.NN.pth, tokenizer.model."""
    directory.mkdir(parents=True)
    params = VERSIONS[version][0]
    (directory / "params.json").write_text(json.dumps(params))
    state = {k: v.to(dtype) for k, v in meta_state_dict(model).items()}
    for i, piece in enumerate(shard(state, params["n_kv_heads"], n_shards, kv_layout)):
        torch.save(piece, directory / f"consolidated.{i:02d}.pth")
    if tokenizer:
        byte_tokenizer(directory / "tokenizer.model")
    return directory
