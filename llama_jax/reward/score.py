"""`python -m llama_jax.reward score`: one JSON line {"score": ...} per input record, in input order.

A conversation ({"messages": [...]}, the last message the assistant's answer) is rendered by the
reward model's own chat format, no generation prompt, the answer's turn closed by its end token (as
transformers' apply_chat_template and TRL render it); a text ({"text": ...}) is encoded as
transformers' tokenizer(text) does it (bos, then the text). The score is read at the last token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama_jax.reward.model import score_sequences, sequence_ids
from llama_jax.reward.records import read_jsonl, scored_record

CHUNK = 256  # records scored per call of score_sequences (the progress bar moves by it)


def record_ids(tokenizer, held, where: str, max_len: int) -> list[int]:
    """The ids scored for a record's scored_record: bos + text, or the conversation (sequence_ids)."""
    if isinstance(held, str):
        ids = tokenizer.encode(held, bos=True, eos=False)
    else:
        ids = sequence_ids(tokenizer, *held)
    if len(ids) > max_len:
        raise ValueError(f"{where}: {len(ids)} tokens, more than the reward model's context of {max_len}")
    return ids


def read_records(data: str | os.PathLike) -> list[tuple[str, list | str | tuple]]:
    """(where, what to score) of every record, checked before any model loads."""
    records = [(f"--data {data} line {number}", scored_record(record, f"--data {data} line {number}"))
               for number, record in read_jsonl(data, "--data")]
    if not records:
        raise ValueError(f"--data: {data} holds no records")
    return records


def score_file(cfg, params, tokenizer, data: str | os.PathLike, out: str | os.PathLike, *, batch_size: int = 16,
               mesh=None, progress: bool = True, records=None) -> np.ndarray:
    """Score every record of `data` into `out` (written to a temporary name and moved into place once
    all are scored, so a failed run leaves no partial file); returns the scores. records: the file's
    read_records, when the caller read them already."""
    records = read_records(data) if records is None else records
    ids = [record_ids(tokenizer, held, where, cfg.max_seq_len) for where, held in records]
    scores = np.zeros(len(ids), np.float32)
    with tqdm(total=len(ids), desc="scoring", unit="record", disable=None if progress else True) as bar:
        for start in range(0, len(ids), CHUNK):
            scores[start:start + CHUNK] = score_sequences(cfg, params, ids[start:start + CHUNK], batch_size=batch_size,
                                                          mesh=mesh)
            bar.update(len(ids[start:start + CHUNK]))
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for score in scores:
            f.write(json.dumps({"score": float(score)}) + "\n")
    partial.replace(out)
    return scores


__all__ = ["score_file", "read_records", "record_ids"]
