"""Documents -> next-token training examples: token ids, their targets and loss weights.

Loss weights are 1 on every target of plain text and, for chat, 1 only on assistant content and
the eot that ends it (the model learns to answer and to stop, never to write the user's turns or
the headers a chat prompt already supplies). A tokenizer's identity is the hash of its files: a
prepared dataset records it, and training refuses data tokenized by another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.hf_tokenizer import HFTokenizer
from llama_jax.tokenizer import load_tokenizer, tokenizer_files


def tokenizer_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What a prepared dataset records of its tokenizer: the files' names and one sha256 over them
    (an HF tokenizer's chat template is part of it), and the ids training checks against the model."""
    files = tokenizer_files(path)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + Path(files[name]).read_bytes() + b"\0")
    tokenizer = load_tokenizer(path)
    return {"kind": type(tokenizer).__name__, "files": sorted(files), "sha256": digest.hexdigest(),
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}


def chat_ids_and_weights(tokenizer, messages) -> tuple[list[int], list[float]]:
    """bos + each message as header, content, eot; weight 1 on assistant content and its end token.

    Built from the tokenizer's own pieces (`encode_header`, `encode_message`), so the ids are exactly
    those `encode_dialog` gives a prompt. Another model's tokenizer renders its own chat template.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of {{role, content}} dicts, got {messages!r}")
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_dialog_for_training(messages)
    ids, weights = [tokenizer.bos_id], [0.0]
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        header = tokenizer.encode_header(role)
        body = tokenizer.encode_message(message)[len(header):]  # content + eot (or eom)
        ids += header + body
        weights += [0.0] * len(header) + [1.0 if role == "assistant" else 0.0] * len(body)
    return ids, weights


def parse_json_record(line: str, where: str) -> dict[str, Any]:
    """One JSONL line -> {'text'} or {'messages'}; `where` names it in the error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or ("text" not in record and "messages" not in record):
        raise ValueError(f"{where}: a record needs a 'text' or a 'messages' field")
    return {k: record[k] for k in ("text", "messages") if k in record}


def tokenize_record(tokenizer, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Next-token training example: inputs[t] predicts targets[t] = ids[t + 1], weighted."""
    if "messages" in record:
        ids, weights = chat_ids_and_weights(tokenizer, record["messages"])
    else:
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, got {type(text).__name__}")
        ids = tokenizer.encode(text, bos=record.get("bos", True), eos=record.get("eos", True))
        weights = [1.0] * len(ids)
    ids_a = np.asarray(ids, np.int32)
    return {"inputs": ids_a[:-1], "targets": ids_a[1:], "weights": np.asarray(weights[1:], np.float32)}
