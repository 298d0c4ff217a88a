"""The OpenAI-compatible HTTP API over a BatchingEngine: `create_app(engine, tokenizer, model_name)`.

Each request is validated here (protocol.py, engine.check) before it reaches the engine, so a bad
one is a 400 that touches no other request, and every error is OpenAI's JSON shape, a 500 too.
Nothing slow runs on the event loop, which every stream's tokens pass through: a body over the
limit is refused before it is read (limits.py), and prompts are tokenized in a worker thread.
Generation streams through the runner's engine thread; text goes out in whole UTF-8 characters,
cut before a stop string (output.py). Echo with logprobs scores the prompt on that thread too
(runner.py, infer/score.py), before the generated tokens, or alone with max_tokens 0: what lm-eval's
loglikelihood tasks send. /tokenize and /detokenize are vLLM's routes and shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import EngineFullError, RequestParams
from llama_jax.infer.score import Scorer
from llama_jax.serve import protocol as p
from llama_jax.serve.errors import APIError, error_response, install_error_handlers
from llama_jax.serve.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit, fewest_tokens
from llama_jax.serve.logprobs import Logprobs, TextOffsets, joined
from llama_jax.serve.metrics import ServerMetrics
from llama_jax.serve.output import Counts, Delta, deltas
from llama_jax.serve.runner import EngineError, EngineRequest, EngineRunner, ShuttingDownError
from llama_jax.vocab import check_token_ids


def uvicorn_config(app, **kwargs) -> uvicorn.Config:
    """uvicorn for `app` on uvloop's event loop and httptools' HTTP parser, both C (uvicorn's own
    defaults fall back to pure-Python asyncio and h11): every streamed token is an event through
    them, on the cores the engine's step runs on, where the server's Python competes with it for the
    GIL (bench/RESULTS.md, "Numbers moved from docstrings")."""
    return uvicorn.Config(app, loop="uvloop", http="httptools", **kwargs)


def create_app(engine, tokenizer, model_name: str, *, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, scorer=None) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (aborting what is left).
    scorer: what scores echoed prompts (infer/score.Scorer); None: a BatchingEngine's own weights,
    and no prompt scoring for any other engine."""
    metrics = ServerMetrics()
    runner = EngineRunner(engine, metrics, scorer if scorer is not None else _engine_scorer(engine))
    generation = Generation(engine, tokenizer, model_name, runner, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        runner.start()
        yield
        await asyncio.to_thread(runner.stop)

    app = FastAPI(title="llama_jax", lifespan=lifespan)
    app.state.runner = runner
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    install_error_handlers(app)

    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    keyed = [Depends(check_key)] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=keyed)

    @v1.get("/models")
    async def models() -> p.ModelList:
        features = ["stream", "logprobs"] + (["echo_logprobs"] if runner.scorer is not None else [])
        return p.ModelList(data=[p.ModelCard(id=model_name, root=model_name, created=generation.created,
                                             max_model_len=engine.max_seq_len, features=features)])

    @v1.post("/completions")
    async def completions(body: p.CompletionRequest, http: Request):
        return await generation.complete(body, http)

    @v1.post("/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, http: Request):
        return await generation.chat(body, http)

    app.include_router(v1)

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        return await generation.tokenize(body)

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        return await generation.detokenize(body)

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


def _engine_scorer(engine) -> Scorer | None:
    """A scorer on a BatchingEngine's own weights; None for another engine (the tests' fakes)."""
    return Scorer.for_engine(engine) if isinstance(engine, BatchingEngine) else None


class Generation:
    """Turns validated requests into engine requests and their results into OpenAI responses."""

    def __init__(self, engine, tokenizer, model_name: str, runner: EngineRunner, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.runner, self.metrics = runner, metrics
        self.logprobs = Logprobs(tokenizer)
        self.created = int(time.time())

    async def complete(self, body: p.CompletionRequest, http: Request):
        self._check_model(body.model)
        printed_from = 0  # the prompt's tokens before it are not in its text
        if isinstance(body.prompt, str):
            prompt_ids = await self._tokenize(lambda: self.tokenizer.encode(body.prompt, bos=True, eos=False),
                                              len(body.prompt), "prompt")
            prompt_text = body.prompt
            printed_from = int(prompt_ids[:1] == [self.tokenizer.bos_id])  # the BOS the encoding added
        else:
            prompt_ids = list(body.prompt)
            self._check_context(len(prompt_ids), body.max_tokens, "prompt")  # before reading them
            try:
                check_token_ids(prompt_ids, self.tokenizer.vocab_size, "prompt token id")
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            prompt_text = self.tokenizer.decode(prompt_ids)
        echo = prompt_text if body.echo else ""
        echo_logprobs = None
        if body.scores_prompt:
            self._check_context(len(prompt_ids), body.max_tokens, "prompt")  # before scoring it
            scored = await self._score(prompt_ids, body.logprobs)
            echo_logprobs = self.logprobs.prompt(prompt_ids, scored, TextOffsets(), printed_from)
        if body.max_tokens == 0:
            return self._echo_alone(body, prompt_ids, echo, echo_logprobs)
        request = await self._start("cmpl", prompt_ids, body, body.max_tokens, body.logprobs, "prompt")
        if body.stream:
            return _stream(request, self._completion_chunks(request, body, echo, echo_logprobs))
        counts = Counts()
        pieces = await self._whole(request, body, http, counts)
        if pieces is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        tokens = [t for d in pieces for t in _scored_tokens(d, echo_logprobs)]
        logprobs = None if body.logprobs is None else self.logprobs.completion(tokens, TextOffsets(len(echo)))
        if echo_logprobs is not None:
            logprobs = joined(echo_logprobs, logprobs)
        return p.CompletionResponse(
            id=request.id, created=int(time.time()), model=self.model_name, usage=self._usage(request, counts),
            choices=[p.CompletionChoice(text=echo + "".join(d.text for d in pieces), logprobs=logprobs,
                                        finish_reason=pieces[-1].finish_reason)])

    async def chat(self, body: p.ChatCompletionRequest, http: Request):
        self._check_model(body.model)
        messages = _chat_messages(body.messages)
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

    def _echo_alone(self, body: p.CompletionRequest, prompt_ids: list[int], echo: str,
                    echo_logprobs: p.CompletionLogprobs | None):
        """max_tokens 0: the prompt echoed (and scored), no engine request."""
        self._check_context(len(prompt_ids), 0, "prompt")
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        usage = p.Usage(prompt_tokens=len(prompt_ids), completion_tokens=0, total_tokens=len(prompt_ids),
                        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=0))
        response = p.CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name,
            choices=[p.CompletionChoice(text=echo, logprobs=echo_logprobs, finish_reason="length")],
            usage=None if body.stream else usage)
        if not body.stream:
            return response

        async def chunks():
            yield response
            if body.include_usage:
                yield response.model_copy(update=dict(choices=[], usage=usage))

        return _stream(None, chunks())

    async def _score(self, prompt_ids: list[int], top_n: int):
        """The prompt's PromptLogprobs, from the runner's engine thread."""
        try:
            return await self.runner.score(prompt_ids, top_n)
        except ShuttingDownError as e:
            raise APIError(503, str(e), "service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def tokenize(self, body: p.TokenizeRequest) -> p.TokenizeResponse:
        """vLLM's /tokenize: a prompt's ids (with the BOS token unless add_special_tokens is false),
        or the ids the chat format gives messages (what /v1/chat/completions feeds the model). No
        context limit: a client asks to learn whether its prompt fits."""
        if body.model is not None:
            self._check_model(body.model)
        if body.messages is not None:
            messages, param = _chat_messages(body.messages), "messages"
            encode = lambda: self.tokenizer.encode_dialog(messages)  # noqa: E731
        else:
            bos, param = body.add_special_tokens is not False, "prompt"
            encode = lambda: self.tokenizer.encode(body.prompt, bos=bos, eos=False)  # noqa: E731
        try:
            ids = await asyncio.to_thread(encode)
        except (ValueError, TypeError) as e:  # e.g. a chat template that refuses the messages
            raise APIError(400, str(e), param=param) from None
        return p.TokenizeResponse(count=len(ids), max_model_len=self.engine.max_seq_len, tokens=ids)

    async def detokenize(self, body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        if body.model is not None:
            self._check_model(body.model)
        try:
            check_token_ids(body.tokens, self.tokenizer.vocab_size, "tokens: token id")
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None
        return p.DetokenizeResponse(prompt=await asyncio.to_thread(self.tokenizer.decode, body.tokens))

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
        leaves no room for a new token, else max_tokens. max_tokens 0: the prompt alone, scored."""
        context = self.engine.max_seq_len
        if max_tokens == 0:
            if prompt_len > context:
                raise APIError(400, f"the prompt is {prompt_len} tokens, more than the context of {context} "
                                    f"tokens", param=prompt_param, code="context_length_exceeded")
            return
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
        if body.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
        budget = self.engine.max_seq_len - len(prompt_ids)
        try:  # RequestParams checks what the engine can sample with (e.g. its largest top_k)
            params = RequestParams(
                max_tokens=max_tokens if max_tokens is not None else budget,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(body.top_k or 0, 0),
                seed=body.seed,
                stop_token_ids=() if body.ignore_eos else tuple(self.tokenizer.stop_tokens),
                logprobs=logprobs,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                logit_bias=body.logit_bias or {},
                min_tokens=body.min_tokens or 0)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_named(str(e))) from None
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

    async def _completion_chunks(self, request, body: p.CompletionRequest, echo: str,
                                 echo_logprobs: p.CompletionLogprobs | None):
        def chunk(choices, usage=None) -> p.CompletionResponse:
            return p.CompletionResponse(id=request.id, created=int(time.time()), model=self.model_name,
                                        choices=choices, usage=usage)

        if echo:
            yield chunk([p.CompletionChoice(text=echo, logprobs=echo_logprobs, finish_reason=None)])
        counts, offsets = Counts(), TextOffsets(len(echo))  # offsets into the text of all the chunks
        async for d in deltas(request, self.tokenizer, body.stop_strings, counts):
            tokens = _scored_tokens(d, echo_logprobs)
            logprobs = None if body.logprobs is None else self.logprobs.completion(tokens, offsets)
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


def _param_named(message: str) -> str | None:
    """The request field a RequestParams error names (its messages start with the field's name)."""
    first = message.split(" ", 1)[0]
    return first if first in p.ChatCompletionRequest.model_fields or first in p.CompletionRequest.model_fields \
        else None


def _chat_messages(messages: list[p.ChatMessage]) -> list[dict]:
    # OpenAI's newer name for the system role; Llama's chat formats know it as system.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]


def _scored_tokens(delta: Delta, echo_logprobs) -> list:
    """A piece's tokens for its logprobs; with a scored prompt, the stop token that ended the text
    too (its text is not sent): a scorer (lm-eval) reads one entry per token the model produced, as
    OpenAI and vLLM list them."""
    if echo_logprobs is None or delta.stop_token is None:
        return delta.tokens
    return [*delta.tokens, delta.stop_token]


def _stream(request, chunks) -> StreamingResponse:
    return StreamingResponse(_server_sent_events(request, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _server_sent_events(request, chunks):
    """`data: {json}` events, then `data: [DONE]`; an engine failure is an error event. However the
    stream ends (finished, client gone, server stopping), the request (if any) leaves the engine."""
    try:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except EngineError as e:
            error = p.ErrorResponse(error=p.ErrorDetail(message=str(e), type="server_error"))
            yield f"data: {error.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if request is not None:
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
