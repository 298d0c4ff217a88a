"""llama_jax.infer.load: one call from a checkpoint path to what the engine runs, the stored
config.json read once in it and once in a whole start of the infer CLI (the serve CLI's:
tests/serve/test_main.py); what each argument loads: test_cli.py and test_lora.py."""

import builtins
import io
import os
from pathlib import Path

import pytest

from llama_jax.infer.weights import DecodeParams
from llama_jax.infer.load import load_for_inference
from tests.infer.test_cli import run_cli
from tests.infer.test_lora import adapter_dir  # noqa: F401 (a fixture)


@pytest.fixture
def config_reads(monkeypatch):
    """Each config.json file opened while the test runs, by any reader (open, io.open, Path.read_text)."""
    reads, real_open = [], io.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "config.json":
            reads.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return reads


def test_one_load_reads_config_json_once(checkpoint_dir, adapter_dir, config_reads):  # noqa: F811
    seen = []
    model = load_for_inference(checkpoint_dir, quantize="int8", lora=adapter_dir, check_config=seen.append)
    assert config_reads == [(checkpoint_dir / "config.json").resolve()]
    assert isinstance(model.params, DecodeParams) and model.path == checkpoint_dir and model.mesh is None
    assert [cfg.max_seq_len for cfg in seen] == [model.cfg.max_seq_len]  # the stored config, once


def test_an_infer_start_reads_config_json_once(capsys, checkpoint_dir, config_reads):
    status, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "hi", "--temperature", "0",
                               "--max-new-tokens", "2", "--quantize", "int8")
    assert (status, err) == (0, "") and len(config_reads) == 1


def test_a_check_of_the_caller_fails_before_the_tokenizer_and_weights_load(checkpoint_dir, monkeypatch):
    from llama_jax import checkpoint, infer

    def fail(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr(checkpoint, "load", fail)
    monkeypatch.setattr(infer.load, "load_tokenizer", fail)

    def too_short(cfg):
        raise ValueError(f"context {cfg.max_seq_len}")

    with pytest.raises(ValueError, match="^context 64$"):
        load_for_inference(checkpoint_dir, check_config=too_short)
