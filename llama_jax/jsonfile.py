"""Reading the JSON files users hand us (config.json, params.json): one-line errors naming the file."""

from __future__ import annotations

import json
import os


def read_json_text(path: str | os.PathLike) -> str:
    """The file's text, or a one-line ValueError when it is missing."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ValueError(f"{os.fspath(path)}: no such file") from e


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in the file, or a one-line ValueError naming it (missing, not JSON, not an object)."""
    try:
        value = json.loads(read_json_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{os.fspath(path)}: expected a JSON object")
    return value


__all__ = ["read_json_text", "read_json_object"]
