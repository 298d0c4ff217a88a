"""The OpenAI-compatible HTTP API over a BatchingEngine: `create_app(engine, tokenizer, model_name)`.

Each request is validated here (protocol.py, engine.check) before it reaches the engine, so a bad
one is a 400 that touches no other request, and every error is OpenAI's JSON shape, a 500 too.
Nothing slow runs on the event loop, which every stream's tokens pass through: a body over the
limit is refused before it is read (limits.py), and prompts are tokenized in a worker thread.
Generation streams through the runner's engine thread; text goes out in whole UTF-8 characters,
cut before a stop string (output.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_jax.infer.requests import EngineFullError, RequestParams
from llama_jax.serve import protocol as p
from llama_jax.serve.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit, BodyTooLarge, fewest_tokens, too_large
from llama_jax.serve.logprobs import Logprobs, TextOffsets
from llama_jax.serve.metrics import ServerMetrics
from llama_jax.serve.output import Counts, Delta, deltas
from llama_jax.serve.runner import EngineError, EngineRequest, EngineRunner, ShuttingDownError
from llama_jax.vocab import check_token_ids


class APIError(Exception):
    """An error with its HTTP status, answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.detail = status, p.ErrorDetail(message=message, type=type, param=param, code=code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def uvicorn_config(app, **kwargs) -> uvicorn.Config:
    """uvicorn for `app` on uvloop's event loop and httptools' HTTP parser, both C (uvicorn's own
    defaults fall back to pure-Python asyncio and h11): every streamed token is an event through
    them, on the cores the engine's step runs on, where the server's Python competes with it for the
    GIL (bench/RESULTS.md, "Numbers moved from docstrings")."""
    return uvicorn.Config(app, loop="uvloop", http="httptools", **kwargs)


def create_app(engine, tokenizer, model_name: str, *, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (aborting what is left)."""
    metrics = ServerMetrics()
    runner = EngineRunner(engine, metrics)
    generation = Generation(engine, tokenizer, model_name, runner, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        runner.start()
        yield
        await asyncio.to_thread(runner.stop)

    app = FastAPI(title="llama_jax", lifespan=lifespan)
    app.state.runner = runner
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    _install_error_handlers(app)

    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)] if api_key else [])

    @v1.get("/models")
    async def models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=model_name, created=generation.created,
                                             max_model_len=engine.max_seq_len)])

    @v1.post("/completions")
    async def completions(body: p.CompletionRequest, http: Request):
        return await generation.complete(body, http)

    @v1.post("/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, http: Request):
        return await generation.chat(body, http)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if not runner.alive():
            return error_response(503, "the engine thread is not running", "service_unavailable")
        if not runner.accepting:
            return error_response(503, "the server is shutting down", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class Generation:
    """Turns validated requests into engine requests and their results into OpenAI responses."""

    def __init__(self, engine, tokenizer, model_name: str, runner: EngineRunner, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.runner, self.metrics = runner, metrics
        self.logprobs = Logprobs(tokenizer)
        self.created = int(time.time())

    async def complete(self, body: p.CompletionRequest, http: Request):
        self._check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = await self._tokenize(lambda: self.tokenizer.encode(body.prompt, bos=True, eos=False),
                                              len(body.prompt), "prompt")
            prompt_text = body.prompt
        else:
            prompt_ids = list(body.prompt)
            self._check_context(len(prompt_ids), body.max_tokens, "prompt")  # before reading them
            try:
                check_token_ids(prompt_ids, self.tokenizer.vocab_size, "prompt token id")
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            prompt_text = self.tokenizer.decode(prompt_ids)
        request = await self._start("cmpl", prompt_ids, body, body.max_tokens, body.logprobs, "prompt")
        echo = prompt_text if body.echo else ""
        if body.stream:
            return _stream(request, self._completion_chunks(request, body, echo))
        counts = Counts()
        pieces = await self._whole(request, body, http, counts)
        if pieces is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        tokens = [t for d in pieces for t in d.tokens]
        logprobs = None if body.logprobs is None else self.logprobs.completion(tokens, TextOffsets(len(echo)))
        return p.CompletionResponse(
            id=request.id, created=int(time.time()), model=self.model_name, usage=self._usage(request, counts),
            choices=[p.CompletionChoice(text=echo + "".join(d.text for d in pieces), logprobs=logprobs,
                                        finish_reason=pieces[-1].finish_reason)])

    async def chat(self, body: p.ChatCompletionRequest, http: Request):
        self._check_model(body.model)
        # OpenAI's newer name for the system role; Llama's chat formats know it as system.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                    for m in body.messages]
        prompt_ids = await self._tokenize(lambda: self.tokenizer.encode_dialog(messages),
                                          sum(len(m["content"]) for m in messages), "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = await self._start("chatcmpl", prompt_ids, body, body.max_tokens or body.max_completion_tokens,
                                    logprobs, "messages")
        if body.stream:
            return _stream(request, self._chat_chunks(request, body))
        counts = Counts()
        pieces = await self._whole(request, body, http, counts)
        if pieces is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        tokens = [t for d in pieces for t in d.tokens]
        return p.ChatCompletionResponse(
            id=request.id, created=int(time.time()), model=self.model_name, usage=self._usage(request, counts),
            choices=[p.ChatChoice(message=p.AssistantMessage(content="".join(d.text for d in pieces)),
                                  logprobs=self.logprobs.chat(tokens) if body.logprobs else None,
                                  finish_reason=pieces[-1].finish_reason)])

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    async def _tokenize(self, encode, chars: int, param: str) -> list[int]:
        """encode() in a worker thread: a long prompt takes seconds to tokenize, and on the event loop,
        which every stream's tokens pass through, it stalled them all that long. A prompt of `chars`
        characters that cannot fit the context whatever its tokens (limits.fewest_tokens) is refused
        before it is tokenized."""
        context = self.engine.max_seq_len

        def work():
            fewest = fewest_tokens(self.tokenizer, chars)
            return fewest if fewest >= context else encode()

        try:
            ids = await asyncio.to_thread(work)
        except (ValueError, TypeError) as e:  # e.g. a chat template that refuses the messages
            raise APIError(400, str(e), param=param) from None
        if isinstance(ids, int):
            raise APIError(400, f"the prompt is {chars} characters, at least {ids} tokens, more than the "
                                f"context of {context} tokens holds", param=param, code="context_length_exceeded")
        return ids

    def _check_context(self, prompt_len: int, max_tokens: int | None, prompt_param: str) -> None:
        """The prompt and max_tokens against the context; the error names the prompt when it alone
        leaves no room for a new token, else max_tokens."""
        context = self.engine.max_seq_len
        if prompt_len >= context:
            raise APIError(400, f"the prompt is {prompt_len} tokens, more than the context of {context} tokens "
                                f"holds with one new token", param=prompt_param, code="context_length_exceeded")
        try:
            self.engine.check(prompt_len, max_tokens if max_tokens is not None else context - prompt_len)
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens" if max_tokens is not None else prompt_param,
                           code="context_length_exceeded") from None

    async def _start(self, kind: str, prompt_ids: list[int], body: p.SamplingRequest, max_tokens: int | None,
                     logprobs: int | None, prompt_param: str):
        """Check the request against the engine's limits and add it: the engine's Request."""
        self._check_context(len(prompt_ids), max_tokens, prompt_param)
        budget = self.engine.max_seq_len - len(prompt_ids)
        try:  # RequestParams checks what the engine can sample with (e.g. its largest top_k)
            params = RequestParams(
                max_tokens=max_tokens if max_tokens is not None else budget,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(body.top_k or 0, 0),
                seed=body.seed,
                stop_token_ids=tuple(self.tokenizer.stop_tokens),
                logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        request_id = f"{kind}-{uuid.uuid4().hex}"
        try:
            request = await self.runner.submit(request_id, prompt_ids, params)
        except EngineFullError as e:
            raise APIError(429, f"the server's queue is full ({e}); retry later", "rate_limit_error",
                           code="queue_full") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), "service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return request

    async def _whole(self, request: EngineRequest, body: p.SamplingRequest, http: Request,
                     counts: Counts) -> list[Delta] | None:
        """All of a request's text pieces, or None when the client disconnects first (which
        aborts the request)."""
        async def collect():
            return [d async for d in deltas(request, self.tokenizer, body.stop_strings, counts)]

        return await _unless_disconnected(http, collect())

    def _usage(self, request: EngineRequest, counts: Counts) -> p.Usage:
        return p.Usage(prompt_tokens=request.prompt_len, completion_tokens=counts.completion_tokens,
                       total_tokens=request.prompt_len + counts.completion_tokens,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=counts.cached_prompt_tokens))

    # Streaming.

    async def _completion_chunks(self, request, body: p.CompletionRequest, echo: str):
        def chunk(choices, usage=None) -> p.CompletionResponse:
            return p.CompletionResponse(id=request.id, created=int(time.time()), model=self.model_name,
                                        choices=choices, usage=usage)

        if echo:
            yield chunk([p.CompletionChoice(text=echo, finish_reason=None)])
        counts, offsets = Counts(), TextOffsets(len(echo))  # offsets into the text of all the chunks
        async for d in deltas(request, self.tokenizer, body.stop_strings, counts):
            logprobs = None if body.logprobs is None else self.logprobs.completion(d.tokens, offsets)
            yield chunk([p.CompletionChoice(text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)])
        if body.include_usage:
            yield chunk([], self._usage(request, counts))

    async def _chat_chunks(self, request, body: p.ChatCompletionRequest):
        def chunk(choices, usage=None) -> p.ChatCompletionChunk:
            return p.ChatCompletionChunk(id=request.id, created=int(time.time()), model=self.model_name,
                                         choices=choices, usage=usage)

        yield chunk([p.ChatChunkChoice(delta=p.ChatDelta(role="assistant", content=""))])
        counts = Counts()
        async for d in deltas(request, self.tokenizer, body.stop_strings, counts):
            yield chunk([p.ChatChunkChoice(delta=p.ChatDelta(content=d.text or None),
                                           logprobs=self.logprobs.chat(d.tokens) if body.logprobs else None,
                                           finish_reason=d.finish_reason)])
        if body.include_usage:
            yield chunk([], self._usage(request, counts))


def _stream(request, chunks) -> StreamingResponse:
    return StreamingResponse(_server_sent_events(request, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _server_sent_events(request, chunks):
    """`data: {json}` events, then `data: [DONE]`; an engine failure is an error event. However the
    stream ends (finished, client gone, server stopping), the request leaves the engine."""
    try:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except EngineError as e:
            error = p.ErrorResponse(error=p.ErrorDetail(message=str(e), type="server_error"))
            yield f"data: {error.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        request.abort()


async def _unless_disconnected(http: Request, work):
    """The result of `work`, or None when the client disconnects first (the work is cancelled,
    which aborts its request). Either way nothing of it outlives this call."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def _disconnect(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(p.ErrorResponse(error=e.detail).model_dump(), status_code=e.status)

    @app.exception_handler(EngineError)
    async def engine_error(_, e: EngineError):
        return error_response(500, str(e), "server_error")

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_, e: BodyTooLarge):
        return too_large(e.max_bytes)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):  # the traceback goes to the server's log, not the client
        return error_response(500, f"internal server error ({type(e).__name__})", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(part) for part in first.get("loc", ())[1:]]  # drop "body"
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
            where = []
        elif first.get("type") == "extra_forbidden":  # protocol.py: no field is silently dropped
            message = f"{'.'.join(where)}: unknown or unsupported field; this server does not implement it"
        else:
            message = first["msg"].removeprefix("Value error, ")
            if where:
                message = f"{'.'.join(where)}: {message}"
        return error_response(400, message, param=where[0] if where else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error")
