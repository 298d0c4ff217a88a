"""A Hugging Face Llama directory (config.json, safetensors, tokenizer) -> our checkpoint directory.

Reads model.safetensors, or the shards model.safetensors.index.json lists; config.json in
transformers 4.x or 5.x keys (LlamaConfig.from_hf_config). The q/k rows HF permuted for its
rotate-half rotary are put back in Meta's order (keymap.HF_KEYS). The tokenizer comes along when
the directory has one: Meta's original/tokenizer.model as is; else a Llama 3 tokenizer.json's
byte-level BPE written out as tiktoken ranks; else any other tokenizer.json as it is, with its
tokenizer_config.json, chat_template.jinja and generation_config.json (llama_jax.hf_tokenizer).
The weights never depend on which.

A reward model (config.json's architectures ["LlamaForSequenceClassification"], num_labels 1) becomes
our reward checkpoint: the same network, its `score.weight` [1, D] our `score` (keymap.HF_REWARD_KEYS);
any other num_labels is refused, since llama_jax.reward scores a sequence with one number.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path

from llama_jax.checkpoint import PARAMS_DIR, TOKENIZER_FILE, staged_directory, write_metadata
from llama_jax.config import LlamaConfig, canonical_dtype_name
from llama_jax.convert import safetensors_io
from llama_jax.convert.hf_tokenizer import TOKENIZER_JSON, byte_level_alphabet
from llama_jax.convert.keymap import embedding_name, hf_keys, match_tensors, output_name
from llama_jax.jsonfile import read_json_object
from llama_jax.convert.store import check_paths, import_params, naming_file, read_tokenizer, same_bits

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ORIGINAL_TOKENIZER = Path("original") / TOKENIZER_FILE


def read_config(src: Path) -> LlamaConfig:
    path = src / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (an HF model directory holds config.json beside its safetensors)")
    try:
        return LlamaConfig.from_hf_config(path)
    except ValueError as e:
        raise naming_file(path, e) from None


REWARD_ARCHITECTURE = "LlamaForSequenceClassification"


def read_head(src: Path) -> str:
    """"score" for a reward model (REWARD_ARCHITECTURE with num_labels 1), else "lm"; num_labels other
    than 1 is a one-line ValueError. transformers writes num_labels as id2label's length (2 when absent)."""
    path = src / CONFIG_FILE
    raw = read_json_object(path)
    if REWARD_ARCHITECTURE not in (raw.get("architectures") or []):
        return "lm"
    num_labels = raw["num_labels"] if "num_labels" in raw else len(raw["id2label"]) if "id2label" in raw else 2
    if num_labels != 1:
        raise ValueError(f"{path}: a {REWARD_ARCHITECTURE} with num_labels {num_labels}; only reward models, "
                         f"num_labels 1 (one score per sequence), convert")
    return "score"


