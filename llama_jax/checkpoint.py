"""The self-contained checkpoint directory: everything needed to run a model, in one place.

    DIR/config.json       LlamaConfig as JSON (readable, editable)
    DIR/params/           Orbax checkpoint of the parameter tree
    DIR/tokenizer.model   the tokenizer, when known

`save` writes into a temporary directory beside DIR and renames it into place once complete, so an
interrupted save never leaves a half-written checkpoint at DIR.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.config import LlamaConfig
from llama_jax.model import param_shapes

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"


def check_params(cfg: LlamaConfig, params) -> None:
    """Raise ValueError naming the first parameter whose presence, shape or dtype disagrees with cfg."""
    expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(param_shapes(cfg))}
    actual = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    missing, unexpected = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or unexpected:
        raise ValueError(f"params do not match the config: missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    for name, want in expected.items():
        got = actual[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"param {name} has shape {tuple(got.shape)}, the config implies {tuple(want.shape)}")
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise ValueError(f"param {name} has dtype {np.dtype(got.dtype).name}, config.param_dtype is {cfg.param_dtype}")


def save(path: str | os.PathLike, cfg: LlamaConfig, params, tokenizer_path: str | os.PathLike | None = None,
         *, overwrite: bool = False) -> Path:
    """Write a checkpoint directory at `path`; returns its absolute path."""
    path = Path(path).absolute()
    check_params(cfg, params)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise ValueError(f"tokenizer file {tokenizer_path} does not exist")
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not empty (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        (staging / CONFIG_FILE).write_text(cfg.to_json() + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, staging / TOKENIZER_FILE)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load_config(path: str | os.PathLike) -> LlamaConfig:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise ValueError(f"{path} is not a llama_jax checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/ inside)")
    return LlamaConfig.from_json(path / CONFIG_FILE)


def load(path: str | os.PathLike, *, shardings=None, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Read (cfg, params). `shardings`: a tree of jax.sharding.Sharding matching the params (or
    one Sharding for every leaf) to restore straight into; default: the default device.
    `config_overrides` replace config fields that do not change shapes (e.g. dtype, attention_impl)."""
    path = Path(path).absolute()
    cfg = load_config(path)
    if config_overrides:
        import dataclasses
        cfg = dataclasses.replace(cfg, **config_overrides)
    shapes = param_shapes(cfg)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: params do not match {CONFIG_FILE} or are damaged ({first_line})") from e
    return cfg, params


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The tokenizer file inside a checkpoint directory, or None when it has none."""
    candidate = Path(path) / TOKENIZER_FILE
    return candidate if candidate.is_file() else None
