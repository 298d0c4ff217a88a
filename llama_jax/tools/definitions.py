"""OpenAI tool definitions, tool_choice and tool-calling messages, checked once at the door.

Everything downstream (prompt formats, grammars, the parser) takes the `Tool` tuples made here, so
a malformed request is one ValueError line naming the field, never a KeyError from a template.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
from collections.abc import Mapping, Sequence

# Meta's built-in tools: a function of one of these names is rendered as Meta's built-in (the
# `Environment: ipython` / `Tools:` lines), and called with its fixed arguments.
BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha")
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOLS = (*BUILTIN_QUERY_TOOLS, CODE_INTERPRETER)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class Tool:
    """One OpenAI `{"type": "function", "function": {...}}` entry; parameters is a JSON schema object."""

    name: str
    description: str
    parameters: Mapping

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_TOOLS

    def openai(self) -> dict:
        """The definition as OpenAI (and HF chat templates) spell it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                  "parameters": dict(self.parameters)}}

    def call_schema(self) -> dict:
        """JSON schema of this tool's arguments; Meta's built-ins take fixed ones."""
        if self.name in BUILTIN_QUERY_TOOLS:
            return {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
                    "additionalProperties": False}
        if self.name == CODE_INTERPRETER:
            return {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"],
                    "additionalProperties": False}
        return dict(self.parameters)


def parse_tools(tools: Sequence[Mapping] | None) -> tuple[Tool, ...]:
    """OpenAI `tools` -> Tool tuples; ValueError naming the first bad field (tools[i].function.name...)."""
    if tools is None:
        return ()
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    parsed, names = [], set()
    for i, entry in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
        if entry.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be 'function', got {entry.get('type')!r}")
        function = entry.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"{where}.function must be an object with name, description and parameters")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, _ . - (not starting with a "
                             f"digit), got {name!r}")
        if name in names:
            raise ValueError(f"{where}.function.name {name!r} is defined twice")
        names.add(name)
        description = function.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"{where}.function.description must be a string, got {type(description).__name__}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise ValueError(f"{where}.function.parameters must be a JSON schema of type 'object'")
        if not isinstance(parameters.get("properties", {}), Mapping):
            raise ValueError(f"{where}.function.parameters.properties must be an object")
        required = parameters.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{where}.function.parameters.required must be a list of property names")
        try:
            json.dumps(parameters)
        except (TypeError, ValueError):
            raise ValueError(f"{where}.function.parameters is not JSON-serializable") from None
        parsed.append(Tool(name, description, dict(parameters)))
    return tuple(parsed)


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """mode: "none", "auto" or "required"; function: the one tool a named choice forces."""

    mode: str
    function: str | None = None


def parse_tool_choice(choice, tools: Sequence[Tool]) -> ToolChoice:
    """OpenAI tool_choice ("none" | "auto" | "required" | {"type": "function", "function": {"name"}})."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return ToolChoice(choice)
    if isinstance(choice, Mapping) and choice.get("type") == "function" and isinstance(choice.get("function"),
                                                                                        Mapping):
        name = choice["function"].get("name")
        if name not in {t.name for t in tools}:
            raise ValueError(f"tool_choice.function.name {name!r} is not one of the tools "
                             f"{sorted(t.name for t in tools)}")
        return ToolChoice("required", name)
    raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                     f"{{'name': ...}}}}, got {choice!r}")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call of an assistant message: arguments as the parsed JSON object."""

    id: str
    name: str
    arguments: dict


def message_tool_calls(message: Mapping, where: str) -> tuple[ToolCall, ...]:
    """The checked `tool_calls` of an assistant message (OpenAI: arguments is a JSON string; a dict,
    as HF chat-template users pass, is taken too)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise ValueError(f"{where}.tool_calls must be a list")
    parsed = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            raise ValueError(f"{at} must be {{id, type: 'function', function: {{name, arguments}}}}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{at}.type must be 'function', got {call.get('type')!r}")
        name = call["function"].get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at}.function.name must be a non-empty string, got {name!r}")
        arguments = call["function"].get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise ValueError(f"{at}.function.arguments is not valid JSON: {arguments[:60]!r}") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{at}.function.arguments must be a JSON object")
        call_id = call.get("id", "")
        if not isinstance(call_id, str):
            raise ValueError(f"{at}.id must be a string")
        parsed.append(ToolCall(call_id, name, arguments))
    return tuple(parsed)


def check_tool_call_ids(messages: Sequence[Mapping]) -> None:
    """Every tool message's tool_call_id names a call an earlier assistant message made."""
    made = set()
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            made.update(call.id for call in message_tool_calls(message, f"messages[{i}]") if call.id)
        elif message.get("role") == "tool" and "tool_call_id" in message:
            call_id = message["tool_call_id"]
            if call_id not in made:
                raise ValueError(f"messages[{i}].tool_call_id {call_id!r} names no call made earlier in the dialog")


class CallIds:
    """"call_" + 24 letters and digits; deterministic under a seed (tests), else from os.urandom."""

    ALPHABET = string.ascii_letters + string.digits

    def __init__(self, seed: int | None = None):
        self._random = random.Random(seed)

    def __call__(self) -> str:
        return "call_" + "".join(self._random.choice(self.ALPHABET) for _ in range(24))
