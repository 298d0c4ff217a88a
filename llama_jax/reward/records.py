"""The JSONL records the reward CLIs read, each checked with one clear line naming its line number.

    score:       {"messages": [..., {"role": "assistant", "content": ...}]}  or  {"text": ...}
    best-of-n:   {"messages": [... the conversation so far, ending with a user turn]}  or  {"prompt": ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line; a line that is not a JSON object is a ValueError
    naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: cannot read {path} ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {path} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{what}: {path} line {number} is not a JSON object")
        yield number, record


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be an object with a string 'role' and 'content'")
    return messages


def scored_record(record: dict, where: str) -> tuple[list, dict] | str:
    """What a record to score holds: (the messages before the answer, the assistant's answer) of a
    conversation whose last message is the answer, or the text of {"text": ...}."""
    if "messages" in record:
        messages = _check_messages(record["messages"], where)
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer to score, got role "
                             f"{messages[-1]['role']!r}")
        return messages[:-1], messages[-1]
    if isinstance(record.get("text"), str) and record["text"]:
        return record["text"]
    raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"text\": \"...\"}}")


def prompt_record(record: dict, where: str) -> list | str:
    """A best-of-n prompt: the messages (the last a user turn) or a plain-text prompt."""
    if "messages" in record:
        messages = _check_messages(record["messages"], where)
        if messages[-1]["role"] == "assistant":
            raise ValueError(f"{where}: the last message is the assistant's: a prompt ends with the turn to answer")
        return messages
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"]
    raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}")


__all__ = ["read_jsonl", "scored_record", "prompt_record"]
