"""The HTTP API against a fake engine (tests/serve/common.py) on a live uvicorn server: the official
openai client for the happy paths, raw httpx for the wire format and the errors."""

import asyncio
import json
import threading

import httpx
import openai
import pytest

from llama_jax.serve.app import create_app
from tests.serve.common import CHAT, MODEL, REPLY, FakeEngine, assert_error, client, live_server, post, server, wait_for


def sse_events(response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, checking the framing."""
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: ") and "\n" not in block, block
            events.append(block.removeprefix("data: "))
    assert response.text.endswith("\n\n")
    return events


def test_models(tokenizer):
    with server(tokenizer, max_seq_len=96) as (_, url):
        models = client(url).models.list()
    assert [(m.id, m.object, m.max_model_len) for m in models.data] == [(MODEL, "model", 96)]


def test_completion(tokenizer):
    with server(tokenizer) as (engine, url):
        result = client(url).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=50,
                                                temperature=0.5, top_p=0.9, seed=7, extra_body={"top_k": 3})
    prompt_ids = tokenizer.encode("The capital of France is", bos=True, eos=False)
    (_, sent_ids, params), = engine.added
    assert sent_ids == prompt_ids
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (50, 0.5, 0.9, 3, 7)
    assert params.stop_token_ids == tokenizer.stop_tokens and params.logprobs is None
    assert result.choices[0].text == REPLY and result.choices[0].finish_reason == "stop"
    reply_tokens = len(tokenizer.encode(REPLY, bos=False, eos=False))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), reply_tokens + 1)
    assert result.usage.total_tokens == len(prompt_ids) + reply_tokens + 1


def test_chat_goes_through_the_chat_format(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    with server(tokenizer) as (engine, url):
        result = client(url).chat.completions.create(model=MODEL, messages=messages)
    (_, sent_ids, params), = engine.added
    assert sent_ids == tokenizer.encode_dialog(messages)
    assert params.max_tokens == engine.max_seq_len - len(sent_ids)  # no max_tokens: the rest of the context
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, 0, None)
    assert result.choices[0].message.role == "assistant" and result.choices[0].message.content == REPLY
    assert result.choices[0].finish_reason == "stop" and result.usage.prompt_tokens == len(sent_ids)


def test_chat_content_parts_and_max_completion_tokens(tokenizer):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}]
    with server(tokenizer) as (engine, url):
        result = client(url).chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    (_, sent_ids, params), = engine.added
    assert sent_ids == tokenizer.encode_dialog([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi there"}])
    assert params.max_tokens == 3
    reply_ids = tokenizer.encode(REPLY, bos=False, eos=False)
    assert result.choices[0].message.content == tokenizer.decode(reply_ids[:3])
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 3


def test_streaming_chat_with_usage(tokenizer):
    with server(tokenizer) as (_, url):
        chunks = list(client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        tokenizer.encode(REPLY, bos=False, eos=False)) + 1
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streaming_completion_wire_format(tokenizer):
    with server(tokenizer, reply="one two three") as (_, url):
        response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Count:", "stream": True},
                              timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["one", " two", " three", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)


def test_streaming_completion_with_openai_client(tokenizer):
    with server(tokenizer) as (_, url):
        chunks = list(client(url).completions.create(model=MODEL, prompt="Say hi", stream=True, max_tokens=4,
                                                     stream_options={"include_usage": True}))
    reply_ids = tokenizer.encode(REPLY, bos=False, eos=False)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tokenizer.decode(reply_ids[:4])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4


def test_echo(tokenizer):
    with server(tokenizer) as (_, url):
        result = client(url).completions.create(model=MODEL, prompt="Echo: ", echo=True, max_tokens=2)
        chunks = list(client(url).completions.create(model=MODEL, prompt="Echo: ", echo=True, max_tokens=2,
                                                     stream=True))
    reply_ids = tokenizer.encode(REPLY, bos=False, eos=False)
    assert result.choices[0].text == "Echo: " + tokenizer.decode(reply_ids[:2])
    assert chunks[0].choices[0].text == "Echo: "
    assert "".join(c.choices[0].text for c in chunks) == result.choices[0].text


def test_token_id_prompt(tokenizer):
    with server(tokenizer) as (engine, url):
        result = client(url).completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=1)
    assert engine.added[0][1] == [1, 2, 3] and result.usage.prompt_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_token_boundaries(tokenizer, stream):
    reply_ids = tokenizer.encode(REPLY, bos=False, eos=False)
    pieces = [tokenizer.decode([i]) for i in reply_ids]
    assert pieces[1:4] == [" world", "!", " How"]  # so "ld! H" spans three tokens
    with server(tokenizer, step_seconds=0.01) as (engine, url):
        created = client(url).completions.create(model=MODEL, prompt="x", stop=["ld! H", "never"], stream=stream)
        choices = [c.choices[0] for c in created] if stream else created.choices
        wait_for(lambda: engine.aborted)  # the stop string ended the request in the engine
    assert "".join(c.text for c in choices) == "Hello wor" and choices[-1].finish_reason == "stop"
    assert not engine.requests


def test_stop_string_never_seen_sends_the_held_back_text(tokenizer):
    with server(tokenizer) as (engine, url):
        chunks = list(client(url).completions.create(model=MODEL, prompt="x", stop="today?!", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == REPLY  # "today?" was held back, then sent at the end
    assert not engine.aborted


def test_multibyte_characters_split_across_tokens_are_never_sent_half(tokenizer):
    reply = "🦙 naïve 日本語"
    reply_ids = tokenizer.encode(reply, bos=False, eos=False)
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in reply_ids)  # 🦙 takes three tokens
    with server(tokenizer, reply=reply) as (_, url):
        chunks = list(client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}],
                                                          stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == reply and not any("\ufffd" in piece for piece in pieces)
    assert pieces[0] == "🦙"


def test_chat_logprobs(tokenizer):
    with server(tokenizer, reply="a b c") as (engine, url):
        result = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}],
                                                     logprobs=True, top_logprobs=2)
        plain = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}])
    assert engine.added[0][2].logprobs == 2 and engine.added[1][2].logprobs is None
    content = result.choices[0].logprobs.content
    reply_ids = tokenizer.encode("a b c", bos=False, eos=False)
    assert [c.token for c in content] == ["a", " b", " c"]  # the stop token is not part of the text
    assert [c.logprob for c in content] == pytest.approx([-0.1, -0.2, -0.3])
    assert [c.bytes for c in content] == [list(b"a"), list(b" b"), list(b" c")]
    for c, token_id in zip(content, reply_ids):
        assert [t.token for t in c.top_logprobs] == [tokenizer.decode([token_id]), tokenizer.decode([token_id + 1])]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([c.logprob, c.logprob - 1])
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_streamed_and_not(tokenizer):
    with server(tokenizer, reply="a b c") as (engine, url):
        result = client(url).completions.create(model=MODEL, prompt="x", logprobs=1)
        chunks = list(client(url).completions.create(model=MODEL, prompt="x", logprobs=1, stream=True))
    lp = result.choices[0].logprobs
    assert lp.tokens == ["a", " b", " c"] and lp.token_logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert lp.text_offset == [0, 1, 3]
    assert lp.top_logprobs == [{"a": pytest.approx(-0.1)}, {" b": pytest.approx(-0.2)}, {" c": pytest.approx(-0.3)}]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


@pytest.mark.parametrize("body, words, param", [
    ('{"model": ', ["not valid JSON"], None),
    ({"messages": CHAT["messages"]}, ["model", "Field required"], "model"),
    ({**CHAT, "n": 0}, ["greater than or equal to 1"], "n"),
    ({**CHAT, "temperature": 3}, ["temperature", "less than or equal to 2"], "temperature"),
    ({**CHAT, "top_p": 0}, ["top_p", "greater than 0"], "top_p"),
    ({**CHAT, "top_k": -2}, ["top_k"], "top_k"),
    ({**CHAT, "top_k": 1000}, ["top_k must be an integer in [0, 256]"], None),  # the engine's own limit
    ({**CHAT, "max_tokens": 0}, ["max_tokens"], "max_tokens"),
    ({**CHAT, "stop": ["ok", ""]}, ["stop strings must not be empty"], "stop"),
    ({**CHAT, "top_logprobs": 2}, ["top_logprobs needs logprobs"], None),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, ["top_logprobs"], "top_logprobs"),
    ({**CHAT, "stream_options": {"include_usage": True}}, ["stream_options"], None),
    ({"model": MODEL, "messages": []}, ["messages"], "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, ["role"], "messages"),
    ({**CHAT, "max_tokens": 200}, ["11 tokens", "200", "128"], "max_tokens"),  # cannot fit: names both numbers
    ({**CHAT, "messages": [{"role": "user", "content": "word " * 200}]}, ["211 tokens", "128"], "messages"),
])
def test_chat_request_errors(tokenizer, body, words, param):
    with server(tokenizer) as (engine, url):
        assert_error(post(url, "/v1/chat/completions", body), 400, *words, param=param)
    assert not engine.added


@pytest.mark.parametrize("body, words", [
    ({"model": MODEL}, ["prompt", "Field required"]),
    ({"model": MODEL, "prompt": ["a", "b"]}, ["one prompt per request"]),
    ({"model": MODEL, "prompt": ""}, ["the prompt is empty"]),
    ({"model": MODEL, "prompt": [5, 999999]}, ["999999", "outside the vocabulary"]),
    ({"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, ["cannot score prompts"]),  # a fake: no weights
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, ["max_tokens 0 needs echo"]),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, ["logprobs"]),
])
def test_completion_request_errors(tokenizer, body, words):
    with server(tokenizer) as (engine, url):
        assert_error(post(url, "/v1/completions", body), 400, *words)
    assert not engine.added


def test_unknown_model_and_route(tokenizer):
    with server(tokenizer) as (_, url):
        assert_error(post(url, "/v1/chat/completions", {**CHAT, "model": "gpt-4"}), 404, "gpt-4", MODEL,
                     param="model")
        assert_error(httpx.get(f"{url}/v1/nothing"), 404, "Not Found")


def test_queue_full_is_429(tokenizer):
    with server(tokenizer, capacity=0) as (_, url):
        assert_error(post(url, "/v1/chat/completions", CHAT), 429, "queue is full")


def test_api_key(tokenizer):
    with server(tokenizer, api_key="sekret") as (_, url):
        assert_error(post(url, "/v1/chat/completions", CHAT), 401, "API key")
        assert_error(post(url, "/v1/chat/completions", CHAT, Authorization="Bearer wrong"), 401, "API key")
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "sekret").chat.completions.create(**CHAT).choices[0].message.content == REPLY
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_draining_server_turns_new_requests_away(tokenizer):
    engine = FakeEngine(tokenizer, REPLY)
    app = create_app(engine, tokenizer, MODEL)
    with live_server(app) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        app.state.runner.drain(grace_period=60)
        assert_error(post(url, "/v1/chat/completions", CHAT), 503, "shutting down")
        assert httpx.get(f"{url}/health").status_code == 503


def test_drained_once_the_running_requests_end(tokenizer):
    engine = FakeEngine(tokenizer, list(range(1000, 1020)), step_seconds=0.02)
    app = create_app(engine, tokenizer, MODEL)
    with live_server(app) as url:
        runner, results = app.state.runner, []
        thread = threading.Thread(target=lambda: results.append(
            post(url, "/v1/completions", {"model": MODEL, "prompt": "x"})))
        thread.start()
        wait_for(lambda: engine.requests)
        runner.drain(grace_period=60)
        assert not runner.drained.wait(0.1)  # one is still running
        thread.join(30)
        assert runner.drained.wait(5)
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["finish_reason"] == "stop"


def test_a_bad_request_does_not_disturb_a_running_one(tokenizer):
    with server(tokenizer, step_seconds=0.02) as (_, url):
        results = []
        thread = threading.Thread(target=lambda: results.append(client(url).chat.completions.create(**CHAT)))
        thread.start()
        for body in ('{"broken', {**CHAT, "temperature": -1}, {**CHAT, "max_tokens": 10 ** 6}):
            assert post(url, "/v1/chat/completions", body).status_code == 400
        thread.join(30)
    assert results[0].choices[0].message.content == REPLY


@pytest.mark.parametrize("stream", [False, True])
def test_engine_failure_ends_its_requests_and_the_server_goes_on(tokenizer, stream):
    with server(tokenizer) as (engine, url):
        real_step = engine.step

        def failing_step():
            engine.step = real_step
            raise RuntimeError("device lost")

        engine.step = failing_step
        response = post(url, "/v1/chat/completions", {**CHAT, "stream": stream})
        if stream:  # the stream has begun (status 200): the error is its last event
            *_, error, done = sse_events(response)
            assert "device lost" in json.loads(error)["error"]["message"] and done == "[DONE]"
        else:
            assert_error(response, 500, "device lost")
        assert client(url).chat.completions.create(**CHAT).choices[0].message.content == REPLY
        assert not engine.requests


def test_client_disconnect_mid_stream_aborts_the_request(tokenizer):
    with server(tokenizer, step_seconds=0.02, reply=list(range(1000, 1100)), max_seq_len=1000) as (engine, url):
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True},
                          timeout=30) as response:
            assert next(response.iter_lines()).startswith("data: ")
        wait_for(lambda: engine.aborted)
        assert not engine.requests and engine.steps < 100


def test_client_disconnect_while_waiting_for_a_whole_answer_aborts_it(tokenizer):
    with server(tokenizer, step_seconds=0.02, reply=list(range(1000, 1100)), max_seq_len=1000) as (engine, url):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=0.3)
        wait_for(lambda: engine.aborted)
        assert not engine.requests and engine.steps < 100


def test_32_concurrent_streams_all_complete(tokenizer):
    async def one(api, i):
        await asyncio.sleep(i * 0.005)  # arriving over time, joining the running batch
        stream = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=1 + i % 9, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_of_them(url):
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(api, i) for i in range(32)))

    with server(tokenizer, step_seconds=0.005) as (engine, url):
        texts = asyncio.run(all_of_them(url))
    reply_ids = tokenizer.encode(REPLY, bos=False, eos=False)
    assert texts == [tokenizer.decode(reply_ids[:1 + i % 9]) for i in range(32)]
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads  # one engine thread


def test_metrics(tokenizer):
    with server(tokenizer) as (_, url):
        client(url).chat.completions.create(**CHAT)
        text = httpx.get(f"{url}/metrics").text
    reply_tokens = len(tokenizer.encode(REPLY, bos=False, eos=False)) + 1
    assert f"llama_jax_generation_tokens_total {reply_tokens:.1f}" in text
    assert "llama_jax_time_to_first_token_seconds_count 1.0" in text
    assert f"llama_jax_time_per_output_token_seconds_count {reply_tokens - 1:.1f}" in text
    for gauge in ("requests_running", "requests_waiting", "kv_pages_used"):
        assert f"llama_jax_{gauge} 0.0" in text


def test_n_choices_a_stop_string_ends_each_choice_alone(tokenizer):
    # A reply that goes on long after the stop string, a step at a time: the aborts reach the engine
    # while the request still runs (a fake that finished first would never see them).
    with server(tokenizer, reply="Hello world! " + "and so on " * 30, step_seconds=0.02) as (engine, url):
        result = client(url).completions.create(model=MODEL, prompt="Hi", n=3, stop=["world"])
        streamed = {}
        for chunk in client(url).completions.create(model=MODEL, prompt="Hi", n=3, stop=["world"], stream=True):
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [(c.index, c.text, c.finish_reason) for c in result.choices] == [(i, "Hello ", "stop") for i in range(3)]
    assert streamed == {0: "Hello ", 1: "Hello ", 2: "Hello "}
    request_id = engine.added[0][0]
    # The first two choices to stop end their own samples; the last ends the request.
    assert sum(isinstance(a, tuple) and a[0] == request_id for a in engine.aborted) == 2
    assert request_id in engine.aborted
