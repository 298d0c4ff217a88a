"""JSON schemas enforced by llguidance on the real Llama 3 vocabulary and the byte vocabulary: a
random model sampling among the allowed tokens always ends with JSON that json.loads reads and the
schema accepts (tests/grammar/validator.py; pydantic's own validation for a pydantic model)."""

import json
from typing import Literal, Optional

import numpy as np
import pydantic
import pytest

from tests.grammar.common import random_walk, text_of
from tests.grammar.validator import errors

RUNS = 50
MAX_TOKENS = 400  # a bounded schema's longest output here is ~150 byte tokens

ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "minLength": 1, "maxLength": 12},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["street", "zip"],
    "additionalProperties": False,
}
BOUNDED_SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "score": {"type": "integer", "exclusiveMinimum": -5, "exclusiveMaximum": 5},
            "home": ADDRESS,
            "role": {"enum": ["admin", "user", 7, None]},
            "version": {"const": "v1"},
        },
        "required": ["name", "age", "home", "version"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
            "pairs": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                      "minItems": 2, "maxItems": 2},
        },
        "required": ["tags", "pairs"],
        "additionalProperties": False,
    },
    "defs_anyof_nullable": {
        "$defs": {"address": ADDRESS, "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{1,3}$"}},
        "type": "object",
        "properties": {
            "ship_to": {"$ref": "#/$defs/address"},
            "bill_to": {"anyOf": [{"$ref": "#/$defs/address"}, {"type": "null"}]},
            "code": {"$ref": "#/$defs/code"},
            "note": {"type": ["string", "null"], "maxLength": 6},
            "flag": {"type": "boolean"},
        },
        "required": ["ship_to", "bill_to", "flag"],
        "additionalProperties": False,
    },
}


def test_validator_rejects_what_it_should():
    schema = BOUNDED_SCHEMAS["nested"]
    good = {"name": "ab", "age": 3, "home": {"street": "x", "zip": "12345"}, "version": "v1"}
    assert errors(good, schema) == []
    for bad in ({**good, "age": 131}, {**good, "name": "a"}, {**good, "version": "v2"}, {**good, "extra": 1},
                {**good, "home": {"street": "x", "zip": "1234"}}, {**good, "role": "root"}, {**good, "score": 5},
                {k: v for k, v in good.items() if k != "age"}, {**good, "age": "3"}):
        assert errors(bad, schema), bad
    nullable = BOUNDED_SCHEMAS["defs_anyof_nullable"]
    ok = {"ship_to": good["home"], "bill_to": None, "flag": True}
    assert errors(ok, nullable) == []
    assert errors({**ok, "bill_to": 3}, nullable) and errors({**ok, "code": "ab-1"}, nullable)


@pytest.mark.parametrize("name", BOUNDED_SCHEMAS)
def test_random_model_always_completes_valid_json(vocab, name):
    tokenizer, compiler = vocab
    schema = BOUNDED_SCHEMAS[name]
    grammar = compiler.json_schema(schema)
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(RUNS):
        tokens, finished = random_walk(grammar.matcher(), rng, MAX_TOKENS)
        assert finished, f"not complete after {MAX_TOKENS} tokens: {tokenizer.decode(tokens)!r}"
        value = json.loads(text_of(tokenizer, tokens, compiler.vocabulary.stop_tokens))
        assert errors(value, schema) == [], value
        lengths.append(len(tokens))
    assert max(lengths) < MAX_TOKENS


def test_json_object_is_any_object(vocab):
    tokenizer, compiler = vocab
    rng = np.random.default_rng(1)
    done = 0
    for _ in range(10):
        tokens, finished = random_walk(compiler.json_object().matcher(), rng, 150)
        if finished:  # an unbounded grammar: a random model may run out of tokens
            assert isinstance(json.loads(text_of(tokenizer, tokens, compiler.vocabulary.stop_tokens)), dict)
            done += 1
    assert done >= 1
    matcher = compiler.json_object().matcher()
    assert not matcher.accept(tokenizer.encode("[", False, False)[0])  # an array is not an object


def test_unbounded_string_can_run_out(compilers):
    tokenizer, compiler = compilers("llama3")
    matcher = compiler.json_schema({"type": "string"}).matcher()
    tokens, finished = random_walk(matcher, np.random.default_rng(0), 64)
    assert len(tokens) == 64 and not finished and not matcher.is_accepting()
    assert tokenizer.decode(tokens).startswith('"')


class Tag(pydantic.BaseModel):
    label: Literal["red", "green", "blue"]
    weight: int = pydantic.Field(ge=0, le=10)

    model_config = pydantic.ConfigDict(extra="forbid")  # bounded: no extra keys


class Item(pydantic.BaseModel):
    sku: str = pydantic.Field(pattern=r"^[A-Z]{3}[0-9]{2}$")
    name: str = pydantic.Field(min_length=1, max_length=10)
    tags: list[Tag] = pydantic.Field(min_length=1, max_length=2)
    parent: Optional[Tag] = None
    price_cents: int = pydantic.Field(gt=0, lt=100_000)

    model_config = pydantic.ConfigDict(extra="forbid")


def test_pydantic_model_schema(vocab):
    tokenizer, compiler = vocab
    schema = Item.model_json_schema()
    assert "$defs" in schema and "anyOf" in json.dumps(schema)  # what this test is about
    grammar = compiler.json_schema(schema)
    rng = np.random.default_rng(2)
    for _ in range(RUNS):
        tokens, finished = random_walk(grammar.matcher(), rng, MAX_TOKENS)
        assert finished
        Item.model_validate_json(text_of(tokenizer, tokens, compiler.vocabulary.stop_tokens), strict=True)
