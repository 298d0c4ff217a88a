"""Agents through the official openai client against the server over the real engine (a tiny random
model with the real Llama 3 tokenizer): structured outputs valid by construction, tool calls that
parse, streamed and whole answers equal, n choices, and bad tools or schemas refused at the door."""

import json

import openai
import pydantic
import pytest

from llama_jax import LlamaConfig, save
from llama_jax.serve.__main__ import build_parser, load_engine
from llama_jax.serve.app import create_app
from llama_jax.tokenizer import default_tokenizer_path
from tests.infer.common import random_params
from tests.grammar.validator import errors
from tests.serve.common import CHAT, assert_error, live_server, post, server

MODEL = "tiny-agent"
# The real vocabulary, room for a JSON answer after a chat prompt.
CFG = LlamaConfig(vocab_size=128256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=640,
                  dtype="float32")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
               "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Colour(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    hex: str = pydantic.Field(pattern=r"^#[0-9a-f]{6}$")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=150)
    role: str | None = pydantic.Field(default=None, max_length=6)
    colours: list[Colour] = pydantic.Field(max_length=2)
    mood: "Mood"


class Mood(pydantic.BaseModel):
    kind: str = pydantic.Field(json_schema_extra={"enum": ["calm", "busy"]})
    level: float = pydantic.Field(ge=0, le=1)


Person.model_rebuild()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    directory = save(tmp_path_factory.mktemp("agent") / "ckpt", CFG, random_params(CFG, 1),
                     tokenizer_path=default_tokenizer_path())
    args = build_parser().parse_args(["--checkpoint", str(directory), "--max-batch", "4", "--page-size", "16"])
    engine, tokenizer = load_engine(args)
    with live_server(create_app(engine, tokenizer, MODEL)) as base:
        yield base


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model_is_always_valid(url):
    api = client(url)
    questions = ["Describe someone.", "Who is at the door?", "Name a person you know."]
    for seed, question in enumerate(questions):
        ask = [{"role": "user", "content": question}]
        result = api.chat.completions.parse(model=MODEL, messages=ask, response_format=Person, temperature=1.0,
                                            seed=seed, max_tokens=300)
        choice = result.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person), choice.message.content


def test_an_unbounded_string_that_runs_out_of_tokens_is_length(url):
    class Essay(pydantic.BaseModel):
        text: str

    with pytest.raises(openai.LengthFinishReasonError):
        client(url).chat.completions.parse(model=MODEL, messages=ASK, response_format=Essay, temperature=1.0,
                                           seed=0, max_tokens=8)


def test_json_object_is_an_object(url):
    result = client(url).chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                                 temperature=1.0, seed=3, max_tokens=300)
    if result.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(result.choices[0].message.content), dict)
    else:  # a random model may write an object longer than its tokens: then it says so
        assert result.choices[0].finish_reason == "length"


def _streamed(api, **request) -> tuple[str | None, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) accumulated from a stream's deltas."""
    content, calls, finish = None, {}, None
    for chunk in api.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for call in delta.tool_calls or []:
                name, arguments = calls.get(call.index, ("", ""))
                calls[call.index] = (name + (call.function.name or ""), arguments + (call.function.arguments or ""))
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice, tools, parallel", [
    ({"type": "function", "function": {"name": "get_weather"}}, [WEATHER, TIME], False),
    ("required", [WEATHER, TIME], False),
    ("required", [WEATHER, TIME], True),
    ("auto", [WEATHER], False),
])
def test_tool_calls_parse_and_streamed_equals_whole(url, tool_choice, tools, parallel):
    api = client(url)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for seed in range(2 if tool_choice == "required" else 1):
        request = dict(model=MODEL, messages=ASK, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel,
                       temperature=1.0, seed=seed, max_tokens=300)
        whole = api.chat.completions.create(**request).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        assert _streamed(api, **request) == (whole.message.content, calls, whole.finish_reason)
        if tool_choice == "auto" and not calls:
            assert whole.finish_reason in ("stop", "length") and whole.message.content
            continue
        # A random model may go on calling until max_tokens when parallel calls are allowed: the
        # calls before the one it cut still parse.
        cut = whole.finish_reason == "length" and parallel
        assert whole.finish_reason == "tool_calls" or cut, whole
        assert calls and all(c.id.startswith("call_") and c.type == "function" for c in whole.message.tool_calls)
        assert len(calls) == 1 or parallel
        if isinstance(tool_choice, dict):
            assert {name for name, _ in calls} == {"get_weather"}
        for name, arguments in calls[:-1] if cut else calls:
            assert not errors(json.loads(arguments), schemas[name]), arguments


def test_a_tool_result_fed_back_is_answered(url):
    api = client(url)
    call = api.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=300).choices[0].message
    history = ASK + [call.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"temperature": 21}'}]
    answer = api.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=5).choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")


def test_n_choices_differ_when_sampled_and_agree_when_greedy(url):
    api = client(url)
    hot = api.chat.completions.create(model=MODEL, messages=ASK, n=4, temperature=1.0, seed=1, max_tokens=8)
    assert [c.index for c in hot.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in hot.choices}) > 1
    assert 4 <= hot.usage.completion_tokens <= 4 * 8  # every choice's tokens, the prompt once
    assert hot.usage.total_tokens == hot.usage.prompt_tokens + hot.usage.completion_tokens
    greedy = api.chat.completions.create(model=MODEL, messages=ASK, n=3, temperature=0, max_tokens=8)
    assert len({c.message.content for c in greedy.choices}) == 1
    alone = api.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=8)
    assert greedy.choices[0].message.content == alone.choices[0].message.content
    streamed = {}
    for chunk in api.chat.completions.create(model=MODEL, messages=ASK, n=4, temperature=1.0, seed=1, max_tokens=8,
                                             stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(4)] == [c.message.content for c in hot.choices]


@pytest.mark.parametrize("body, param, words", [
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}}, "response_format",
     ["uniqueItems"]),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format", ["schema"]),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format", ["json_schema"]),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     ["tools[0].function.parameters"]),
    ({**CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     ["nope"]),
    ({**CHAT, "tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({**CHAT, "messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_x",
                                                               "content": "1"}]}, "messages", ["call_x"]),
    ({**CHAT, "messages": [{"role": "user", "content": None}]}, "messages", ["needs content"]),
])
def test_bad_tools_and_schemas_are_400s_naming_the_field(tokenizer, body, param, words):
    with server(tokenizer) as (engine, base):
        assert_error(post(base, "/v1/chat/completions", body), 400, *words, param=param)
    assert not engine.added
