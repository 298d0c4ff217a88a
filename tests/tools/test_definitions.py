"""Tool definitions, tool_choice and the request object: bad input is one ValueError line naming
the field; tool_calling picks the syntax and grammar the tokenizer's format defines."""

import pytest

from llama_jax import tokenizer as tok_lib
from llama_jax.tokenizer import Llama3Tokenizer
from llama_jax.tools.definitions import ToolChoice, parse_tool_choice, parse_tools
from llama_jax.tools.request import tool_calling
from llama_jax.tools.syntaxes import JsonCalls, PythonicCalls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "d",
                                            "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("tools,message", [
    ({"a": 1}, r"^tools must be a list"),
    ([1], r"^tools\[0\] must be an object"),
    ([{"type": "retrieval", "function": {}}], r"^tools\[0\]\.type must be 'function'"),
    ([{"type": "function"}], r"^tools\[0\]\.function must be an object"),
    ([{"type": "function", "function": {"name": "9lives"}}], r"^tools\[0\]\.function\.name must be"),
    ([WEATHER, WEATHER], r"^tools\[1\]\.function\.name 'get_weather' is defined twice"),
    ([{"function": {"name": "f", "description": 3}}], r"^tools\[0\]\.function\.description must be a string"),
    ([{"function": {"name": "f", "parameters": {"type": "array"}}}], r"^tools\[0\]\.function\.parameters must be"),
    ([{"function": {"name": "f", "parameters": {"type": "object", "properties": []}}}],
     r"^tools\[0\]\.function\.parameters\.properties must be an object"),
    ([{"function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}],
     r"^tools\[0\]\.function\.parameters\.required must be a list"),
])
def test_bad_tools_are_one_line_errors_naming_the_field(tools, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_tools(tools)
    assert "\n" not in str(error.value)


def test_tool_choice():
    tools = parse_tools([WEATHER])
    assert parse_tool_choice(None, tools) == ToolChoice("auto") and parse_tool_choice(None, ()) == ToolChoice("none")
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse_tool_choice(named, tools) == ToolChoice("required", "get_weather")
    with pytest.raises(ValueError, match=r"^tool_choice\.function\.name 'nope' is not one of the tools"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(ValueError, match="^tool_choice 'required' needs tools"):
        parse_tool_choice("required", ())
    with pytest.raises(ValueError, match="^tool_choice must be"):
        parse_tool_choice("always", tools)


def test_tool_calling_follows_the_tokenizer_and_choice():
    tokenizer = Llama3Tokenizer(tok_lib.default_tokenizer_path())
    calling = tool_calling(tokenizer, [WEATHER], "required")
    assert isinstance(calling.syntax, JsonCalls) and "%json" in calling.grammar
    assert calling.encode_dialog(tokenizer, [{"role": "user", "content": "x"}]) == tokenizer.encode_dialog(
        [{"role": "user", "content": "x"}], [WEATHER])
    pythonic = tool_calling(tokenizer, [WEATHER], tool_format="pythonic")
    assert isinstance(pythonic.syntax, PythonicCalls) and 'get_weather(' in pythonic.grammar
    none = tool_calling(tokenizer, [WEATHER], "none")
    assert none.grammar is None
    parser = none.parser()
    parser.feed('{"name": "get_weather", "parameters": {}}')
    assert parser.finish().tool_calls == []
    with pytest.raises(ValueError, match="^tool_format must be 'json'"):
        tool_calling(tokenizer, [WEATHER], tool_format="xml")
    with pytest.raises(ValueError, match="^parallel_tool_calls must be"):
        tool_calling(tokenizer, [WEATHER], parallel_tool_calls="yes")
