"""Meta's Llama 3.1 / 3.2 / 3.3 tool-calling prompt formats, as llama-models defines them.

A dialog with tools becomes `Turn`s (role, text, whether a <|python_tag|> leads, the end token),
which `Llama3Tokenizer.encode_dialog` turns into ids: the ids llama-models' ChatFormat gives for the
same RawMessages (tested), with the tool definitions rendered as in Meta's prompt_format.md files.

- "json" (Llama 3.1 / 3.3): the definitions go in a user message of their own before the first user
  message (Meta's default in llama3_1/prompt_format.md; tools_in="system" appends them to the system
  message instead); a call is `{"name": ..., "parameters": {...}}`.
- "pythonic" (Llama 3.2 1B / 3B): the definitions go in the system message; a call is
  `[f(a=1), g(b="x")]`.
- Built-ins (either format): a tool named brave_search / wolfram_alpha / code_interpreter turns on
  `Environment: ipython` (+ the `Tools:` line); their calls end the turn with <|eom_id|> and the
  results come back in the `ipython` role (OpenAI's `tool` role maps there).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from llama_jax.tools.definitions import (BUILTIN_QUERY_TOOLS, CODE_INTERPRETER, Tool, ToolCall,
                                         check_tool_call_ids, message_tool_calls, parse_tools)

TOOL_FORMATS = ("json", "pythonic")
EOT, EOM = "<|eot_id|>", "<|eom_id|>"
KNOWLEDGE_CUTOFF = "Cutting Knowledge Date: December 2023"

# Meta's instructions around the JSON definitions (llama3_1/prompt_format.md, "JSON based tool calling").
JSON_TOOLS_HEAD = ("Answer the user's question by making use of the following functions if needed.\n"
                   "If none of the function can be used, please say so.\n"
                   "Here is a list of functions in JSON format:\n")
JSON_TOOLS_TAIL = "\n\nReturn function calls in JSON format."
# Meta's Llama 3.2 system prompt for zero-shot function calling (llama3_2/text_prompt_format.md).
PYTHONIC_TOOLS_HEAD = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the function can be used, point it out. If the given question lacks the parameters required "
    "by the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "You SHOULD NOT include any other text in the response.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n\n")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One message as Meta's chat format writes it: header role, <|python_tag|>?, text, end token."""

    role: str
    text: str
    python_tag: bool = False
    end: str = EOT


def indented_json(value, depth: int = 0) -> str:
    """JSON indented by 4 as Meta's JSON tool prompt shows it: objects and lists of objects one item a
    line, lists of plain values on one line (`"required": ["n"]`)."""
    pad, inner = "    " * depth, "    " * (depth + 1)
    if isinstance(value, Mapping) and value:
        items = [f"{inner}{json.dumps(k)}: {indented_json(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{indented_json(v, depth + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value)


def json_tools_prompt(definitions: Sequence[Mapping]) -> str:
    """Meta's JSON tool instructions; `definitions` are OpenAI {"type": "function", "function": ...} dicts."""
    return JSON_TOOLS_HEAD + "\n".join(indented_json(d) for d in definitions) + JSON_TOOLS_TAIL


def pythonic_tools_prompt(functions: Sequence[Mapping]) -> str:
    """Meta's Llama 3.2 system prompt; `functions` are {name, description, parameters} dicts."""
    return PYTHONIC_TOOLS_HEAD + json.dumps(list(functions), indent=4)


def ipython_system_text(builtins: Sequence[str], system: str, today: str | None) -> str:
    """`Environment: ipython`, the `Tools:` line for search / Wolfram (else a blank line), the dates, then
    the system text: the system prompts of Meta's built-in, JSON and code-interpreter examples."""
    text = "Environment: ipython\n"
    queries = [name for name in BUILTIN_QUERY_TOOLS if name in builtins]
    if queries:
        text += f"Tools: {', '.join(queries)}\n"
    elif today is not None or system:
        text += "\n"
    if today is not None:
        text += f"{KNOWLEDGE_CUTOFF}\nToday Date: {today}\n"
    return text + (f"\n{system}\n" if system else "")


def python_literal(value) -> str:
    """A JSON value as a Python literal (strings double-quoted and escaped, True / False / None)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "None"
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {python_literal(v)}"
                               for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def pythonic_call(call: ToolCall) -> str:
    return f"{call.name}(" + ", ".join(f"{k}={python_literal(v)}" for k, v in call.arguments.items()) + ")"


def call_text(call: ToolCall, tool_format: str) -> str:
    """One call as Meta's ChatFormat writes it in an assistant message."""
    if call.name in BUILTIN_QUERY_TOOLS:
        return f'{call.name}.call(query="{call.arguments.get("query", "")}")'
    if call.name == CODE_INTERPRETER:
        return str(call.arguments.get("code", ""))
    if tool_format == "pythonic":
        return f"[{pythonic_call(call)}]"
    return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})


