"""Meta's Llama 3 tool formats: prompts with tools against the exact texts of llama-models'
prompt_format.md files, and dialogs with tool calls and results against llama-models' ChatFormat ids."""

import json
import re
from pathlib import Path

import pytest

from llama_jax import tokenizer as tok_lib
from llama_jax.tokenizer import Llama3Tokenizer
from llama_jax.tools.definitions import Tool, parse_tools
from llama_jax.tools.llama3 import ipython_system_text, json_tools_prompt, llama3_turns, pythonic_tools_prompt

chat_format = pytest.importorskip("llama_models.llama3.chat_format")
datatypes = pytest.importorskip("llama_models.datatypes")
meta_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
LLAMA_MODELS = Path(chat_format.__file__).parents[1]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "brave_search", "description": "web search"}}
WOLFRAM = {"type": "function", "function": {"name": "wolfram_alpha", "description": "maths"}}
CODE = {"type": "function", "function": {"name": "code_interpreter", "description": "runs Python"}}


def doc_prompts(relative: str) -> dict[str, str]:
    """Section title -> the Input Prompt Format block of one of Meta's prompt_format.md files."""
    text = (LLAMA_MODELS / relative).read_text()
    sections = re.split(r"\n## ", text)
    found = {}
    for section in sections:
        block = re.search(r"##### Input Prompt Format\n```\n(.*?)\n```", section, re.S)
        if block:
            found[section.split("\n", 1)[0].strip()] = block.group(1)
    return found


@pytest.fixture(scope="module")
def ours():
    return Llama3Tokenizer(tok_lib.default_tokenizer_path())


@pytest.fixture(scope="module")
def meta_format():
    return chat_format.ChatFormat(meta_tokenizer.Tokenizer(Path(tok_lib.default_tokenizer_path())))


def test_json_tools_prompt_is_metas_llama3_1_example(ours):
    expected = doc_prompts("llama3_1/prompt_format.md")["JSON based tool calling"]
    # Meta's example writes the parameters in its own (non-JSON-schema) shape; rendered as given.
    parameters = {"type": "object", "properties": [
        {"n": {"type": "object", "description": "The number of songs to return"}},
        {"genre": {"type": "object", "description": "The genre of the songs to return"}}], "required": ["n"]}
    tools = (Tool("trending_songs", "Returns the trending songs on a Music site", parameters),)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Use tools to get latest trending songs"}]
    ids = ours.encode_dialog(messages, tools, today="21 September 2024")
    assert ours.decode(ids) == expected


def test_builtin_tools_system_prompt_is_metas_llama3_1_example(ours):
    prompts = doc_prompts("llama3_1/prompt_format.md")
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    ids = ours.encode_dialog(messages, [SEARCH, WOLFRAM], today="21 September 2024")
    assert ours.decode(ids) == prompts["Builtin Tool Calling"]
    full = prompts["Built-in tools full interaction"]
    ids = ours.encode_dialog([{"role": "user", "content": "What is the 100th decimal of pi?"}], [SEARCH, WOLFRAM])
    assert full.startswith(ours.decode(ids)[:-len("<|start_header_id|>assistant<|end_header_id|>\n\n")])


