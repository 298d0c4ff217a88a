"""LlamaConfig: presets against published sizes and HF's own parameter count, readers, validation."""

import base64
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, matching_preset

PUBLISHED_BILLIONS = {
    "llama3-8b": 8.03, "llama3.1-8b": 8.03, "llama3-70b": 70.6, "llama3.1-70b": 70.6,
    "llama3.1-405b": 405.9, "llama3.2-1b": 1.24, "llama3.2-3b": 3.21,
}

# Meta's params.json of the released downloads (no rope factor in any of them).
META_PARAMS = {
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_preset_sizes_match_published(name):
    assert PRESETS[name].num_params() / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.005)


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b", "llama3.2-3b"])
def test_preset_count_equals_hf_model_on_meta_device(name):
    """HF builds the same architecture from our to_hf_config (no memory: torch's meta device)."""
    import torch
    import transformers

    cfg = PRESETS[name]
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_ffn_width_follows_meta_rule():
    assert [PRESETS[n].hidden_dim for n in ("llama3-8b", "llama3-70b", "llama3.1-405b", "llama3.2-1b", "llama3.2-3b")] \
        == [14336, 28672, 53248, 8192, 8192]
    assert dataclasses.replace(PRESETS["tiny"], ffn_hidden_dim=100).hidden_dim == 100


def test_meta_params_take_rope_factor_from_matching_preset():
    assert LlamaConfig.from_meta_params(META_PARAMS["llama3.2-1b"]).rope_scaling.factor == 32.0
    cfg31 = LlamaConfig.from_meta_params(META_PARAMS["llama3.1-8b"])
    assert cfg31.rope_scaling.factor == 8.0 and cfg31.max_seq_len == 131072
    cfg30 = LlamaConfig.from_meta_params(META_PARAMS["llama3-8b"])
    assert cfg30.rope_scaling is None and cfg30.max_seq_len == 8192
    assert cfg30 == PRESETS["llama3-8b"]
    assert LlamaConfig.from_meta_params(META_PARAMS["llama3.2-1b"]) == PRESETS["llama3.2-1b"]
    overridden = LlamaConfig.from_meta_params(META_PARAMS["llama3.2-1b"], rope_scaling_factor=8)
    assert overridden.rope_scaling.factor == 8.0


def test_meta_params_file_and_errors(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(META_PARAMS["llama3.1-8b"]))
    assert LlamaConfig.from_meta_params(path) == PRESETS["llama3.1-8b"]
    unknown_shape = dict(META_PARAMS["llama3.1-8b"], n_layers=3)
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        LlamaConfig.from_meta_params(unknown_shape)
    assert LlamaConfig.from_meta_params(unknown_shape, rope_scaling_factor=8).n_layers == 3
    with pytest.raises(ValueError, match="vision_chunk_size"):
        LlamaConfig.from_meta_params(dict(META_PARAMS["llama3-8b"], vision_chunk_size=560))
    with pytest.raises(ValueError, match="missing required key 'dim'"):
        LlamaConfig.from_meta_params({"n_layers": 2})
    with pytest.raises(ValueError, match="no such file"):
        LlamaConfig.from_meta_params(tmp_path / "absent.json")


def test_meta_params_take_bos_and_eos_from_the_tokenizer_beside_them(tmp_path):
    small = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, norm_eps=1e-5,
                 rope_theta=500000.0)
    (tmp_path / "params.json").write_text(json.dumps(small))
    with pytest.raises(ValueError, match="vocab_size 512 cannot hold Llama 3's bos/eos ids and no tokenizer.model "
                                         "is beside it to name them: pass bos_id and eos_id"):
        LlamaConfig.from_meta_params(tmp_path / "params.json")
    # A 256-byte tiktoken vocabulary: its specials, <|begin_of_text|> first, follow at 256.
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    cfg = LlamaConfig.from_meta_params(tmp_path / "params.json")
    assert (cfg.bos_id, cfg.eos_id, cfg.vocab_size) == (256, 257, 512)
    named = LlamaConfig.from_meta_params(tmp_path / "params.json", bos_id=1, eos_id=2)
    assert (named.bos_id, named.eos_id) == (1, 2)
    assert LlamaConfig.from_meta_params(small, bos_id=1, eos_id=2).bos_id == 1