def _content_text(message: Mapping, where: str) -> str:
    """A message's text; None (an assistant message that only calls) is empty."""
    content = message.get("content")
    if content is None and (message.get("tool_calls") or "content" in message):
        return ""
    if not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string, got {type(content).__name__}")
    return content


def message_turn(message: Mapping, tool_format: str = "json", where: str = "message") -> Turn:
    """One chat message (OpenAI roles, tool_calls, the tool / ipython roles) as a Turn."""
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"a chat message is a dict with 'role' and 'content', got {message!r}")
    role, text = message["role"], _content_text(message, where)
    if role != "assistant":
        if message.get("tool_calls"):
            raise ValueError(f"{where}.tool_calls: only assistant messages make calls, this one is {role!r}")
        return Turn(role, text)
    calls = message_tool_calls(message, where)
    custom = [c for c in calls if c.name not in BUILTIN_QUERY_TOOLS + (CODE_INTERPRETER,)]
    if tool_format == "pythonic" and len(custom) > 1:
        # Meta's 3.2 format puts several calls in one list (text_prompt_format.md), where ChatFormat
        # would write a list per call.
        pieces = [call_text(c, tool_format) for c in calls if c not in custom]
        pieces.insert(calls.index(custom[0]), "[" + ", ".join(pythonic_call(c) for c in custom) + "]")
    else:
        pieces = [call_text(c, tool_format) for c in calls]
    stop = message.get("stop_reason")
    if stop not in (None, "end_of_turn", "end_of_message"):
        raise ValueError(f"{where}.stop_reason must be 'end_of_turn' or 'end_of_message', got {stop!r}")
    waits = stop == "end_of_message" or (stop is None and len(custom) < len(calls))
    return Turn(role, text + "".join(pieces), python_tag=bool(calls) and calls[0].name == CODE_INTERPRETER,
                end=EOM if waits else EOT)


def llama3_turns(messages: Sequence[Mapping], tools: Sequence[Mapping] | Sequence[Tool] | None = None, *,
                 tool_format: str = "json", tools_in: str = "user", today: str | None = None) -> list[Turn]:
    """The Turns of a dialog, with `tools` (OpenAI definitions) rendered in Meta's format."""
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"tool_format must be one of {TOOL_FORMATS}, got {tool_format!r}")
    if tools_in not in ("user", "system"):
        raise ValueError(f"tools_in must be 'user' or 'system', got {tools_in!r}")
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(f"messages must be a list of chat messages, got {type(messages).__name__}")
    tools = tools if tools and isinstance(tools[0], Tool) else parse_tools(tools)
    check_tool_call_ids(messages)
    turns = [message_turn(m, tool_format, f"messages[{i}]") for i, m in enumerate(messages)]
    if not tools:
        return turns
    builtins = [t.name for t in tools if t.builtin]
    custom = [t for t in tools if not t.builtin]
    system = turns[0].text if turns and turns[0].role == "system" else None
    rest = turns[1:] if system is not None else turns
    content, tools_turn = system or "", None
    if custom and tool_format == "pythonic":
        prompt = pythonic_tools_prompt([{"name": t.name, "description": t.description,
                                         "parameters": dict(t.parameters)} for t in custom])
        content = prompt + (f"\n\n{content}" if content else "")
    elif custom:
        prompt = json_tools_prompt([t.openai() for t in custom])
        if tools_in == "system":
            content = (f"{content}\n\n" if content else "") + prompt
        else:
            tools_turn = Turn("user", prompt)
    # Meta's JSON example runs in the ipython environment too (the model may answer <|python_tag|>{...}).
    if builtins or (custom and tool_format == "json"):
        system_text = ipython_system_text(builtins, content, today)
    elif today is not None:
        system_text = f"{KNOWLEDGE_CUTOFF}\nToday Date: {today}\n" + (f"\n{content}\n" if content else "")
    else:
        system_text = content
    head = [Turn("system", system_text)] if system_text or system is not None else []
    if tools_turn is not None:
        first_user = next((k for k, t in enumerate(rest) if t.role == "user"), len(rest))
        rest = rest[:first_user] + [tools_turn] + rest[first_user:]
    return head + rest
