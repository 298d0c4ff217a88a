"""LlamaConfig: one frozen dataclass for every Llama 3 text model, its presets and its readers.

Sizes are in the vocabulary of Meta's `params.json` (dim, n_layers, n_heads, n_kv_heads,
multiple_of, ffn_dim_multiplier); derived sizes (head_dim, ffn_hidden_dim) are computed once in
`__post_init__`, where every invariant is checked with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.jsonfile import read_json_object, read_json_text

# The attention implementations, each described in kernels/__init__.py, whose dispatch table names the
# same ones: spelled here so that reading a config does not import the Pallas kernels.
ATTENTION_IMPLS = ("xla", "flash_xla", "cudnn", "splash", "pallas", "auto")
# cfg.remat -> the jax.checkpoint policy of each block under jax.grad, i.e. what the backward pass keeps
# rather than recomputes: "none" rematerialises nothing, "full" keeps nothing and recomputes the block.
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def canonical_dtype_name(value: Any, field: str) -> str:
    """'bf16', jnp.bfloat16, np.dtype('bfloat16') -> 'bfloat16'; raises naming `field`."""
    aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16"}
    if isinstance(value, str):
        value = aliases.get(value.lower(), value.lower())
    try:
        name = jnp.dtype(value).name
    except TypeError as e:
        raise ValueError(f"{field}: unknown dtype {value!r}") from e
    if name not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"{field}: {name} is not a floating dtype the model supports (bfloat16, float16, float32)")
    return name


def compute_dtype(requested: str | None, otherwise: str) -> str:
    """The dtype to compute in: `requested` when the caller names one; else float32 on a CPU
    backend, where XLA's bfloat16 matmuls are slow (bench/RESULTS.md, "Decode throughput", has the
    measurement); else `otherwise` (a checkpoint's stored dtype, a run's default).

    The one rule behind every default dtype: `llama_jax.load`, the infer CLI's --dtype and the
    train CLI's --dtype all ask it.
    """
    if requested is not None:
        return canonical_dtype_name(requested, "dtype")
    return "float32" if jax.default_backend() == "cpu" else otherwise


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 'llama3' frequency scaling of the rotary embedding.

    Wavelengths shorter than original_context / high_freq_factor keep their frequency, longer
    than original_context / low_freq_factor are divided by `factor`, and the band between is a
    linear blend. 3.1 uses factor 8; 3.2 1B/3B use factor 32.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be > 0")


# Fields that config.json files written by earlier versions hold, with the only value they could
# hold there, read as absent. per_layer_params (always false in a checkpoint) was decoding's
# layer layout, now the inference engine's own (infer/weights.py).
_RETIRED_FIELDS = {"per_layer_params": False}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    # Meta's SwiGLU width rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of.
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    # An explicit width (HF's intermediate_size) wins over the rule when given.
    ffn_hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; "auto": the fastest path verified on the backend
    attention_interpret: bool = False  # run the Pallas kernels in the interpreter (any backend: tests)
    scan_layers: bool = True  # lax.scan over layers (fast compiles); False unrolls the same params
    remat: str = "none"  # rematerialisation policy of each block under jax.grad
    # Token ids of the tokenizer this model was trained with.
    bos_id: int = 128000
    eos_id: int = 128001

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("dtype", canonical_dtype_name(self.dtype, "dtype"))
        set_("param_dtype", canonical_dtype_name(self.param_dtype, "param_dtype"))
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim ({self.dim // self.n_heads}) must be even for rotary embeddings")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim <= 0:
            raise ValueError(f"ffn_hidden_dim must be > 0, got {self.ffn_hidden_dim}")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} ({getattr(self, name)}) is outside the vocabulary [0, {self.vocab_size})")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the SwiGLU MLP (Meta's FeedForward rule unless ffn_hidden_dim is set)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def num_params(self) -> int:
        d, f, hd = self.dim, self.hidden_dim, self.head_dim
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attention + 3 * d * f + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + embeddings + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        Matmul FLOPs are 6 per weight that a token touches (the input embedding is a gather, not a
        matmul); causal attention adds 6 * n_layers * seq_len * dim (QK^T and PV, halved by causality).
        """
        matmul_params = self.num_params() - self.vocab_size * self.dim * (0 if self.tie_embeddings else 1)
        attention = 6 * self.n_layers * seq_len * self.dim
        return 6 * matmul_params + attention

    # Serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if not (k in _RETIRED_FIELDS and v == _RETIRED_FIELDS[k])}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown LlamaConfig field(s): {', '.join(unknown)}")
        values = dict(values)
        if values.get("rope_scaling") is not None:
            values["rope_scaling"] = _rope_scaling_from_dict(values["rope_scaling"], "rope_scaling")
        return cls(**values)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "LlamaConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = read_json_text(text_or_path)
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from e

    # Readers of Meta and Hugging Face configs -----------------------------------------------
    @classmethod
    def from_meta_params(cls, params: str | os.PathLike | dict, *, rope_scaling_factor: float | None = None,
                         **overrides) -> "LlamaConfig":
        """Read Meta's `params.json` (a path or its dict).

        `params.json` says `use_scaled_rope: true` but carries no factor (Meta's reference code
        hard-codes 8, wrong for the 3.2 1B/3B models which use 32): the factor comes from the
        preset whose shapes match, or from `rope_scaling_factor` when given.

        Nor does it name bos and eos: unless `bos_id` and `eos_id` are given, they come from the
        `tokenizer.model` beside a params.json path, else they are Llama 3's (which a vocabulary
        too small to hold them refuses in one line).
        """
        raw = read_json_object(params) if not isinstance(params, dict) else dict(params)
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"params.json: unsupported key(s) {', '.join(unknown)} (text models only, unquantized)")
        for key in ("dim", "n_layers", "n_heads", "vocab_size"):
            if key not in raw:
                raise ValueError(f"params.json: missing required key {key!r}")
        values = dict(
            vocab_size=raw["vocab_size"], dim=raw["dim"], n_layers=raw["n_layers"], n_heads=raw["n_heads"],
            n_kv_heads=raw.get("n_kv_heads") or raw["n_heads"], multiple_of=raw.get("multiple_of", 256),
            ffn_dim_multiplier=raw.get("ffn_dim_multiplier"), norm_eps=raw.get("norm_eps", 1e-5),
            rope_theta=raw.get("rope_theta", 500000.0),
        )
        if not {"bos_id", "eos_id"} <= overrides.keys():
            values.update(_meta_tokenizer_ids(None if isinstance(params, dict) else Path(params).parent,
                                              values["vocab_size"]))
        scaled = bool(raw.get("use_scaled_rope", False))
        preset_name = matching_preset({**values, **overrides}, scaled_rope=scaled)
        preset = PRESETS[preset_name] if preset_name else None
        if scaled:
            if rope_scaling_factor is not None:
                values["rope_scaling"] = RopeScaling(factor=float(rope_scaling_factor))
            elif preset is not None:
                values["rope_scaling"] = preset.rope_scaling
            else:
                raise ValueError(
                    "params.json sets use_scaled_rope but carries no scaling factor, and its shapes match no "
                    "released Llama 3 model: pass rope_scaling_factor (8 for 3.1, 32 for 3.2 1B/3B)"
                )
        if preset is not None:
            values.update(max_seq_len=preset.max_seq_len, tie_embeddings=preset.tie_embeddings)
        else:
            values["max_seq_len"] = raw.get("max_seq_len", 131072 if scaled else 8192)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | dict, **overrides) -> "LlamaConfig":
        """Read an HF `config.json` (a path, or a dir holding one, or its dict).

        Accepts transformers 4.x keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x keys
        (`rope_parameters`, `dtype`). The checkpoint's dtype becomes `param_dtype`.
        """
        if isinstance(config, dict):
            raw = dict(config)
        else:
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            raw = read_json_object(path)
        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json: model_type is {model_type!r}, expected 'llama'")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in raw:
                raise ValueError(f"config.json: missing required key {key!r}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (Llama uses silu)")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ValueError("config.json: attention_bias / mlp_bias are not part of Llama 3")
        head_dim = raw.get("head_dim")
        if head_dim is not None and head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
            raise ValueError(
                f"config.json: head_dim {head_dim} x num_attention_heads {raw['num_attention_heads']} != "
                f"hidden_size {raw['hidden_size']}"
            )

        rope = raw.get("rope_parameters")  # transformers 5.x: theta and scaling in one dict
        if rope is not None:
            rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
            scaling = rope if rope.get("rope_type", "default") != "default" else None
        else:
            rope_theta = raw.get("rope_theta", 10000.0)
            scaling = raw.get("rope_scaling")
        rope_scaling = _rope_scaling_from_dict(scaling, "config.json rope_scaling") if scaling else None

        eos = raw.get("eos_token_id", 128001)
        eos = eos[0] if isinstance(eos, list) else eos
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        values = dict(
            vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
            n_heads=raw["num_attention_heads"],
            n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            ffn_hidden_dim=raw["intermediate_size"], norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            max_seq_len=raw.get("max_position_embeddings", 8192),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            param_dtype=dtype, bos_id=raw.get("bos_token_id", 128000) or 0, eos_id=eos if eos is not None else 0,
        )
        values.update(overrides)
        return cls(**values)

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """An HF `config.json` dict (transformers 4.x key names, which 5.x also reads)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "torch_dtype": dtype or self.param_dtype,
        }

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _meta_tokenizer_ids(download: Path | None, vocab_size: int) -> dict[str, int]:
    """bos_id and eos_id of the tokenizer.model in Meta's download directory; {} (Llama 3's ids,
    the defaults) when there is none and they fit the vocabulary."""
    tokenizer_file = download / "tokenizer.model" if download is not None else None
    if tokenizer_file is not None and tokenizer_file.is_file():
        from llama_jax.tokenizer import load_tokenizer  # tiktoken / sentencepiece, only when reading one

        tokenizer = load_tokenizer(tokenizer_file)
        return {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    if isinstance(vocab_size, int) and 0 < vocab_size <= max(LlamaConfig.bos_id, LlamaConfig.eos_id):  # Llama 3's
        raise ValueError(f"params.json: vocab_size {vocab_size} cannot hold Llama 3's bos/eos ids and no "
                         f"tokenizer.model is beside it to name them: pass bos_id and eos_id")
    return {}


def _rope_scaling_from_dict(raw: dict | RopeScaling, where: str) -> RopeScaling:
    if isinstance(raw, RopeScaling):
        return raw
    raw = dict(raw)
    rope_type = raw.pop("rope_type", raw.pop("type", "llama3"))
    if rope_type != "llama3":
        raise ValueError(f"{where}: unknown rope type {rope_type!r} (Llama 3 uses 'llama3' or none)")
    raw.pop("rope_theta", None)
    names = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return RopeScaling(**raw)


_SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")


def matching_preset(values: dict | LlamaConfig, *, scaled_rope: bool | None = None) -> str | None:
    """Name of the released (non-test) preset whose shapes equal these, or None.

    3.0 and 3.1 share shapes; `scaled_rope` (params.json's use_scaled_rope) tells them apart.
    """
    cfg = values if isinstance(values, LlamaConfig) else LlamaConfig(**values)
    for name, preset in PRESETS.items():
        if name.startswith("tiny"):
            continue
        if scaled_rope is not None and (preset.rope_scaling is not None) != scaled_rope:
            continue
        if all(getattr(cfg, f) == getattr(preset, f) for f in _SHAPE_FIELDS):
            return name
    return None


_L31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_L32 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
_TINY = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256,
             dtype="float32", bos_id=1, eos_id=2)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(**_8B, rope_scaling=_L31, max_seq_len=131072),
    "llama3.1-70b": LlamaConfig(**_70B, rope_scaling=_L31, max_seq_len=131072),
    "llama3.1-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                                 ffn_dim_multiplier=1.2, rope_scaling=_L31, max_seq_len=131072),
    "llama3-8b": LlamaConfig(**_8B, max_seq_len=8192),
    "llama3-70b": LlamaConfig(**_70B, max_seq_len=8192),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                               ffn_dim_multiplier=1.5, rope_scaling=_L32, max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
                               ffn_dim_multiplier=1.0, rope_scaling=_L32, max_seq_len=131072, tie_embeddings=True),
    # Test presets: a few hundred thousand parameters, float32, shaped like each generation.
    "tiny": LlamaConfig(**_TINY),
    "tiny-3.1": LlamaConfig(**_TINY | dict(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64))),
    "tiny-3.2": LlamaConfig(**_TINY | dict(n_kv_heads=4, tie_embeddings=True,
                                          rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=64))),
    # The trainer's default demo model: `tiny` widened to 0.87M parameters over a byte-level vocabulary
    # (256 bytes + Meta's 256 special tokens = 512; bos/eos are the first two specials), so it learns
    # visible structure on a laptop CPU in minutes. With Llama 3's 128k-token vocabulary, 98% of a model
    # this size would be embeddings and each step would cost ~18x the FLOPs.
    "tiny-bytes": LlamaConfig(**_TINY | dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=1024,
                                            bos_id=256, eos_id=257)),
}


__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "matching_preset", "canonical_dtype_name", "compute_dtype"]
