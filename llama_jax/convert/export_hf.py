"""Our checkpoint directory -> a Hugging Face Llama directory that transformers loads as it is.

    DST/config.json                       transformers LlamaConfig (4.x key names, which 5.x reads)
    DST/generation_config.json            bos / stop ids, Meta's recommended sampling (or the model's own)
    DST/model-0000k-of-0000n.safetensors  tensors in HF layout (q/k rows permuted for rotate-half)
    DST/model.safetensors.index.json      tensor name -> file
    DST/tokenizer.json                    a Llama 3 tokenizer as transformers' fast tokenizer (hf_tokenizer.py)
    DST/tokenizer_config.json             its bos / eos, model_max_length and our chat format
    DST/original/tokenizer.model          the checkpoint's tokenizer.model as it is, when it has one

AutoTokenizer loads the export when the checkpoint has a Llama 3 (tiktoken) tokenizer, or the Hugging
Face tokenizer files of another model (carried from `convert hf`), which are copied as they are. A
Llama 2 sentencepiece model is only copied: its HF form is another tokenizer model altogether (BPE with
sentencepiece scores, byte fallback and a Metaspace normalizer), and the models we export are Llama 3.

Tensors are read one layer slice at a time and written straight into their file, so memory stays
near one tensor whatever the model size. Tied models get no lm_head (tie_word_embeddings: true).

A reward checkpoint (llama_jax.reward) becomes a LlamaForSequenceClassification with num_labels 1: no
lm_head, `score.weight` [1, D], and a pad_token_id (`reward_pad_id`), by which transformers finds
each row's last token that is not padding, the one it scores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig, canonical_dtype_name
from llama_jax.convert import safetensors_io
from llama_jax.convert.hf import INDEX_FILE, ORIGINAL_TOKENIZER, REWARD_ARCHITECTURE
from llama_jax.convert.hf_tokenizer import write_hf_tokenizer
from llama_jax.convert.keymap import checkpoint_tensors, hf_keys
from llama_jax.convert.store import ParamsReader, check_paths, read_tokenizer
from llama_jax.hf_tokenizer import GENERATION_CONFIG, HFTokenizer
from llama_jax.tokenizer import Llama2Tokenizer, Llama3Tokenizer

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# Meta's recommended sampling for Llama 3, as the official HF repos ship it.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1024' -> 1024 bytes."""
    m = _SIZE.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max shard size {text!r} is not a size such as 5GB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def stop_ids(cfg: LlamaConfig, tokenizer: Llama3Tokenizer | Llama2Tokenizer | HFTokenizer | None, *,
             base: bool) -> list[int]:
    """The ids generation stops at: end_of_text, plus (unless `base`) the tokenizer's other stop
    tokens: Llama 3's end-of-message and end-of-turn, which instruct models end their replies with
    (another model's: its eos ids and its chat template's end of turn). A base model never emits
    those, so listing them costs it nothing; leaving them out makes an instruct model talk past the
    end of its turn."""
    ids = [cfg.eos_id]
    if not base and tokenizer is not None:
        ids += [i for i in tokenizer.stop_tokens if i not in ids]
    return ids


def reward_pad_id(cfg: LlamaConfig, tokenizer) -> int:
    """The pad_token_id of an exported reward model. transformers scores each row at its last token
    that is not this id, so it must never end a sequence: the tokenizer's pad token (Llama 3's
    <|finetune_right_pad_id|>) unless it has none or it is a stop token (some chat models pad with
    their end of turn, the very token scored), else bos, which only ever starts one."""
    pad = tokenizer.pad_id if tokenizer is not None else -1
    stops = tokenizer.stop_tokens if tokenizer is not None else ()
    return pad if 0 <= pad < cfg.vocab_size and pad not in (cfg.eos_id, *stops) else cfg.bos_id


def _shard_groups(tensors, cfg: LlamaConfig, itemsize: int, max_bytes: int):
    groups, size = [[]], 0
    for t in tensors:
        nbytes = itemsize * math.prod(t.entry.shape(cfg))
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return groups


