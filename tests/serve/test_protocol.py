"""What a request may hold: every field honoured, accepted as a no-op, or a 400 naming it; text that
is not valid Unicode a 400 naming its field; and no error, however unexpected, is plain text."""

import openai
import pytest

from tests.serve.common import CHAT, MODEL, REPLY, assert_error, client, post, server

COMPLETION = {"model": MODEL, "prompt": "Hi"}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "prompt": "\ud800x"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "\ud800x", "echo": True}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["\udfff"]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "stop": ["ok", "\ud800"]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800x"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]},
     "messages"),
    ("/v1/chat/completions", {**CHAT, "model": "\ud800"}, "model"),
    ("/v1/chat/completions", {**CHAT, "user": "\ud800"}, "user"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(tokenizer, path, body, param):
    with server(tokenizer) as (engine, url):
        # json.dumps writes the lone surrogate as the escape "\ud800", as a hostile client would.
        assert_error(post(url, path, body), 400, "not valid Unicode", "lone surrogate", param=param)
    assert not engine.added


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "store", True),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "suffix", " the end"),
])
def test_an_unsupported_openai_field_is_a_400_naming_it(tokenizer, path, field, value):
    body = {**(CHAT if "chat" in path else COMPLETION), field: value}
    with server(tokenizer) as (engine, url):
        assert_error(post(url, path, body), 400, f"{field} is not supported", param=field)
    assert not engine.added


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "min_p": 0.1}, "min_p"),  # a vLLM extension this server lacks
    ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy"}}, "audio"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi", "name": "bob"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_obfuscation": False}},
     "stream_options"),
    ("/v1/completions", {**COMPLETION, "tools": []}, "tools"),  # a chat field
    ("/v1/completions", {**COMPLETION, "prompt_logprobs": 1}, "prompt_logprobs"),
])
def test_an_unknown_field_is_a_400_naming_it(tokenizer, path, body, param):
    with server(tokenizer) as (engine, url):
        assert_error(post(url, path, body), 400, "unknown or unsupported field", param=param)
    assert not engine.added


def test_no_op_values_and_identifiers_are_accepted_and_change_nothing(tokenizer):
    messages = CHAT["messages"]
    with server(tokenizer) as (engine, url):
        api = client(url)
        plain = api.chat.completions.create(model=MODEL, messages=messages, seed=1)
        no_ops = api.chat.completions.create(
            model=MODEL, messages=messages, seed=1, frequency_penalty=0, presence_penalty=0.0, logit_bias={},
            tools=[], tool_choice="none", parallel_tool_calls=False, response_format={"type": "text"},
            store=False, metadata={}, n=1, user="u-1", safety_identifier="s", prompt_cache_key="k",
            service_tier="auto", extra_body={"functions": [], "modalities": ["text"]})
        nulls = post(url, "/v1/chat/completions", {**CHAT, "seed": 1, "frequency_penalty": None, "tools": None,
                                                   "logit_bias": None, "user": None})
        completion = api.completions.create(model=MODEL, prompt="Hi", seed=1, best_of=1, suffix="",
                                            frequency_penalty=0, logit_bias={}, user="u-1")
    assert plain.choices[0].message.content == no_ops.choices[0].message.content == REPLY
    assert nulls.status_code == 200 and completion.choices[0].text == REPLY
    params = [added[2] for added in engine.added]
    assert params[0] == params[1] == params[2]


def test_an_unexpected_failure_is_a_json_500(tokenizer, monkeypatch):
    with server(tokenizer) as (engine, url):
        def broken(messages):
            raise RuntimeError("a bug")

        monkeypatch.setattr(tokenizer, "encode_dialog", broken)
        assert_error(post(url, "/v1/chat/completions", CHAT), 500, "internal server error (RuntimeError)")
        with pytest.raises(openai.InternalServerError):
            client(url).chat.completions.create(**CHAT)
    assert not engine.added


def test_penalties_biases_and_vllm_s_extensions_reach_the_engine(tokenizer):
    with server(tokenizer) as (engine, url):
        api = client(url)
        api.chat.completions.create(model=MODEL, messages=CHAT["messages"], presence_penalty=0.5,
                                    frequency_penalty=-1, logit_bias={"7": 5, "3": -100},
                                    extra_body={"repetition_penalty": 1.2, "min_tokens": 2})
        api.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
        plain = api.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    (_, _, chat), (_, _, ignoring), (_, _, default) = engine.added
    assert (chat.presence_penalty, chat.frequency_penalty, chat.repetition_penalty, chat.min_tokens) == (0.5, -1, 1.2, 2)
    assert chat.logit_bias == ((3, -100.0), (7, 5.0))
    assert ignoring.stop_token_ids == () and default.stop_token_ids == tuple(tokenizer.stop_tokens)
    assert plain.choices[0].text


@pytest.mark.parametrize("field, value, says", [
    ("presence_penalty", 2.5, "less than or equal to 2"),
    ("frequency_penalty", -3, "greater than or equal to -2"),
    ("logit_bias", {"x": 1}, "logit_bias keys must be token ids"),
    ("logit_bias", {"5": 101}, "logit_bias values must be in [-100, 100]"),
    ("repetition_penalty", 0, "greater than 0"),
    ("min_tokens", 99, "min_tokens must be an integer in [0, max_tokens=4]"),
])
def test_a_penalty_out_of_range_is_a_400_naming_it(tokenizer, field, value, says):
    with server(tokenizer) as (engine, url):
        assert_error(post(url, "/v1/completions", {**COMPLETION, "max_tokens": 4, field: value}), 400, says,
                     param=field)
    assert not engine.added
