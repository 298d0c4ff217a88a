"""Lark grammars for tool calls over the real Llama 3 vocabulary: a Llama 3.1 JSON tool call through
an inline `%json` schema ended by a special token, free text or a call after <|python_tag|>
(tool_choice auto, triggered by a special token), and free text until the string "<function"
(a lazy terminal: Llama 3.1's function_tag format)."""

import json
import re

import numpy as np
import pytest

from llama_jax.grammar import json_schema_source
from tests.grammar.common import allowed_ids, random_walk, text_of
from tests.grammar.validator import errors

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CALL = {
    "type": "object",
    "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER},
    "required": ["name", "parameters"],
    "additionalProperties": False,
}
JSON_CALL = f"start: call (<|eom_id|> | <|eot_id|>)\ncall: %json {json_schema_source(CALL)}\n"
AUTO_CALL = f"start: TEXT | <|python_tag|> call <|eom_id|>\nTEXT: /(.|\\n)*/\ncall: %json {json_schema_source(CALL)}\n"
TAG_CALL = f"""start: f_call* f_end
f_end: TEXT
TEXT: /(.|\\n)*/
f_hd[lazy]: TEXT "<function"
f_call: f_hd "=get_weather>" %json {json_schema_source(WEATHER)} "</function>"
"""


@pytest.fixture(scope="module")
def llama3(compilers):
    return compilers("llama3")


def test_json_tool_call_ends_with_its_special_token(llama3):
    tokenizer, compiler = llama3
    grammar = compiler.lark(JSON_CALL)
    assert compiler.lark(JSON_CALL) is grammar
    rng = np.random.default_rng(0)
    for _ in range(20):
        tokens, finished = random_walk(grammar.matcher(), rng, 300)
        assert finished and tokens[-1] in (tokenizer.eom_id, tokenizer.eot_id)
        call = json.loads(tokenizer.decode(tokens[:-1]))
        assert errors(call, CALL) == [] and call["name"] == "get_weather"
    matcher = grammar.matcher()  # the embedded schema's whitespace is bounded as response_format's is
    assert not all(matcher.accept(t) for t in tokenizer.encode("{" + " " * 21, False, False))


def test_auto_tool_choice_triggered_by_python_tag(llama3):
    tokenizer, compiler = llama3
    grammar = compiler.lark(AUTO_CALL)
    start = grammar.matcher()
    row = np.zeros(compiler.vocabulary.mask_words, np.uint32)
    start.fill(row)
    allowed = set(allowed_ids(row, compiler.vocabulary.vocab_size).tolist())
    specials = set(tokenizer.special_tokens.values())
    # Any text, the trigger, or an empty answer; no other special token.
    assert allowed & specials == {tokenizer.python_tag_id, *compiler.vocabulary.stop_tokens}
    assert len(allowed) > 127_000

    text = grammar.matcher()
    assert all(text.accept(t) for t in tokenizer.encode("It is sunny.", False, False))
    assert not text.accept(tokenizer.python_tag_id)  # the call comes first or not at all

    rng = np.random.default_rng(1)
    for _ in range(10):
        tokens, finished = random_walk(grammar.matcher(), rng, 300, prefix=[tokenizer.python_tag_id])
        assert finished and tokens[-1] == tokenizer.eom_id
        assert errors(json.loads(tokenizer.decode(tokens[1:-1])), CALL) == []


def test_function_tag_call_after_free_text(llama3):
    tokenizer, compiler = llama3
    grammar = compiler.lark(TAG_CALL)
    rng = np.random.default_rng(2)
    for _ in range(10):
        matcher = grammar.matcher()
        tokens, _ = random_walk(matcher, rng, 200, prefix=tokenizer.encode("Let me look. <function", False, False))
        found = re.match(r"Let me look. <function=get_weather>(.*?)</function>", tokenizer.decode(tokens), re.S)
        assert found, tokenizer.decode(tokens)
        assert errors(json.loads(found.group(1)), WEATHER) == []
        assert matcher.is_accepting()  # free text again after the call: the model may stop
    forced = grammar.matcher()
    assert all(forced.accept(t) for t in tokenizer.encode("Hi <function", False, False))
    assert not all(forced.accept(t) for t in tokenizer.encode("=get_time>", False, False))  # only the tools named
