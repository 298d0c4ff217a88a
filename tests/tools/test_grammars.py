"""Every grammar driven by llguidance over the real vocabulary with random allowed tokens (fixed
seeds): each finished output parses, token by token and whole alike, into calls of the allowed tools
whose arguments satisfy their schemas (jsonschema), or, where text is allowed, into that text."""

import json
import random

import jsonschema
import llguidance
import pytest

from llama_jax import tokenizer as tok_lib
from llama_jax.tokenizer import Llama3Tokenizer
from llama_jax.tools.definitions import ToolChoice, parse_tools
from llama_jax.tools.grammars import hermes_grammar, json_grammar, llama3_grammar
from llama_jax.tools.parser import ToolCallParser
from llama_jax.tools.syntaxes import HermesCalls, JsonCalls, llama3_syntax
from llama_jax.tools.definitions import CallIds
from tests.tools.common import RandomWalk, feed_tokens, lltokenizer

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                         "days": {"type": "integer"}, "hourly": {"type": "boolean"},
                                         "hours": {"type": "array", "items": {"type": "number"}}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}},
])
BUILTINS = parse_tools([{"type": "function", "function": {"name": n}} for n in
                        ("brave_search", "wolfram_alpha", "code_interpreter")])
SEEDS = range(6)


@pytest.fixture(scope="module")
def llama3():
    tokenizer = Llama3Tokenizer(tok_lib.default_tokenizer_path())
    stops = [tokenizer.eot_id, tokenizer.eom_id]
    ll = lltokenizer(tokenizer, stops)
    return tokenizer, ll, RandomWalk(tokenizer, ll, stops)


def check_calls(turn, tools, choice: ToolChoice, parallel: bool):
    allowed = {t.name: t for t in tools if choice.function in (None, t.name)}
    assert turn.tool_calls and turn.content is None and turn.finish_reason == "tool_calls"
    assert parallel or len(turn.tool_calls) == 1
    for call in turn.tool_calls:
        tool = allowed[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool.call_schema())


def whole_parse(syntax, tokenizer, ids, seed):
    """The same tokens given to the parser as one text (special tokens through feed_special)."""
    specials = {i: name for name, i in tokenizer.special_tokens.items()}
    parser, text = ToolCallParser(syntax, CallIds(seed)), []
    for token in ids + [None]:
        if token is None or token in specials:
            parser.feed(tokenizer.decode(text))
            text = []
            if token is not None:
                parser.feed_special(specials[token])
        else:
            text.append(token)
    return parser.finish()


@pytest.mark.parametrize("tool_format", ["json", "pythonic"])
@pytest.mark.parametrize("choice,parallel", [(ToolChoice("required"), True), (ToolChoice("required"), False),
                                             (ToolChoice("required", "get_weather"), True),
                                             (ToolChoice("auto"), True)])
@pytest.mark.parametrize("tools", [TOOLS, TOOLS + BUILTINS], ids=["custom", "with_builtins"])
def test_llama3_grammar_outputs_parse_into_valid_calls(llama3, tool_format, choice, parallel, tools):
    tokenizer, ll, walk = llama3
    grammar = llama3_grammar(tools, choice, tool_format=tool_format, parallel=parallel)
    assert llguidance.LLMatcher.validate_grammar(grammar, ll) == ""
    syntax = llama3_syntax(tools, tool_format)
    tag, encode = [tokenizer.python_tag_id], lambda text: tokenizer.encode(text, bos=False, eos=False)
    starts = [[], tag, encode("{" if tool_format == "json" else "["), [], tag + encode("brave_search.call(query="),
              tag + encode("wolfram_alpha.call(query=")]
    kinds = set()
    for seed in SEEDS:
        first = starts[seed] if tools[-1].builtin else starts[seed % 3]
        ids = walk(grammar, random.Random(seed), first=first)
        turn, _ = feed_tokens(syntax, tokenizer, ids, seed)
        whole = whole_parse(syntax, tokenizer, ids, seed)
        assert (turn.content, turn.tool_calls) == (whole.content, whole.tool_calls)
        if choice.mode == "auto" and not turn.tool_calls:
            assert turn.content == tokenizer.decode(ids[:-1]).strip()
            kinds.add("text")
            continue
        check_calls(turn, tools, choice, parallel)
        kinds.update(c["function"]["name"] for c in turn.tool_calls)
    assert kinds & {"get_weather", "now"} and (choice.mode != "auto" or "text" in kinds)
    if tools[-1].builtin and choice.function is None:
        assert {"brave_search", "wolfram_alpha", "code_interpreter"} <= kinds
