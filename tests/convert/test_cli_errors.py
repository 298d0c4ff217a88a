"""`python -m llama_jax.convert`: every bad input gives one `error:` line naming the file and the
problem, exit status 1, and nothing at DST (no partial directory beside it either)."""

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_jax import checkpoint
from llama_jax.convert.__main__ import main
from tests.convert import sources


@functools.cache
def model(version="3.0"):
    return sources.hf_model(version)


def meta_src(tmp_path, n_shards=2, version="3.0"):
    return sources.write_meta(tmp_path / "meta", version, model(version), n_shards)


def hf_src(tmp_path, max_shard_size="100KB"):
    model().save_pretrained(tmp_path / "hf", max_shard_size=max_shard_size)
    return tmp_path / "hf"


def edit_shards(src, edit):
    for path in sorted(src.glob("consolidated.*.pth")):
        state = torch.load(path, weights_only=True)
        edit(path.name, state)
        torch.save(state, path)


def fails(capsys, dst, *argv, fragments):
    """Run the CLI, expecting failure; returns the error line."""
    capsys.readouterr()  # drop what building the source printed
    assert main([*argv, str(dst), "--quiet"]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if ".partial-" in p.name]
    return lines[0]


# Meta -----------------------------------------------------------------------------------------

def test_missing_shard(tmp_path, capsys):
    src = meta_src(tmp_path, 4)
    (src / "consolidated.01.pth").unlink()
    fails(capsys, tmp_path / "out", "meta", str(src), fragments=[f"{src}/consolidated.01.pth: missing shard"])


def test_missing_last_shard(tmp_path, capsys):
    src = meta_src(tmp_path, 4)
    (src / "consolidated.03.pth").unlink()
    fails(capsys, tmp_path / "out", "meta", str(src),
          fragments=[f"{src}/consolidated.03.pth: missing shard", "holds 1/4 of each split weight"])


def test_shard_count_that_does_not_divide_the_heads(tmp_path, capsys):
    src = meta_src(tmp_path, 2)
    shutil.copyfile(src / "consolidated.01.pth", src / "consolidated.02.pth")
    fails(capsys, tmp_path / "out", "meta", str(src), fragments=[str(src), "3 shards cannot split n_heads=4"])


def test_shapes_disagreeing_with_params_json(tmp_path, capsys):
    src = meta_src(tmp_path, 2)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps(params | {"ffn_dim_multiplier": 1.5}))
    fails(capsys, tmp_path / "out", "meta", str(src),
          fragments=[f"{src}/consolidated.00.pth: layers.", ".feed_forward.w", "params.json implies", "128",
                     "in each of 2 shards"])


def test_unknown_tensor(tmp_path, capsys):
    src = meta_src(tmp_path, 2)
    edit_shards(src, lambda name, state: state.update({"layers.0.attention.wqkv.weight": torch.zeros(2)}))
    fails(capsys, tmp_path / "out", "meta", str(src),
          fragments=[f"{src}/consolidated.00.pth: unknown tensor 'layers.0.attention.wqkv.weight'"])


def test_missing_tensor(tmp_path, capsys):
    src = meta_src(tmp_path, 2)
    edit_shards(src, lambda name, state: state.pop("layers.1.ffn_norm.weight") if name.endswith("01.pth") else None)
    fails(capsys, tmp_path / "out", "meta", str(src),
          fragments=[f"{src}/consolidated.01.pth: missing tensor 'layers.1.ffn_norm.weight'"])