def same_model(a: LlamaConfig, b: LlamaConfig) -> bool:
    """Same architecture: HF configs carry the MLP width itself, not Meta's rule that gives it."""
    fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "norm_eps", "rope_theta",
              "rope_scaling", "max_seq_len", "tie_embeddings", "bos_id", "eos_id")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


HF_V4 = {  # transformers 4.x config.json of Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_hf_config_v4_and_v5_keys_agree():
    v4 = LlamaConfig.from_hf_config(HF_V4)
    assert v4.rope_scaling == RopeScaling(factor=32.0) and v4.param_dtype == "bfloat16" and v4.tie_embeddings
    v5 = {k: v for k, v in HF_V4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5.update(dtype="bfloat16", rope_parameters=dict(HF_V4["rope_scaling"], rope_theta=500000.0))
    assert LlamaConfig.from_hf_config(v5) == v4
    assert same_model(v4, PRESETS["llama3.2-1b"])


def test_hf_config_written_by_installed_transformers_round_trips(tmp_path):
    import transformers

    cfg = PRESETS["llama3.1-70b"]
    hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    hf.save_pretrained(tmp_path)
    back = LlamaConfig.from_hf_config(tmp_path)
    assert same_model(back, cfg) and back.param_dtype == cfg.param_dtype


def test_hf_config_errors():
    with pytest.raises(ValueError, match="unknown rope type 'yarn'"):
        LlamaConfig.from_hf_config(dict(HF_V4, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="model_type is 'mistral'"):
        LlamaConfig.from_hf_config(dict(HF_V4, model_type="mistral"))
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        LlamaConfig.from_hf_config({k: v for k, v in HF_V4.items() if k != "hidden_size"})


def test_dtype_fields_accept_strings_and_dtypes():
    cfg = dataclasses.replace(PRESETS["llama3-8b"], dtype="float32")
    assert cfg.dtype == "float32" and cfg.compute_dtype == jnp.float32
    assert dataclasses.replace(cfg, dtype="bf16", param_dtype=jnp.bfloat16).param_dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype: unknown dtype 'float8x'"):
        dataclasses.replace(cfg, dtype="float8x")
    with pytest.raises(ValueError, match="param_dtype: int8 is not a floating dtype"):
        dataclasses.replace(cfg, param_dtype="int8")


@pytest.mark.parametrize("change, message", [
    (dict(n_heads=8, n_kv_heads=3), r"n_heads \(8\) is not divisible by n_kv_heads \(3\)"),
    (dict(dim=66), r"dim \(66\) is not divisible by n_heads \(4\)"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(attention_impl="flash"), "attention_impl must be one of"),
    (dict(remat="everything"), "remat must be one of"),
    (dict(eos_id=10_000), r"eos_id \(10000\) is outside the vocabulary"),
    (dict(rope_scaling=dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)), "high_freq_factor"),
])
def test_invalid_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["tiny"], **change)


def test_json_round_trip_and_unknown_fields():
    for cfg in PRESETS.values():
        assert LlamaConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown LlamaConfig field"):
        LlamaConfig.from_dict(dict(PRESETS["tiny"].to_dict(), n_experts=8))
    # Checkpoints written before the engine owned its layout say per_layer_params: false.
    assert LlamaConfig.from_dict(dict(PRESETS["tiny"].to_dict(), per_layer_params=False)) == PRESETS["tiny"]
    with pytest.raises(ValueError, match="unknown LlamaConfig field.*per_layer_params"):
        LlamaConfig.from_dict(dict(PRESETS["tiny"].to_dict(), per_layer_params=True))


def test_matching_preset_tells_3_0_from_3_1():
    assert matching_preset(PRESETS["llama3.1-8b"], scaled_rope=False) == "llama3-8b"
    assert matching_preset(PRESETS["llama3-8b"], scaled_rope=True) == "llama3.1-8b"
    assert matching_preset(PRESETS["tiny"]) is None
    with pytest.raises(ValueError, match="unknown preset 'llama3-7b'"):
        LlamaConfig.preset("llama3-7b")


def test_reading_a_config_imports_no_kernels():
    """A config (a CLI's flags, a converter) is read without importing the Pallas kernels."""
    code = ("import sys, llama_jax.config; print(sorted(m for m in sys.modules "
            "if m.startswith(('llama_jax.kernels', 'jax.experimental.pallas'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