def safetensors_index(src: Path) -> dict[str, safetensors_io.TensorInfo]:
    """name -> TensorInfo of every tensor in the directory's safetensors file(s)."""
    index_path = src / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index_path}: not a safetensors index ({e})") from None
    elif (src / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise ValueError(f"{src}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
    infos: dict[str, safetensors_io.TensorInfo] = {}
    for file in files:
        path = src / file
        if not path.is_file():
            raise ValueError(f"{path}: missing shard (listed in {INDEX_FILE})")
        for name, info in safetensors_io.read_header(path).items():
            if name in infos:
                raise ValueError(f"{path}: duplicate tensor {name!r}, also in {infos[name].path.name}")
            infos[name] = info
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in infos or infos[name].path.name != file:
                raise ValueError(f"{src / file}: does not hold {name!r}, which {INDEX_FILE} says it does")
    return infos


# tokenizer.json -> tiktoken ranks ------------------------------------------------------------

def _byte_of_char() -> dict[str, int]:
    """The inverse of byte-level BPE's spelling of each byte as one printable character."""
    return {c: b for b, c in enumerate(byte_level_alphabet())}


def _regexes(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["Regex"]] if isinstance(node.get("Regex"), str) else []
        return found + [r for value in node.values() for r in _regexes(value)]
    if isinstance(node, list):
        return [r for value in node for r in _regexes(value)]
    return []


def tiktoken_ranks(tokenizer_json: str | os.PathLike) -> bytes:
    """The tiktoken ranks file (`<base64 token> <rank>` lines, special tokens excluded) equivalent
    to a Llama 3 style tokenizer.json; raises ValueError when it cannot be expressed as one."""
    from llama_jax.tokenizer import LLAMA3_PAT_STR, NUM_SPECIAL_TOKENS

    path = Path(tokenizer_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model, added = data["model"], data.get("added_tokens") or []
        vocab, merges = model["vocab"], model.get("merges") or []
        special = {int(t["id"]) for t in added}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: not a byte-level BPE tokenizer, which Llama 3's is")
    if LLAMA3_PAT_STR not in _regexes(data.get("pre_tokenizer")):
        raise ValueError(f"{path}: its pre-tokenizer does not split text with Llama 3's pattern")
    byte_of = _byte_of_char()

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(byte_of[c] for c in token)
        except KeyError:
            raise ValueError(f"{path}: token {token!r} is not byte-level encoded") from None

    ranks = {to_bytes(token): int(i) for token, i in vocab.items() if int(i) not in special}
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{path}: the ids of its {n} ordinary tokens are not exactly 0..{n - 1}")
    if sorted(special) != list(range(n, n + NUM_SPECIAL_TOKENS)):
        raise ValueError(f"{path}: Llama 3 has {NUM_SPECIAL_TOKENS} special tokens numbered from {n} on; this "
                         f"file has {len(special)}")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: not every byte is a token, so not every text can be encoded")
    # tiktoken merges the adjacent pair whose result has the lowest rank; BPE applies merges in list
    # order. The two agree exactly when merge results come in rank order.
    previous = -1
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = ranks.get(to_bytes(left) + to_bytes(right))
        if rank is None or rank < previous:
            raise ValueError(f"{path}: merge {left!r} + {right!r} is out of vocabulary order, so the tokenizer "
                             f"cannot be written as tiktoken ranks")
        previous = rank
    lines = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in lines).encode()


def _tokenizer(src: Path, cfg: LlamaConfig) -> tuple[Path | None, bytes | None]:
    """(a tokenizer to copy, or Llama 3 ranks to write), either or both None. The tokenizer to copy
    is Meta's original/tokenizer.model, or a tokenizer.json that is not Llama 3's, which comes with
    its sibling files (checkpoint.copy_tokenizer) and is served by the `tokenizers` library."""
    from llama_jax.tokenizer import NUM_SPECIAL_TOKENS

    original, tokenizer_json = src / ORIGINAL_TOKENIZER, src / TOKENIZER_JSON
    if original.is_file():
        found, copy, ranks, size = original, original, None, read_tokenizer(original).vocab_size
    elif tokenizer_json.is_file():
        try:
            ranks = tiktoken_ranks(tokenizer_json)
            found, copy, size = tokenizer_json, None, ranks.count(b"\n") + NUM_SPECIAL_TOKENS
        except ValueError:  # not Llama 3's: used as it is
            found, copy, ranks, size = tokenizer_json, tokenizer_json, None, read_tokenizer(tokenizer_json).vocab_size
    else:
        return None, None
    if size > cfg.vocab_size:
        raise ValueError(f"{found}: {size} tokens do not fit the model's vocab_size {cfg.vocab_size} ({CONFIG_FILE})")
    return copy, ranks


def convert_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
               overwrite: bool = False, progress: bool = False) -> Path:
    """Convert the HF model directory `src` into our checkpoint directory `dst`; returns `dst`.

    dtype: storage dtype of the params (default: that of the checkpoint's tensors).
    """
    src, dst = Path(src).absolute(), Path(dst).absolute()
    check_paths(src, dst)
    if not src.is_dir():
        raise ValueError(f"{src}: no such directory")
    with staged_directory(dst, overwrite=overwrite) as staging:
        cfg = read_config(src)
        head = read_head(src)
        keys = hf_keys(head)
        infos = safetensors_index(src)
        tokenizer_file, ranks = _tokenizer(src, cfg)
        embedding = embedding_name(keys)
        output = output_name(keys) if head == "lm" else None  # a reward model has no lm_head, tied or not
        if embedding not in infos:
            raise ValueError(f"{src}: missing tensor {embedding!r}")
        source_dtype = canonical_dtype_name(infos[embedding].dtype, embedding)
        cfg = dataclasses.replace(cfg, param_dtype=canonical_dtype_name(dtype, "dtype") if dtype else source_dtype)
        shapes = {name: info.shape for name, info in infos.items()}
        tensors = match_tensors(keys, cfg, shapes, where=lambda name: str(infos[name].path), source=str(src),
                                config_file=CONFIG_FILE, ignore=(output,) if output and cfg.tie_embeddings else ())
        if output and cfg.tie_embeddings and output in infos and not same_bits(
                safetensors_io.read_tensor(infos[output]), safetensors_io.read_tensor(infos[embedding])):
            raise ValueError(f"{infos[output].path}: {output} differs from {embedding}, but {CONFIG_FILE} sets "
                             f"tie_word_embeddings")

        @contextlib.contextmanager
        def open_tensor(name):
            yield safetensors_io.read_tensor(infos[name])

        import_params(staging / PARAMS_DIR, cfg, tensors, open_tensor, progress=progress,
                      desc=f"{src.name} -> {dst.name}", head=head)
        write_metadata(staging, cfg, tokenizer_file)
        if ranks is not None:
            (staging / TOKENIZER_FILE).write_bytes(ranks)
    if tokenizer_file is None and ranks is None:
        warnings.warn(f"{src} has no {ORIGINAL_TOKENIZER} or {TOKENIZER_JSON}, so {dst} has no tokenizer: pass one "
                      f"when using it")
    return dst