def test_truncated_shard(tmp_path, capsys):
    src = meta_src(tmp_path, 2)
    data = (src / "consolidated.01.pth").read_bytes()
    (src / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
    fails(capsys, tmp_path / "out", "meta", str(src),
          fragments=[f"{src}/consolidated.01.pth: not a readable PyTorch checkpoint, truncated or damaged"])


class WritesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a malicious pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    src = meta_src(tmp_path, 1)
    marker = tmp_path / "marker"
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    torch.save(state | {"norm.weight": WritesMarker(marker)}, src / "consolidated.00.pth")
    shutil.copyfile(src / "consolidated.00.pth", tmp_path / "copy.pth")
    torch.load(tmp_path / "copy.pth", weights_only=False)  # the full unpickler does run it
    assert marker.exists()
    marker.unlink()

    fails(capsys, tmp_path / "out", "meta", str(src),
          fragments=[f"{src}/consolidated.00.pth: refused to load: its pickle calls io.open", "may be malicious"])
    assert not marker.exists()


def test_rope_scaling_factor_needed_for_unreleased_shapes(tmp_path, capsys):
    src = meta_src(tmp_path, 1, version="3.1")
    fails(capsys, tmp_path / "out", "meta", str(src), fragments=[f"{src}/params.json", "rope_scaling_factor"])


def test_not_a_meta_download(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(capsys, tmp_path / "out", "meta", str(tmp_path / "empty"),
          fragments=[f"{tmp_path}/empty/params.json: missing"])


def test_destination_exists(tmp_path, capsys):
    src = meta_src(tmp_path, 1)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["meta", str(src), str(dst), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {dst} already exists and is not empty" in err and "--overwrite" in err
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]

    assert main(["meta", str(src), str(dst), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params", "tokenizer.model"]


def test_destination_containing_the_source(tmp_path, capsys):
    src = meta_src(tmp_path, 1)
    assert main(["meta", str(src), str(tmp_path), "--quiet", "--overwrite"]) == 1
    assert "the destination contains the source" in capsys.readouterr().err
    assert (src / "params.json").exists()


# HF -------------------------------------------------------------------------------------------

def test_hf_missing_shard(tmp_path, capsys):
    src = hf_src(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    fails(capsys, tmp_path / "out", "hf", str(src),
          fragments=[f"{shard}: missing shard (listed in model.safetensors.index.json)"])


def test_hf_truncated_file(tmp_path, capsys):
    src = hf_src(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(capsys, tmp_path / "out", "hf", str(src), fragments=[f"{shard}: truncated"])


def test_hf_shapes_disagreeing_with_config_json(tmp_path, capsys):
    src = hf_src(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"intermediate_size": 256}))
    fails(capsys, tmp_path / "out", "hf", str(src),
          fragments=["model.layers.0.mlp.", "safetensors: ", "config.json implies (256, 64)"])


def test_hf_unknown_and_missing_tensors(tmp_path, capsys):
    src = hf_src(tmp_path, max_shard_size="50MB")
    state = load_file(src / "model.safetensors")
    save_file(state | {"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(2)}, src / "model.safetensors",
              metadata={"format": "pt"})
    fails(capsys, tmp_path / "out", "hf", str(src),
          fragments=[f"{src}/model.safetensors: unknown tensor 'model.layers.0.self_attn.qkv_proj.weight'"])

    del state["model.layers.1.post_attention_layernorm.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    fails(capsys, tmp_path / "out", "hf", str(src),
          fragments=[f"{src}: missing tensor 'model.layers.1.post_attention_layernorm.weight'"])


def test_hf_without_safetensors(tmp_path, capsys):
    src = hf_src(tmp_path)
    for path in src.glob("model*"):
        path.unlink()
    fails(capsys, tmp_path / "out", "hf", str(src), fragments=[f"{src}: no model.safetensors"])


def test_hf_destination_exists(tmp_path, capsys):
    src = hf_src(tmp_path)
    (tmp_path / "out").write_text("a file")
    assert main(["hf", str(src), str(tmp_path / "out"), "--quiet"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "a file"


def chat_model_src(tmp_path, hf_chat_model, edit_config=None):
    src = shutil.copytree(hf_chat_model, tmp_path / "chat")
    if edit_config is not None:
        path = src / "tokenizer_config.json"
        path.write_text(json.dumps(edit_config(json.loads(path.read_text()))))
    return src


def test_hf_unreadable_tokenizer_json(tmp_path, capsys, hf_chat_model):
    src = chat_model_src(tmp_path, hf_chat_model)
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    fails(capsys, tmp_path / "out", "hf", str(src),
          fragments=[f"{src}/tokenizer.json: the tokenizers library cannot read it"])


def test_hf_chat_template_that_does_not_parse(tmp_path, capsys, hf_chat_model):
    src = chat_model_src(tmp_path, hf_chat_model, lambda c: {**c, "chat_template": "{% if messages %}{{ x }"})
    fails(capsys, tmp_path / "out", "hf", str(src), fragments=[f"{src}", "the chat template does not parse"])


def test_hf_chat_template_that_raises(tmp_path, capsys, hf_chat_model):
    src = chat_model_src(tmp_path, hf_chat_model, lambda c: {**c, "chat_template": "{{ raise_exception('nope') }}"})
    fails(capsys, tmp_path / "out", "hf", str(src), fragments=[f"{src}", "chat template", "failed: nope"])


def test_hf_tokenizer_larger_than_the_model(tmp_path, capsys, hf_chat_model):
    src = chat_model_src(tmp_path, hf_chat_model)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    fails(capsys, tmp_path / "out", "hf", str(src),
          fragments=[f"{src}/tokenizer.json: {config['vocab_size']} tokens do not fit the model's vocab_size 100"])


# to-hf ----------------------------------------------------------------------------------------

def test_to_hf_errors(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    fails(capsys, tmp_path / "out", "to-hf", str(tmp_path / "nothing"),
          fragments=[f"{tmp_path}/nothing is not a llama_jax checkpoint"])
    fails(capsys, tmp_path / "out", "to-hf", str(tmp_path / "nothing"), "--max-shard-size", "lots",
          fragments=["max shard size 'lots'"])


def test_to_hf_destination_exists(tmp_path, capsys):
    ours = tmp_path / "ours"
    assert main(["meta", str(meta_src(tmp_path, 1)), str(ours), "--quiet"]) == 0
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["to-hf", str(ours), str(tmp_path / "out"), "--quiet"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err


# The command line itself ----------------------------------------------------------------------

def test_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in ("meta", "hf", "to-hf"))
    for command, phrase in (("meta", "--rope-scaling-factor"), ("hf", "tokenizer.json"), ("to-hf", "--max-shard-size")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert phrase in text and "--overwrite" in text and "--dtype" in text
    with pytest.raises(SystemExit) as exit_:
        main(["meta"])
    assert exit_.value.code == 2


def test_smoke_in_a_subprocess(tmp_path):
    src = meta_src(tmp_path, 2, version="3.2")
    dst = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "llama_jax.convert", "meta", str(src), str(dst),
                             "--rope-scaling-factor", "32", "--dtype", "bf16"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {dst}" and result.stderr == ""
    cfg, params = checkpoint.load(dst, dtype="bfloat16")
    assert cfg.tie_embeddings and cfg.param_dtype == "bfloat16" and params["norm"]["scale"].dtype == "bfloat16"


def test_missing_tokenizer_is_only_a_warning(tmp_path, capsys):
    src = hf_src(tmp_path)
    capsys.readouterr()
    assert main(["hf", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote {tmp_path / 'out'}\n"
    assert err == (f"warning: {src} has no original/tokenizer.model or tokenizer.json, so {tmp_path / 'out'} has no "
                   f"tokenizer: pass one when using it\n")
    assert checkpoint.tokenizer_path(tmp_path / "out") is None


def test_quantized_tensors_are_refused(tmp_path, capsys):
    src = meta_src(tmp_path, 1)
    edit_shards(src, lambda name, state: state.update({"layers.0.attention.wq.weight": torch.zeros(64, 64,
                                                                                                  dtype=torch.int8)}))
    fails(capsys, tmp_path / "out", "meta", str(src),
          fragments=[f"{src}/consolidated.00.pth: layers.0.attention.wq.weight is int8", "not quantized ones"])

    hf = hf_src(tmp_path, max_shard_size="50MB")
    state = load_file(hf / "model.safetensors")
    save_file(state | {"model.norm.weight": state["model.norm.weight"].to(torch.float64)}, hf / "model.safetensors",
              metadata={"format": "pt"})
    fails(capsys, tmp_path / "out", "hf", str(hf),
          fragments=[f"{hf}/model.safetensors: model.norm.weight has dtype F64", "quantized checkpoints are not"])
