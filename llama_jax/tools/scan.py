"""Scanners for a prefix of generated text: where a JSON object's fields, or a Python call's keyword
values, start and end, with `None` for "not ended yet" (the rest of the text may still complete it).

They find structure only; values are read with json.loads / ast.literal_eval once they are whole.
Strings and numbers are skipped with regexes, so a long argument costs C time, not a Python loop.
"""

from __future__ import annotations

import dataclasses
import re

WHITESPACE = re.compile(r"\s*")
# A JSON string body up to (not including) its closing quote; an escape may be cut at the end.
_JSON_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*')
_PY_STRING_BODY = {'"': re.compile(r'(?:[^"\\\n]|\\.)*'), "'": re.compile(r"(?:[^'\\\n]|\\.)*")}
_SCALAR = re.compile(r"[^\s,:\]\}\)\[\{\"']*")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_OPEN = {"{": "}", "[": "]", "(": ")"}
# The characters a nested value's end depends on; the rest is skipped by the regex engine.
_INTERESTING = {'"': re.compile(r'["{}\[\]()]'), "\"'": re.compile(r'["\'{}\[\]()]')}


def skip_ws(text: str, i: int) -> int:
    return WHITESPACE.match(text, i).end()


def string_end(text: str, i: int, quote: str = '"') -> int | None:
    """Index after the string that starts with the quote at `i`; None if it is not closed yet."""
    body = (_JSON_STRING_BODY if quote == '"' else _PY_STRING_BODY[quote]).match(text, i + 1).end()
    return body + 1 if body < len(text) and text[body] == quote else None


def value_end(text: str, i: int, quotes: str = '"', memo: dict | None = None) -> int | None:
    """Index after the JSON (or, with quotes="\\"'", Python literal) value starting at `i`; None if it
    may go on. A scalar at the very end of the text may go on (`12` -> `123`).

    memo: where scanning an unfinished nested value stopped, by its start, so the next call (on the
    same text grown longer) resumes there: a long argument is scanned once, not once per token."""
    if text[i] in quotes:
        return string_end(text, i, text[i])
    if text[i] not in _OPEN:
        end = _SCALAR.match(text, i).end()
        return None if end == len(text) else end
    j, closers = memo.get(i, (i, [])) if memo is not None else (i, [])
    closers = list(closers)
    interesting = _INTERESTING[quotes]
    while (m := interesting.search(text, j)) is not None:
        j = m.start()
        c = text[j]
        if c in quotes:
            end = string_end(text, j, c)
            if end is None:
                break
            j = end
            continue
        if c in _OPEN:
            closers.append(_OPEN[c])
        elif closers and c == closers[-1]:
            closers.pop()
            if not closers:
                return j + 1
        j += 1
    else:
        j = len(text)
    if memo is not None:
        memo[i] = (j, closers)
    return None


@dataclasses.dataclass
class ObjectScan:
    """A JSON object's top-level fields: key -> (value start, value end or None)."""

    fields: dict
    end: int | None  # index after its closing brace; None while open
    broken: bool = False  # not JSON: the text is not a call

    def value(self, text: str, key: str) -> str | None:
        """The text of a field's value so far (all of it once it ended)."""
        if key not in self.fields:
            return None
        start, end = self.fields[key]
        return text[start:end] if end is not None else text[start:]


def scan_object(text: str, i: int, memo: dict | None = None) -> ObjectScan:
    """Scans the object whose `{` is at `i` as far as the text goes (memo: as value_end's)."""
    fields = {}
    j = skip_ws(text, i + 1)
    while j < len(text):
        c = text[j]
        if c == "}":
            return ObjectScan(fields, j + 1)
        if c != '"':
            return ObjectScan(fields, None, broken=True)
        key_end = string_end(text, j)
        if key_end is None:
            return ObjectScan(fields, None)
        key = text[j + 1:key_end - 1]
        j = skip_ws(text, key_end)
        if j == len(text):
            return ObjectScan(fields, None)
        if text[j] != ":":
            return ObjectScan(fields, None, broken=True)
        j = skip_ws(text, j + 1)
        if j == len(text):
            return ObjectScan(fields, None)
        end = value_end(text, j, memo=memo)
        fields.setdefault(key, (j, end))
        if end is None:
            return ObjectScan(fields, None)
        j = skip_ws(text, end)
        if j == len(text):
            return ObjectScan(fields, None)
        if text[j] == "}":
            return ObjectScan(fields, j + 1)
        if text[j] != ",":
            return ObjectScan(fields, None, broken=True)
        j = skip_ws(text, j + 1)
    return ObjectScan(fields, None)


def is_proper_prefix(text: str, of: str) -> bool:
    return len(text) < len(of) and of.startswith(text)
