"""A fake engine with the BatchingEngine interface (deterministic replies, controllable timing) and a
live uvicorn server on a free local port, for fast HTTP tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import uvicorn

from llama_jax.infer.requests import EngineFullError, TokenOutput
from llama_jax.serve.app import create_app, uvicorn_config

MODEL = "tiny-llama"
REPLY = "Hello world! How are you today?"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


class FakeEngine:
    """Replies to every prompt with the ids of `reply` (then its stop token), one token per step.

    Token i of a request has logprob -(i + 1) / 10 and alternatives (token_id + k, logprob - k).
    `step_seconds` slows every step; `capacity` is how many requests it holds before EngineFullError.
    Every call's thread is recorded, so tests can check the engine is only driven from one.
    """

    def __init__(self, tokenizer, reply="Hello world!", *, max_seq_len=128, step_seconds=0.0, capacity=1000,
                 stop_token=None):
        self.reply_ids = tokenizer.encode(reply, bos=False, eos=False) if isinstance(reply, str) else list(reply)
        self.stop_token = tokenizer.stop_tokens[-1] if stop_token is None else stop_token
        self.max_seq_len, self.step_seconds, self.capacity = max_seq_len, step_seconds, capacity
        self.requests = {}  # request id -> [prompt_ids, params, tokens emitted]
        self.added, self.aborted, self.threads = [], [], set()
        self.steps = 0

    def check(self, prompt_len, max_tokens):
        if prompt_len + max_tokens > self.max_seq_len:
            raise ValueError(f"a prompt of {prompt_len} tokens plus max_tokens {max_tokens} exceeds the "
                             f"{self.max_seq_len}-token context")

    def add(self, request_id, prompt_ids, params):
        self.threads.add(threading.get_ident())
        if len(self.requests) >= self.capacity:
            raise EngineFullError(f"{len(self.requests)} requests waiting")
        self.check(len(prompt_ids), params.max_tokens)
        self.requests[request_id] = [list(prompt_ids), params, 0]
        self.added.append((request_id, list(prompt_ids), params))

    def abort(self, request_id, index=None):
        self.threads.add(threading.get_ident())
        if index is not None:  # one sample: the fake's samples run in lockstep, so it keeps the request
            self.aborted.append((request_id, index))
        elif self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_work(self):
        return bool(self.requests)

    def step(self):
        self.threads.add(threading.get_ident())
        self.steps += 1
        time.sleep(self.step_seconds)
        outputs = []
        for request_id, state in list(self.requests.items()):
            prompt_ids, params, i = state
            token = self.reply_ids[i] if i < len(self.reply_ids) else self.stop_token
            state[2] = i + 1
            if token == self.stop_token:
                finish = "stop"
            elif state[2] == params.max_tokens:
                finish = "length"
            else:
                finish = None
            logprob = -(i + 1) / 10 if params.logprobs is not None else None
            top = (tuple((token + k, logprob - k) for k in range(params.logprobs))
                   if params.logprobs is not None else None)
            for index in range(params.n):  # n samples of one request: the same reply each
                outputs.append(TokenOutput(request_id, token, logprob, top, finish, len(prompt_ids), 0, index=index))
            if finish is not None:
                del self.requests[request_id]
        return outputs

    def stats(self):
        return {"running": len(self.requests), "waiting": 0, "pages_used": len(self.requests), "pages_total": 64}


@contextlib.contextmanager
def live_server(app):
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextlib.contextmanager
def server(tokenizer, api_key=None, app_options=None, **engine_options):
    """A live app over a FakeEngine: yields (engine, base URL)."""
    engine = FakeEngine(tokenizer, engine_options.pop("reply", REPLY), **engine_options)
    with live_server(create_app(engine, tokenizer, MODEL, api_key=api_key, **(app_options or {}))) as url:
        yield engine, url


def client(url, api_key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


def post(url, path, body, **headers):
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=30)


def assert_error(response, status, *words, param=None, code=None):
    """An error in OpenAI's shape, its message holding `words`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