def export_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, base: bool = False, overwrite: bool = False,
              progress: bool = False) -> Path:
    """Export our checkpoint `src` as an HF model directory `dst`; returns `dst`.

    dtype: of the written tensors (default: the checkpoint's param_dtype). max_shard_size: bytes per
    safetensors file (one tensor larger than that gets a file of its own). base: stop only at
    end_of_text (see `stop_ids`), and make end_of_text the tokenizer's eos rather than eot.
    """
    src, dst = Path(src).absolute(), Path(dst).absolute()
    check_paths(src, dst)
    with checkpoint.staged_directory(dst, overwrite=overwrite) as staging:
        cfg = checkpoint.load_config(src)
        head = checkpoint.stored_head(src)
        keys = hf_keys(head)
        reader = ParamsReader(src / checkpoint.PARAMS_DIR, cfg, head)
        out_dtype = np.dtype(canonical_dtype_name(dtype, "dtype") if dtype else cfg.param_dtype)
        tokenizer_file = checkpoint.tokenizer_path(src)
        tokenizer = read_tokenizer(tokenizer_file) if tokenizer_file is not None else None
        if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{tokenizer_file}: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
                             f"{cfg.vocab_size} ({src / checkpoint.CONFIG_FILE})")
        stops = stop_ids(cfg, tokenizer, base=base)
        # The tokenizer before the tensors: its errors then come before hours of writing.
        generation = dict(SAMPLING_DEFAULTS)
        if isinstance(tokenizer, HFTokenizer):  # another model's own files, as they came
            checkpoint.copy_tokenizer(tokenizer_file, staging)
            if (staging / GENERATION_CONFIG).is_file():
                generation = json.loads((staging / GENERATION_CONFIG).read_text(encoding="utf-8"))
        elif tokenizer_file is not None:
            (staging / ORIGINAL_TOKENIZER).parent.mkdir()
            shutil.copyfile(tokenizer_file, staging / ORIGINAL_TOKENIZER)
        if isinstance(tokenizer, Llama3Tokenizer):
            names = {i: name for name, i in tokenizer.special_tokens.items()}
            pad_token = names.get(reward_pad_id(cfg, tokenizer)) if head == "score" else None
            write_hf_tokenizer(tokenizer, staging, max_seq_len=cfg.max_seq_len, base=base, pad_token=pad_token)

        tensors = checkpoint_tensors(keys, cfg)
        groups = _shard_groups(tensors, cfg, out_dtype.itemsize, max_shard_size)
        weight_map = {}
        with tqdm(total=len(tensors), desc=f"{src.name} -> {dst.name}", unit="tensor",
                  disable=None if progress else True) as bar:
            for k, group in enumerate(groups, start=1):
                file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
                by_name = {t.name: t for t in group}

                def produce(name):
                    t = by_name[name]
                    value = t.entry.to_theirs(reader.read(t.entry.path, t.layer), cfg).astype(out_dtype, copy=False)
                    bar.update()
                    return value

                layout = [(t.name, t.entry.shape(cfg), out_dtype) for t in group]
                safetensors_io.write_file(staging / file, layout, produce, metadata={"format": "pt"})
                weight_map.update({t.name: file for t in group})

        total = sum(out_dtype.itemsize * math.prod(t.entry.shape(cfg)) for t in tensors)
        _write_json(staging / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        eos = stops if len(stops) > 1 else stops[0]
        hf_config = {**cfg.to_hf_config(dtype=out_dtype.name), "eos_token_id": eos}
        if head == "score":
            hf_config.update(architectures=[REWARD_ARCHITECTURE], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                             pad_token_id=reward_pad_id(cfg, tokenizer))
        _write_json(staging / "config.json", hf_config)
        _write_json(staging / GENERATION_CONFIG, {**generation, "bos_token_id": cfg.bos_id, "eos_token_id": eos})
    return dst


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