def test_pythonic_system_prompt_is_metas_llama3_2_example(ours):
    prompts = doc_prompts("llama3_2/text_prompt_format.md")
    parameters = {"type": "dict", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The name of the city to get the weather for"},
        "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                   "default": "celsius"}}}
    tools = (Tool("get_weather", "Get weather info for places", parameters),)
    ids = ours.encode_dialog([{"role": "user", "content": "What is the weather in SF and Seattle?"}], tools,
                             tool_format="pythonic")
    assert ours.decode(ids) == prompts["Zero shot function calling"]
    code = ours.encode_dialog([{"role": "user", "content": "Write code to check if number is prime. Use it to "
                                                           "verify if number 7 is prime"}],
                              [CODE], today="24 September 2024", tool_format="pythonic")
    assert ours.decode(code) == prompts["Code Interpreter"]


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


WEATHER_SYSTEM = ipython_system_text([], "Be brief.", None)
DIALOGS = {
    # name: (OpenAI messages, tools, tool_format, Meta's RawMessages as (role, content, tool calls, stop reason))
    "one_call_and_result": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})]},
         {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}],
        [WEATHER], "json",
        [("system", WEATHER_SYSTEM, [], None),
         ("user", json_tools_prompt([parse_tools([WEATHER])[0].openai()]), [], None),
         ("user", "Weather in Paris?", [], None),
         ("assistant", "", [("get_weather", {"city": "Paris"})], None), ("tool", '{"temp": 21}', [], None)]),
    "several_calls": (
        [{"role": "user", "content": "Paris and Rome?"},
         {"role": "assistant", "content": "", "tool_calls": [call("a", "get_weather", {"city": "Paris"}),
                                                             call("b", "get_weather", {"city": "Rome", "days": 2})]},
         {"role": "tool", "tool_call_id": "a", "content": "21"}, {"role": "tool", "tool_call_id": "b", "content": "25"},
         {"role": "assistant", "content": "21 and 25."}, {"role": "user", "content": "Thanks"}],
        None, "json",
        [("user", "Paris and Rome?", [], None),
         ("assistant", "", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "days": 2})], None),
         ("tool", "21", [], None), ("tool", "25", [], None), ("assistant", "21 and 25.", [], None),
         ("user", "Thanks", [], None)]),
    "builtin_search_waits_with_eom": (
        [{"role": "user", "content": "Gold price?"},
         {"role": "assistant", "tool_calls": [call("s", "brave_search", {"query": "gold price"})]},
         {"role": "ipython", "content": "2000 USD"}],
        None, "json",
        [("user", "Gold price?", [], None), ("assistant", "", [("brave_search", {"query": "gold price"})], "eom"),
         ("tool", "2000 USD", [], None)]),
    "code_interpreter_python_tag_and_eom": (
        [{"role": "user", "content": "Is 7 prime?"},
         {"role": "assistant", "content": "",
          "tool_calls": [call("c", "code_interpreter", {"code": "print(all(7 % d for d in range(2, 7)))"})]},
         {"role": "tool", "tool_call_id": "c", "content": "True"}],
        None, "json",
        [("user", "Is 7 prime?", [], None),
         ("assistant", "", [("code_interpreter", {"code": "print(all(7 % d for d in range(2, 7)))"})], "eom"),
         ("tool", "True", [], None)]),
    "definitions_in_the_system_message": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}],
        [WEATHER, SEARCH], "json",
        [("system", ipython_system_text(["brave_search"], "Be brief.\n\n" + json_tools_prompt(
            [parse_tools([WEATHER])[0].openai()]), "7 Dec 2026"), [], None),
         ("user", "Weather in Oslo?", [], None)]),
    "pythonic_call": (
        [{"role": "user", "content": "Weather in SF?"},
         {"role": "assistant", "tool_calls": [call("p", "get_weather", {"city": "SF", "days": 3})]},
         {"role": "tool", "tool_call_id": "p", "content": "25 C"}],
        None, "pythonic",
        [("user", "Weather in SF?", [], None), ("assistant", "", [("get_weather", {"city": "SF", "days": 3})], None),
         ("tool", "25 C", [], None)]),
}


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog_with_tool_calls_matches_chat_format(ours, meta_format, name):
    messages, tools, tool_format, expected = DIALOGS[name]
    options = {"tools_in": "system", "today": "7 Dec 2026"} if name == "definitions_in_the_system_message" else {}
    raw = [datatypes.RawMessage(
        role=role, content=content,
        stop_reason=datatypes.StopReason.end_of_message if stop == "eom" else datatypes.StopReason.end_of_turn,
        tool_calls=[datatypes.ToolCall(call_id=str(i), tool_name=n, arguments=a) for i, (n, a) in enumerate(calls)])
        for role, content, calls, stop in expected]
    prompt_format = datatypes.ToolPromptFormat.python_list if tool_format == "pythonic" else None
    reference = meta_format.encode_dialog_prompt(raw, prompt_format).tokens
    assert ours.encode_dialog(messages, tools, tool_format=tool_format, **options) == reference


def test_several_pythonic_calls_are_one_list(ours):
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call("a", "f", {"s": "q\"1"}), call("b", "g", {"b": True})]}]
    turns = llama3_turns(messages, tool_format="pythonic")
    assert turns[1].text == '[f(s="q\\"1"), g(b=True)]' and turns[1].end == "<|eot_id|>"


def test_tool_result_must_name_an_earlier_call(ours):
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call("call_1", "get_weather", {"city": "Oslo"})]},
                {"role": "tool", "tool_call_id": "call_2", "content": "1"}]
    with pytest.raises(ValueError, match=r"messages\[2\]\.tool_call_id 'call_2' names no call"):
        ours.encode_dialog(messages, [WEATHER])
    bad = [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"):
        ours.encode_dialog(bad)
    with pytest.raises(ValueError, match="tool_format must be one of"):
        ours.encode_dialog([{"role": "user", "content": "x"}], [WEATHER], tool_format="xml")
