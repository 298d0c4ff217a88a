"""What the server refuses before doing the work: a request body over its byte limit (a 413 before
the body is read whole), and a text prompt too long for the context before it is tokenized."""

from __future__ import annotations

import functools

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llama_jax.serve import protocol as p
from llama_jax.tokenizer import Llama3Tokenizer, read_tiktoken_ranks

# A whole 128k-token context is under 2 MB of JSON: as token ids ("128255, ": 8 bytes each), or as
# text with every character escaped ("\uXXXX", 6 bytes; a Llama 3 token holds at least one
# character). Twice that leaves room for long message lists; more is not a request, it is a load.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


def too_large(max_bytes: int) -> JSONResponse:
    error = p.ErrorDetail(message=f"the request body is larger than this server's limit of {max_bytes} bytes "
                                  f"(--max-request-bytes)", type="invalid_request_error", code="request_too_large")
    return JSONResponse(p.ErrorResponse(error=error).model_dump(), status_code=413)


class BodyTooLarge(HTTPException):
    """Raised while a body is received; an HTTPException, so FastAPI hands it to the app's handlers
    (which answer `too_large`) rather than turning it into a 400."""

    def __init__(self, max_bytes: int):
        super().__init__(413)
        self.max_bytes = max_bytes


class BodyLimit:
    """ASGI middleware: a 413 for a request body over `max_bytes`, at once when its Content-Length
    says so (nothing of it is read), else when the bytes received pass the limit (a chunked body).

    The connection stays open: uvicorn reads and drops the rest of the body, so a client that sends
    its whole body before reading the answer (httpx, the openai client) gets the 413, not a reset."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_large(self.max_bytes)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


def fewest_tokens(tokenizer, chars: int) -> int:
    """A lower bound on the tokens a text of `chars` characters encodes to, or 0 where none is sound.

    Sound for Llama3Tokenizer: tiktoken's byte-level BPE with no normalizer (special-token text is
    encoded as plain text), so the text's UTF-8 bytes are its tokens' bytes joined, each token at
    most the vocabulary's longest (128 bytes in Meta's file), and each character at least a byte.
    None for the others: a normalizer may delete or merge characters (HF tokenizers' NFKC, Strip,
    Replace; sentencepiece's rules), so a text's length bounds nothing. Reads the vocabulary once
    per file: call it off the event loop."""
    if not isinstance(tokenizer, Llama3Tokenizer):
        return 0
    return -(-chars // _longest_token_bytes(tokenizer.path))


@functools.lru_cache
def _longest_token_bytes(path: str) -> int:
    return max(len(token) for token in read_tiktoken_ranks(path))
