"""Lark grammars (llguidance's dialect) that hold decoding to a call syntax, one per tool_choice:

- "required": one call, or several when parallel_tool_calls;
- a named function: calls of exactly that one;
- "auto": text or calls. For the Llama syntaxes a turn is text or calls, told apart by its first
  character (text cannot start with the call's opener nor with white space) or by <|python_tag|>;
  for Hermes the text runs until `<tool_call>` and llguidance's lazy lexeme (`[lazy]`) constrains
  what follows it;
- "none": no grammar (None).

Each tool's parameters schema is embedded with `%json {...}` (grammar.compile.json_schema_source: the
bounded JSON white space of response_format), so arguments satisfy it; the pythonic
syntax writes Python literals, so there only strings, numbers, booleans, None, enums and arrays of
those follow the schema, other values are any Python literal. What these grammars allow is exactly
what `syntaxes` reads back (tests/tools/test_grammars.py drives them with random tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from llama_jax.grammar.compile import json_schema_source
from llama_jax.tools.definitions import BUILTIN_QUERY_TOOLS, CODE_INTERPRETER, Tool, ToolChoice
from llama_jax.tools.llama3 import python_literal
from llama_jax.tools.syntaxes import HERMES_CLOSE, HERMES_OPEN

PYTHON_TAG = "<|python_tag|>"
_PY_TERMINALS = r"""
PYSTR: /"([^"\\\x00-\x1f]|\\["\\'nrt])*"/ | /'([^'\\\x00-\x1f]|\\["\\'nrt])*'/
PYINT: /-?(0|[1-9][0-9]{0,15})/
PYNUM: /-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,15})?([eE][+-]?[0-9]{1,3})?/
pyval: PYSTR | PYNUM | "True" | "False" | "None" | "[" (pyval (", " pyval)*)? "]" | "{" (PYSTR ": " pyval (", " PYSTR ": " pyval)*)? "}"
"""


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal takes JSON's escapes


def _pick(tools: Sequence[Tool], choice: ToolChoice) -> list[Tool]:
    if choice.function is not None:
        return [t for t in tools if t.name == choice.function]
    return list(tools)


def _json_call_rules(tools: Sequence[Tool], arguments_key: str) -> tuple[str, list[str]]:
    """A `%json` rule per custom tool ({"name": const, arguments_key: its schema}); returns (rules, names)."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        schema = {"type": "object", "properties": {"name": {"const": tool.name}, arguments_key: tool.call_schema()},
                  "required": ["name", arguments_key], "additionalProperties": False}
        # Lenient: a keyword llguidance cannot enforce in a tool's schema is ignored, not a refusal.
        rules.append(f"call_{i}: %json {json_schema_source(schema, strict=False)}")
        names.append(f"call_{i}")
    return "\n".join(rules), names


def _calls(names: list[str], separator: str, parallel: bool) -> str:
    one = " | ".join(names)
    return f"calls: ({one})" + (f" ({_lark_string(separator)} ({one}))*" if parallel else "")


def _python_value(schema) -> str:
    """A Lark expression for a Python literal of one JSON schema (simple types exactly, else any literal)."""
    if not isinstance(schema, dict):
        return "pyval"
    if "enum" in schema and schema["enum"]:
        return "(" + " | ".join(_lark_string(python_literal(v)) for v in schema["enum"]) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "(" + " | ".join(_python_value({**schema, "type": k}) for k in kind) + ")"
    if kind == "array":
        item = _python_value(schema.get("items", {}))
        return f'("[" ({item} (", " {item})*)? "]")'
    return {"string": "PYSTR", "integer": "PYINT", "number": "PYNUM", "boolean": '("True" | "False")',
            "null": '"None"'}.get(kind, "pyval")


def _pythonic_call(tool: Tool) -> str:
    """`name(k=v, ...)`: required parameters in schema order, then the optional ones, each optional."""
    properties = tool.parameters.get("properties", {})
    required = set(tool.parameters.get("required", []))
    order = [k for k in properties if k in required] + [k for k in properties if k not in required]
    params = [(f"{_lark_string(k + '=')} {_python_value(properties[k])}", k in required) for k in order]

    def tail(k: int) -> str:
        if k == len(params):
            return ""
        seg = f'", " {params[k][0]}'
        return (f"{seg} " if params[k][1] else f"({seg})? ") + tail(k + 1)

    def head(k: int) -> str | None:
        if k == len(params):
            return None
        first = f"{params[k][0]} {tail(k + 1)}".strip()
        if params[k][1]:
            return first
        rest = head(k + 1)
        return f"({first} | {rest})" if rest else f"({first})?"

    body = head(0) or ""
    return f'{_lark_string(tool.name + "(")} {body} ")"'.replace("  ", " ")


