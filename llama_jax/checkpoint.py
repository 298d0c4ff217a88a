"""The self-contained checkpoint directory: everything needed to run a model, in one place.

    DIR/config.json       LlamaConfig as JSON (readable, editable)
    DIR/params/           Orbax checkpoint of the parameter tree: a causal LM's, or a reward model's, whose
                          `score` in place of `output` is what tells the two apart (model.HEADS)
    DIR/tokenizer.model   the tokenizer, when known: Llama 3's (tiktoken) or Llama 2's (sentencepiece);
    DIR/tokenizer.json    or, for another model, its Hugging Face tokenizer files as it ships them
                          (with tokenizer_config.json, chat_template.jinja, generation_config.json)

A training run's output directory (`python -m llama_jax.train --out OUT`) holds its final model in
OUT/model; every reader here accepts OUT for it.

`save` writes into a temporary directory beside DIR and renames it into place once complete, so an
interrupted save never leaves a half-written checkpoint at DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.config import LlamaConfig, compute_dtype
from llama_jax.params import head_of, param_shapes, param_shardings
from llama_jax.tokenizer import TOKENIZER_MODEL, find_tokenizer, tokenizer_files

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = TOKENIZER_MODEL
# A training run's --out directory: its train states (train/loop.py), then its final model.
TRAIN_STATES_DIR = "checkpoints"
TRAINED_MODEL_DIR = "model"


def check_params(cfg: LlamaConfig, params, *, what: str = "params") -> None:
    """Raise ValueError naming the first parameter whose presence, shape or dtype disagrees with cfg.
    `params` may be arrays or anything with .shape and .dtype (ShapeDtypeStruct, Orbax metadata), of
    a causal LM or a reward model (params.head_of)."""
    shapes = param_shapes(cfg, head_of(params))
    expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(shapes)}
    actual = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    missing, unexpected = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} do not match the config: missing {missing or 'none'}, "
                         f"unexpected {unexpected or 'none'}")
    for name, want in expected.items():
        got = actual[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{what}: param {name} has shape {tuple(got.shape)}, the config implies "
                             f"{tuple(want.shape)}")
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise ValueError(f"{what}: param {name} has dtype {np.dtype(got.dtype).name}, config.param_dtype is "
                             f"{cfg.param_dtype}")


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside `path` to fill; once the block completes it replaces `path`.

    Raises ValueError before yielding when `path` exists and is not empty (a file, or a directory
    with entries) and `overwrite` is false. On any exception the partial directory is removed, so
    nothing is ever left at `path` half-written.

    With several JAX processes, every process must enter the block (each writes its own shards):
    they share one staging directory, named after `path`, and only process 0 creates, renames or
    removes it, between barriers.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not empty (pass overwrite=True, or --overwrite, to replace it)")
    primary, several = jax.process_index() == 0, jax.process_count() > 1
    if several:
        staging = path.with_name(f".{path.name}.partial")
        if primary:
            shutil.rmtree(staging, ignore_errors=True)  # left by a job killed mid-save
            staging.mkdir(parents=True)
        _barrier(f"staged_directory:{path}:created")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
        _barrier(f"staged_directory:{path}:written")
        if primary:
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(staging, path)
        _barrier(f"staged_directory:{path}:renamed")
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_metadata(directory: str | os.PathLike, cfg: LlamaConfig,
                   tokenizer_path: str | os.PathLike | None = None) -> None:
    """config.json, and the tokenizer's files when given: the checkpoint directory beside params/."""
    directory = Path(directory)
    (directory / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    if tokenizer_path is not None:
        copy_tokenizer(tokenizer_path, directory)


def copy_tokenizer(tokenizer_path: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Copy every file of the tokenizer at `tokenizer_path` into `directory` under its checkpoint name
    (`tokenizer_files`); a file already in place stays."""
    for name, source in tokenizer_files(tokenizer_path).items():
        target = Path(directory) / name
        if Path(source).absolute() != target.absolute():
            shutil.copyfile(source, target)


def save(path: str | os.PathLike, cfg: LlamaConfig, params, tokenizer_path: str | os.PathLike | None = None,
         *, overwrite: bool = False) -> Path:
    """Write a checkpoint directory at `path`; returns its absolute path. With several JAX
    processes, call it in every process: each writes its own shards."""
    path = Path(path).absolute()
    check_params(cfg, params)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise ValueError(f"tokenizer file {tokenizer_path} does not exist")
    with staged_directory(path, overwrite=overwrite) as staging:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            write_metadata(staging, cfg, tokenizer_path)
    return path


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / PARAMS_DIR).is_dir()


def find(path: str | os.PathLike) -> Path:
    """The checkpoint directory `path` names: itself, or the final model inside a training run's
    --out directory (with a one-line note on stderr). ValueError with a one-line reason otherwise."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    trained = path / TRAINED_MODEL_DIR
    if is_checkpoint(trained):
        print(f"note: {path} is a training run's directory: using its final model, {trained}", file=sys.stderr)
        return trained
    if (path / CONFIG_FILE).is_file() and (path / TRAIN_STATES_DIR).is_dir():
        raise ValueError(f"{path} is a training run's directory without its final model: pass {trained} once "
                         f"the run completes (it is written after the last step)")
    raise ValueError(f"{path} is not a llama_jax checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/ inside)")


def load_config(path: str | os.PathLike) -> LlamaConfig:
    return LlamaConfig.from_json(find(path) / CONFIG_FILE)


def _stored_params(path: Path):
    """The Orbax metadata tree of DIR/params (shapes and dtypes, no arrays)."""
    try:
        return ocp.StandardCheckpointer().metadata(path / PARAMS_DIR).item_metadata
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise ValueError(f"{path}/{PARAMS_DIR}: unreadable Orbax checkpoint ({_first_line(e)})") from e


def stored_head(path: str | os.PathLike) -> str:
    """"score" for a reward model's checkpoint, "lm" for a causal LM's; reads no arrays."""
    return head_of(_stored_params(find(path).absolute()))


def check_head(path: str | os.PathLike, stored: str, expected: str) -> None:
    """One line when a checkpoint is not the kind of model its caller needs."""
    if stored == expected:
        return
    if stored == "score":
        raise ValueError(f"{path} is a reward model (a score head, no next-token output): it scores sequences and "
                         f"cannot stand in for a causal language model; pass it where a reward model is expected")
    raise ValueError(f"{path} is a causal language model, not a reward model (it has no score head): train one "
                     f"from it with `python -m llama_jax.train --objective reward --init-from {path}`, or convert "
                     f"a Hugging Face LlamaForSequenceClassification")


def load(path: str | os.PathLike, mesh=None, *, shardings=None, dtype: str | None = None,
         param_dtype: str | None = None, stored_config: LlamaConfig | None = None, head: str = "lm",
         **config_overrides) -> tuple[LlamaConfig, dict]:
    """Read (cfg, params), each device reading only its own shards. `path`: a checkpoint directory,
    or a training run's --out directory (its final model, OUT/model).

    dtype, param_dtype: the compute dtype and the dtype the weights are held in. Unless one is named,
    both are `config.compute_dtype`'s choice, as in `python -m llama_jax.infer`: float32 on a CPU
    backend (where bfloat16 matmuls are slow), the stored compute dtype elsewhere, so the weights are
    cast once here rather than at every matmul. A named dtype keeps the stored weights' dtype
    (dtype="bfloat16" on a bfloat16 checkpoint holds bfloat16 weights); training names both.
    mesh: restore straight into the shards the rules table gives on this jax.sharding.Mesh,
    whatever mesh saved the checkpoint. shardings: instead, a tree of jax.sharding.Sharding
    matching the params (or one Sharding for every leaf). Neither: the default device.
    stored_config: the checkpoint's config.json as the caller read it already (load_config), not read again.
    head: the model the caller needs, a causal LM ("lm") or a reward model ("score"); the other is a
    one-line ValueError (check_head).
    `config_overrides` replace other config fields that do not change shapes (e.g. attention_impl)."""
    path = find(path).absolute()
    stored_cfg = stored_config if stored_config is not None else load_config(path)
    named = dtype is not None or param_dtype is not None
    dtype = compute_dtype(dtype, stored_cfg.dtype)
    config_overrides.update(dtype=dtype, param_dtype=param_dtype or (stored_cfg.param_dtype if named else dtype))
    cfg = dataclasses.replace(stored_cfg, **config_overrides)
    stored = _stored_params(path)
    check_head(path, head_of(stored), head)
    # Compare shapes before reading: a mismatch found mid-restore surfaces as a pile of async errors.
    check_params(stored_cfg, stored, what=f"{path}: stored params vs {CONFIG_FILE}")
    shapes = param_shapes(cfg, head)
    if mesh is not None:
        if shardings is not None:
            raise ValueError("pass mesh or shardings, not both")
        shardings = param_shardings(cfg, mesh, head=head)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    except Exception as e:  # noqa: BLE001 (tensorstore read failures arrive as bare Exception)
        raise ValueError(f"{path}/{PARAMS_DIR}: damaged checkpoint ({_first_line(e)})") from e
    return cfg, params


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    # TensorStore read errors go on with the repr of a bound method, which tells a user nothing.
    return line.split(". See full TensorStore details")[0]


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The tokenizer file inside a checkpoint directory (tokenizer.model or tokenizer.json, which
    `llama_jax.tokenizer.load_tokenizer` opens), or None when it has none."""
    found = find_tokenizer(path)
    return Path(found) if found is not None else None
