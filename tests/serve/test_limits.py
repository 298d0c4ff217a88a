"""Big and long requests: the body limit (a 413 before the body is read), prompts tokenized off the
event loop so a huge one never stalls the running streams, and prompts refused by their length."""

import socket
import threading
import time

import httpx
import pytest

from llama_jax.serve.limits import DEFAULT_MAX_REQUEST_BYTES, fewest_tokens
from tests.serve.common import CHAT, MODEL, assert_error, post, server


def test_a_declared_length_over_the_limit_is_413_before_any_body_is_sent(tokenizer):
    with server(tokenizer) as (engine, url):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (DEFAULT_MAX_REQUEST_BYTES + 1))
            head = sock.recv(65536).decode()  # answered without waiting for a byte of the body
        status, _, body = head.partition("\r\n\r\n")
        assert status.startswith("HTTP/1.1 413")
        response = httpx.Response(413, content=body.encode())
        assert_error(response, 413, f"limit of {DEFAULT_MAX_REQUEST_BYTES} bytes", "--max-request-bytes",
                     code="request_too_large")
    assert not engine.added


def test_a_chunked_body_is_counted_as_it_arrives(tokenizer):
    limit = 2**20

    def chunks(n):  # no Content-Length: httpx sends a generator chunked
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(n):
            yield b"word " * 13107  # 65,535 bytes
        yield b'", "max_tokens": 1}'

    with server(tokenizer, app_options={"max_request_bytes": limit}, max_seq_len=10**6) as (engine, url):
        over = httpx.post(f"{url}/v1/completions", content=chunks(17), timeout=30,
                          headers={"Content-Type": "application/json"})
        assert_error(over, 413, f"limit of {limit} bytes", code="request_too_large")
        assert not engine.added
        under = httpx.post(f"{url}/v1/completions", content=chunks(15), timeout=30,
                           headers={"Content-Type": "application/json"})
        assert under.status_code == 200, under.text
        # The connection that got the 413 was drained, not reset: the same client goes on.
        with httpx.Client(timeout=30) as c:
            assert c.post(f"{url}/v1/completions", content=chunks(17),
                          headers={"Content-Type": "application/json"}).status_code == 413
            assert c.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200


def test_a_10mb_prompt_does_not_stall_the_running_streams(tokenizer):
    """Tokenizing 10 MB takes seconds of CPU, which stalled every stream when it ran on the event
    loop; in a worker thread, the running stream's tokens keep coming."""
    prompt = "The quick brown fox jumps over the lazy dog. " * (10**7 // 45)
    with server(tokenizer, app_options={"max_request_bytes": 16 * 2**20}, max_seq_len=10**7, step_seconds=0.01,
                reply=list(range(1000, 3000))) as (engine, url):
        arrivals, stop = [], threading.Event()

        def stream():
            body = {"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 1999}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                for _ in response.iter_lines():
                    arrivals.append(time.monotonic())
                    if stop.is_set():
                        return

        reader = threading.Thread(target=stream)
        reader.start()
        while len(arrivals) < 20:
            time.sleep(0.01)
        start = time.monotonic()
        response = post(f"{url}", "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1})
        end = time.monotonic()
        stop.set()
        reader.join(30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(engine.added[1][1]) > 2 * 10**6
    during = [t for t in arrivals if start <= t <= end + 1]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert len(during) > 20  # the stream ran all along the big request
    assert max(gaps) < 1.0, max(gaps)


def test_a_prompt_too_long_by_its_length_is_refused_before_it_is_tokenized(tokenizer, monkeypatch):
    short = "word " * 200  # 1,000 characters: at least 8 tokens, so tokenized to find it too long
    short_tokens = len(tokenizer.encode(short, bos=True, eos=False))
    encoded, encode = [], tokenizer.encode
    with server(tokenizer) as (engine, url):  # a context of 128 tokens
        monkeypatch.setattr(tokenizer, "encode", lambda text, **kw: (encoded.append(len(text)), encode(text, **kw))[1])
        long = "word " * 4000  # 20,000 characters: at least 157 tokens of at most 128 bytes
        assert_error(post(url, "/v1/completions", {"model": MODEL, "prompt": long}), 400, "20000 characters",
                     "at least 157 tokens", "128", param="prompt", code="context_length_exceeded")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": long}]}
        assert_error(post(url, "/v1/chat/completions", chat), 400, "at least 157 tokens", param="messages")
        assert encoded == []
        assert_error(post(url, "/v1/completions", {"model": MODEL, "prompt": short}), 400,
                     f"{short_tokens} tokens", param="prompt", code="context_length_exceeded")
        assert encoded == [1000]
    assert not engine.added


def test_fewest_tokens_is_a_lower_bound(tokenizer):
    for text in ["a" * 10_000, " " * 5000, "🦙" * 1000, "word " * 1000, "-" * 3000]:
        assert fewest_tokens(tokenizer, len(text)) <= len(tokenizer.encode(text, bos=False, eos=False))
    # The longest Llama 3 token is 128 bytes, so 128 characters may be one token.
    assert (fewest_tokens(tokenizer, 128), fewest_tokens(tokenizer, 129)) == (1, 2)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": list(range(1, 130)), "max_tokens": 5}, "prompt"),
    ({"model": MODEL, "prompt": "word " * 130, "max_tokens": 5}, "prompt"),
    ({"model": MODEL, "prompt": "word " * 20, "max_tokens": 120}, "max_tokens"),
])
def test_a_prompt_longer_than_the_context_is_blamed_not_max_tokens(tokenizer, body, param):
    with server(tokenizer) as (engine, url):
        assert_error(post(url, "/v1/completions", body), 400, "128", param=param, code="context_length_exceeded")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": body["prompt"]}], "max_tokens": 5}
        if isinstance(body["prompt"], str) and param == "prompt":
            assert_error(post(url, "/v1/chat/completions", chat), 400, "context of 128", param="messages")
    assert not engine.added
