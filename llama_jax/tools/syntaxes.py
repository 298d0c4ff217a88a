"""Call syntaxes: what a prefix of generated text says so far, as a `Snapshot` (content, calls).

Each syntax's `snapshot(text, final)` reads the whole text generated so far. Before the end
(final=False) it reports only what no continuation can change: content that cannot be the start of
a call, calls whose name is complete, argument text that is already written; so each snapshot
extends the one before, and the parser streams their differences. At the end (final=True) held
text is resolved. Streamed and whole parses therefore go through this one function.

<|python_tag|> reaches the syntaxes as the PYTHON_TAG character (the parser maps the special
token to it), so text that merely spells "<|python_tag|>" stays text.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re

from llama_jax.tools.definitions import BUILTIN_QUERY_TOOLS, CODE_INTERPRETER
from llama_jax.tools.scan import IDENTIFIER, is_proper_prefix, scan_object, skip_ws, string_end, value_end

PYTHON_TAG = "\ue000"  # a private-use character standing for the <|python_tag|> token
PYTHON_TAG_NAME = "<|python_tag|>"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_BUILTIN_CALL = re.compile(r'(\w+)\.call\(query=')
CALL_KEYS = ("name", "parameters", "arguments", "type")  # a call object's first key is one of these


@dataclasses.dataclass
class CallSnap:
    name: str
    arguments: str  # the arguments' JSON text written so far
    done: bool = False


@dataclasses.dataclass
class Snapshot:
    content: str = ""  # raw content text (the parser trims whitespace at its ends)
    calls: list = dataclasses.field(default_factory=list)


def _visible(text: str) -> str:
    return text.replace(PYTHON_TAG, PYTHON_TAG_NAME)


def read_json_call(text: str, i: int, final: bool, tools: frozenset,
                   memo: dict | None = None) -> tuple[str, CallSnap | None, int | None]:
    """The JSON call object at `i` ({"name": ..., "parameters" or "arguments": {...}}): ("call", call,
    end or None while open), ("hold", ...) while it may still become one, ("text", ...) if it is not one."""
    obj = scan_object(text, i, memo)
    if next((k not in CALL_KEYS for k in obj.fields), False):
        return "text", None, None  # a JSON answer, streamed as content from its first key
    name = None
    if "name" in obj.fields and obj.fields["name"][1] is not None:
        try:
            name = json.loads(obj.value(text, "name"))
        except ValueError:
            return "text", None, None
        if not isinstance(name, str) or name not in tools:
            return "text", None, None
    if name is None:
        return ("hold" if obj.end is None and not obj.broken and not final else "text"), None, None
    key = next((k for k in obj.fields if k in ("parameters", "arguments")), None)
    arguments = obj.value(text, key) if key else None
    if obj.end is None and not obj.broken:
        return "call", CallSnap(name, arguments or ""), None
    # An object broken after its name was read stays the call it already was; the rest is text.
    end = obj.end if obj.end is not None else len(text)
    return "call", CallSnap(name, arguments if arguments is not None else "{}", True), end


def read_builtin_call(text: str, i: int, final: bool, builtins: frozenset) -> tuple[str, CallSnap | None, int | None]:
    """`brave_search.call(query="...")` at `i`: the query is a JSON string (Meta writes it quoted)."""
    m = _BUILTIN_CALL.match(text, i)
    if m is None:
        if not final and any(is_proper_prefix(text[i:], f"{b}.call(query=") for b in builtins):
            return "hold", None, None
        return "text", None, None
    if m.group(1) not in builtins:
        return "text", None, None
    quote = m.end()
    if quote == len(text):
        return ("hold" if not final else "text"), None, None
    if text[quote] != '"':
        return "text", None, None
    end = string_end(text, quote)
    if end is None:
        return "call", CallSnap(m.group(1), '{"query": ' + text[quote:]), None
    done = end < len(text) and text[end] == ")"
    return "call", CallSnap(m.group(1), '{"query": ' + text[quote:end] + "}", done or final), end + done


def code_call(code: str, final: bool) -> CallSnap:
    """Code after <|python_tag|> (Meta's code interpreter): arguments {"code": ...}, written as it comes
    (json.dumps escapes each character on its own, so escaping a prefix gives a prefix)."""
    quoted = json.dumps(code, ensure_ascii=False)
    return CallSnap(CODE_INTERPRETER, '{"code": ' + (quoted + "}" if final else quoted[:-1]), final)


@dataclasses.dataclass(frozen=True)
class _Tagged:
    """What the Llama syntaxes share: an optional <|python_tag|>, then built-in calls or code."""

    tools: frozenset
    builtins: frozenset = frozenset()
    code_interpreter: bool = False

    def snapshot(self, text: str, final: bool, memo: dict | None = None) -> Snapshot:
        i = skip_ws(text, 0)
        if i == len(text):
            return Snapshot()
        tagged = text[i] == PYTHON_TAG
        if tagged:
            i = skip_ws(text, i + 1)
            if i == len(text):
                return Snapshot()
        if text[i] == self.opener:
            return self.calls(text, i, final, memo)
        if not tagged:
            return Snapshot(_visible(text[i:]))
        status, call, end = read_builtin_call(text, i, final, self.builtins)
        if status == "hold":
            return Snapshot()
        if status == "call":
            return Snapshot(_visible(text[end:]) if end is not None else "", [call])
        if self.code_interpreter:
            return Snapshot("", [code_call(text[i:], final)])
        return Snapshot(_visible(text[i:]))


@dataclasses.dataclass(frozen=True)
class JsonCalls(_Tagged):
    """Llama 3.1 / 3.3 JSON calls (`{"name": ..., "parameters": {...}}`, several one after another,
    optionally `;`-separated), and the JSON format we prompt templates without tools support for
    (`{"name": ..., "arguments": {...}}`): both keys are read."""

    opener = "{"

    def calls(self, text: str, i: int, final: bool, memo: dict | None) -> Snapshot:
        snap = Snapshot()
        while True:
            j = skip_ws(text, i)
            if j < len(text) and text[j] == ";" and snap.calls:
                j = skip_ws(text, j + 1)
            if j == len(text):
                return snap
            if text[j] != "{":
                snap.content = _visible(text[j:])
                return snap
            status, call, end = read_json_call(text, j, final, self.tools, memo)
            if status == "hold":
                return snap
            if status == "text":
                snap.content = _visible(text[j:])
                return snap
            snap.calls.append(call)
            if end is None:
                return snap
            i = end


def _python_value(source: str):
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return source.strip()  # not a literal: kept as the text the model wrote


@dataclasses.dataclass(frozen=True)
class PythonicCalls(_Tagged):
    """Llama 3.2's `[f(a=1), g(b="x")]`: keyword arguments as Python literals, read into JSON."""

    opener = "["

    def calls(self, text: str, i: int, final: bool, memo: dict | None) -> Snapshot:
        snap = Snapshot()
        j = i + 1
        while True:
            start = j = skip_ws(text, j)
            m = IDENTIFIER.match(text, j)
            if m is None or m.end() == len(text):
                if j < len(text) and text[j] == "]" and snap.calls:
                    snap.content = _visible(text[j + 1:])
                elif final or (m is None and j < len(text)):
                    snap.content = _visible(text[start if snap.calls else i:])
                return snap
            if text[m.end()] != "(" or m.group() not in self.tools:
                snap.content = _visible(text[start if snap.calls else i:])
                return snap
            call = CallSnap(m.group(), "{")
            snap.calls.append(call)
            j, closed = self._arguments(text, m.end() + 1, call, memo)
            if not closed:
                call.done = final
                return snap
            call.arguments += "}"
            call.done = True
            j = skip_ws(text, j)
            if j < len(text) and text[j] == ",":
                j += 1
                continue
            if j < len(text) and text[j] == "]":
                snap.content = _visible(text[j + 1:])
            elif j < len(text) or final:
                snap.content = _visible(text[j:])
            return snap

    @staticmethod
    def _arguments(text: str, j: int, call: CallSnap, memo: dict | None) -> tuple[int, bool]:
        """Reads `k=v, ...)` from `j` into call.arguments, one whole keyword at a time."""
        first = True
        while True:
            j = skip_ws(text, j)
            if j == len(text):
                return j, False
            if text[j] == ")":
                return j + 1, True
            m = IDENTIFIER.match(text, j)
            if m is None:
                return j, False
            k = skip_ws(text, m.end())
            if k == len(text) or text[k] != "=":
                return j, False
            v = skip_ws(text, k + 1)
            if v == len(text):
                return j, False
            end = value_end(text, v, quotes="\"'", memo=memo)
            if end is None:
                return j, False
            after = skip_ws(text, end)
            if after == len(text) or text[after] not in ",)":
                return j, False
            value = json.dumps(_python_value(text[v:end]), ensure_ascii=False)
            call.arguments += ("" if first else ", ") + f"{json.dumps(m.group(), ensure_ascii=False)}: {value}"
            first = False
            j = after + (text[after] == ",")


@dataclasses.dataclass(frozen=True)
class HermesCalls:
    """Hermes / ChatML templates: text with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    blocks anywhere in it."""

    tools: frozenset

    def snapshot(self, text: str, final: bool, memo: dict | None = None) -> Snapshot:
        snap, pos = Snapshot(), 0
        while True:
            k = text.find(HERMES_OPEN, pos)
            if k < 0:
                tail = text[pos:]
                held = 0 if final else next((n for n in range(min(len(tail), len(HERMES_OPEN) - 1), 0, -1)
                                             if HERMES_OPEN.startswith(tail[-n:])), 0)
                snap.content += _visible(tail[:len(tail) - held])
                return snap
            snap.content += _visible(text[pos:k])
            j = skip_ws(text, k + len(HERMES_OPEN))
            if j == len(text):
                if final:
                    snap.content += _visible(text[k:])
                return snap
            status, call, end = (read_json_call(text, j, final, self.tools, memo) if text[j] == "{"
                                 else ("text", None, None))
            if status == "hold":
                return snap
            if status == "text":
                snap.content += _visible(text[k:j])
                pos = j
                continue
            snap.calls.append(call)
            if end is None:
                return snap
            e = skip_ws(text, end)
            if text.startswith(HERMES_CLOSE, e):
                pos = e + len(HERMES_CLOSE)
            elif not final and is_proper_prefix(text[e:], HERMES_CLOSE):
                call.done = False
                return snap
            else:
                pos = end


def llama3_syntax(tools, tool_format: str = "json"):
    """The syntax a Llama 3 model calls `tools` (Tool tuples) in: JSON (3.1 / 3.3) or pythonic (3.2),
    with the built-ins among them."""
    custom = frozenset(t.name for t in tools if not t.builtin)
    builtins = frozenset(t.name for t in tools if t.name in BUILTIN_QUERY_TOOLS)
    code = any(t.name == CODE_INTERPRETER for t in tools)
    kind = PythonicCalls if tool_format == "pythonic" else JsonCalls
    return kind(custom, builtins, code)