def _builtin_rules(tools: Sequence[Tool], opener: str) -> tuple[list[str], str]:
    """Meta's built-ins after <|python_tag|>: search / Wolfram calls, and code (not starting like a call)."""
    alternatives, rules = [], []
    queries = [t.name for t in tools if t.name in BUILTIN_QUERY_TOOLS]
    for name in queries:
        alternatives.append(f'{PYTHON_TAG} {_lark_string(name + ".call(query=")} %json {{"type": "string"}} ")"')
    if any(t.name == CODE_INTERPRETER for t in tools):
        code = f"/[^{'{' if opener == '{' else chr(92) + '['}\\s](.|\\n)*/"
        if queries:
            code += " & ~/(" + "|".join(queries) + r")\.call\(query=(.|\n)*/"
        rules.append(f"CODE: {code}")
        alternatives.append(f"{PYTHON_TAG} CODE")
    return alternatives, "\n".join(rules)


def llama3_grammar(tools: Sequence[Tool], choice: ToolChoice, *, tool_format: str = "json",
                   parallel: bool = True) -> str | None:
    """The grammar of a Llama 3 turn calling `tools` (Tool tuples) in Meta's JSON or pythonic syntax."""
    if choice.mode == "none":
        return None
    picked = _pick(tools, choice)
    custom = [t for t in picked if not t.builtin]
    opener = "[" if tool_format == "pythonic" else "{"
    lines = ["%llguidance {}"]
    turns = []
    if custom and tool_format == "pythonic":
        calls = [_pythonic_call(t) for t in custom]
        lines += [f"pcall_{i}: {c}" for i, c in enumerate(calls)]
        one = " | ".join(f"pcall_{i}" for i in range(len(calls)))
        lines.append(f'calls: "[" ({one})' + (f' (", " ({one}))*' if parallel else "") + ' "]"')
        lines.append(_PY_TERMINALS)
        turns.append(f"{PYTHON_TAG}? calls")
    elif custom:
        rules, names = _json_call_rules(custom, "parameters")
        lines += [rules, _calls(names, "; ", parallel)]
        turns.append(f"{PYTHON_TAG}? calls")
    builtin_turns, builtin_rules = _builtin_rules(picked, opener)
    turns += builtin_turns
    if builtin_rules:
        lines.append(builtin_rules)
    if choice.mode == "auto":
        lines.append(f"TEXT: /[^{chr(92) + opener}\\s](.|\\n)*/")
        turns = ["TEXT", "EMPTY", *turns]
        lines.append('EMPTY: ""')
    lines.insert(1, "start: " + " | ".join(turns))
    return "\n".join(lines) + "\n"


def json_grammar(tools: Sequence[Tool], choice: ToolChoice, *, parallel: bool = True) -> str | None:
    """Our JSON call format for templates without tools support: `{"name": ..., "arguments": {...}}`."""
    if choice.mode == "none":
        return None
    rules, names = _json_call_rules(_pick(tools, choice), "arguments")
    lines = ["%llguidance {}", "start: calls" + (" | TEXT | EMPTY" if choice.mode == "auto" else ""),
             rules, _calls(names, "\n", parallel)]
    if choice.mode == "auto":
        lines += [r"TEXT: /[^{\s](.|\n)*/", 'EMPTY: ""']
    return "\n".join(lines) + "\n"


def hermes_grammar(tools: Sequence[Tool], choice: ToolChoice, *, parallel: bool = True) -> str | None:
    """Hermes / ChatML `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks."""
    if choice.mode == "none":
        return None
    rules, names = _json_call_rules(_pick(tools, choice), "arguments")
    one = " | ".join(names)
    close = _lark_string("\n" + HERMES_CLOSE)
    lines = ["%llguidance {}", rules]
    if choice.mode == "auto":
        # Free text until `<tool_call>` (a lazy lexeme ends at its first match), then a call.
        lines += ["start: block* TEXT", f"block: head \"\\n\" ({one}) {close}",
                  f"head[lazy]: TEXT {_lark_string(HERMES_OPEN)}", r"TEXT: /(.|\n)*/"]
    else:
        block = f"{_lark_string(HERMES_OPEN + chr(10))} ({one}) {close}"
        lines += [f"block: {block}", "start: block" + (' ("\\n" block)*' if parallel else "")]
    return "\n".join(lines) + "\n"
