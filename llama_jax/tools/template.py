"""Tools with Hugging Face chat templates (Llama-architecture models that are not Meta's Llama 3).

A template that renders tools gets them as transformers' `apply_chat_template(messages, tools=...)`
hands them over (OpenAI definitions, messages with tool_calls and the tool role as given), and its
call syntax is read off its text: `<tool_call>` blocks (Hermes / ChatML, Qwen-style) or Meta's
Llama 3.1 JSON. A template that never mentions tools gets them in a system message we write,
describing our JSON call format `{"name": ..., "arguments": {...}}`; its assistant calls and tool
results are written into the dialog as plain messages the template can render.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from llama_jax.tools.definitions import Tool, check_tool_call_ids, message_tool_calls, parse_tools
from llama_jax.tools.syntaxes import HERMES_OPEN, HermesCalls, JsonCalls

HERMES, LLAMA3_JSON, JSON = "hermes", "llama3_json", "json"
_MENTIONS_TOOLS = re.compile(r"\btools\b")

# The system message for a template without tools support (our wording; the format is ours too).
FALLBACK_HEAD = ("You can call functions. Here they are, one JSON definition a line:\n")
FALLBACK_TAIL = ("\n\nTo call a function, answer with only a JSON object of the form "
                 '{"name": <function name>, "arguments": <arguments as a JSON object>}, one a line for several '
                 "calls, and nothing else. If no function helps, answer normally.")


def template_call_syntax(source: str | None) -> str | None:
    """The call syntax a chat template defines: "hermes", "llama3_json", or None if it renders no tools."""
    if not source or not _MENTIONS_TOOLS.search(source):
        return None
    if HERMES_OPEN in source:
        return HERMES
    if "<|python_tag|>" in source or '"parameters"' in source:
        return LLAMA3_JSON
    return JSON


def fallback_system_prompt(tools: Sequence[Tool]) -> str:
    return FALLBACK_HEAD + "\n".join(json.dumps(t.openai()["function"]) for t in tools) + FALLBACK_TAIL


def _fallback_messages(messages: Sequence[Mapping], tools: Sequence[Tool]) -> list[dict]:
    """The dialog for a template without tools: our system prompt first (before the caller's system
    text), calls as the JSON lines they were, results as user messages naming their call."""
    out, names = [], {}
    prompt = fallback_system_prompt(tools)
    for i, message in enumerate(messages):
        role = message.get("role")
        if i == 0 and role == "system":
            prompt = f"{prompt}\n\n{message.get('content') or ''}"
            continue
        if role == "assistant" and message.get("tool_calls"):
            calls = message_tool_calls(message, f"messages[{i}]")
            names.update((c.id, c.name) for c in calls)
            lines = [json.dumps({"name": c.name, "arguments": c.arguments}) for c in calls]
            content = message.get("content") or ""
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + lines)})
        elif role in ("tool", "ipython"):
            name = names.get(message.get("tool_call_id"), "the function")
            out.append({"role": "user", "content": f"Result of {name}: {message.get('content') or ''}"})
        else:
            out.append(dict(message))
    return [{"role": "system", "content": prompt}] + out


def chat_with_tools(source: str | None, messages: Sequence[Mapping],
                    tools: Sequence[Mapping] | None) -> tuple[list, list | None]:
    """(messages, tools) to render a template with, as transformers would; tools folded into the
    messages (and None returned for them) when the template does not render tools."""
    parsed = parse_tools(tools)
    if not parsed:
        return list(messages), None
    check_tool_call_ids(messages)
    if template_call_syntax(source) is None:
        return _fallback_messages(messages, parsed), None
    return list(messages), list(tools)  # as given, as transformers hands them over (checked above)


def hf_call_syntax(source: str | None, tools: Sequence[Tool]):
    """The syntax the parser reads a model with this chat template in (tools: Tool tuples)."""
    names = frozenset(t.name for t in tools)
    kind = template_call_syntax(source)
    return HermesCalls(names) if kind == HERMES else JsonCalls(names)
