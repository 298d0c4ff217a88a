"""What completions and chat completions share: a request's checks against the engine, its
RequestParams, its start on the engine thread, its n choices read whole or interleaved in a stream.

A request for n choices is one engine request: its prompt is prefilled once and forked into n
samples (infer/scheduler.py), each read here from its own queue (runner.EngineRequest.next(index)).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from llama_jax.infer.requests import EngineFullError, RequestParams
from llama_jax.serve import protocol as p
from llama_jax.serve.errors import APIError
from llama_jax.serve.limits import fewest_tokens
from llama_jax.serve.logprobs import Logprobs
from llama_jax.serve.metrics import ServerMetrics
from llama_jax.serve.output import Counts
from llama_jax.serve.runner import EngineError, EngineRequest, EngineRunner, ShuttingDownError
from llama_jax.vocab import check_token_ids


class Generation:
    """The server's state a request handler needs, and the steps every handler takes."""

    def __init__(self, engine, tokenizer, model_name: str, runner: EngineRunner, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.runner, self.metrics = runner, metrics
        self.logprobs = Logprobs(tokenizer)
        self.created = int(time.time())

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def grammars(self):
        """The process's grammar compiler for the tokenizer and the model's logits width (infer.structured:
        the Python API's too), with its cache of compiled grammars. Its first call builds llguidance's
        view of the vocabulary (a second for Llama 3's): call it off the event loop."""
        from llama_jax.infer.structured import grammar_compiler

        vocab_size = getattr(getattr(self.engine, "cfg", None), "vocab_size", self.tokenizer.vocab_size)
        return grammar_compiler(self.tokenizer, vocab_size)

    async def tokenize(self, encode: Callable[[], list[int]], chars: int, param: str) -> list[int]:
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

    def check_token_ids(self, ids: list[int], param: str, what: str) -> None:
        """Each id within the tokenizer's vocabulary, else a 400 naming `param` (`what`: an id's name in it)."""
        try:
            check_token_ids(ids, self.tokenizer.vocab_size, what)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    def check_context(self, prompt_len: int, max_tokens: int | None, prompt_param: str) -> None:
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

    def params(self, body: p.SamplingRequest, prompt_len: int, max_tokens: int | None, logprobs: int | None,
               prompt_param: str, grammar=None) -> RequestParams:
        """The body's sampling settings as the engine's RequestParams, after the prompt and max_tokens
        are checked against the context (a 400 naming the field that RequestParams refuses, e.g. a
        top_k past the engine's largest)."""
        self.check_context(prompt_len, max_tokens, prompt_param)
        try:
            return RequestParams(
                max_tokens=max_tokens if max_tokens is not None else self.engine.max_seq_len - prompt_len,
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
                min_tokens=body.min_tokens or 0,
                n=body.n,
                grammar=grammar)
        except ValueError as e:
            raise APIError(400, str(e), param=param_named(str(e))) from None

    async def start(self, kind: str, prompt_ids: list[int], params: RequestParams, prompt_param: str) -> EngineRequest:
        """Check the request against the engine's limits and add it: the engine's Request."""
        self.check_context(len(prompt_ids), params.max_tokens, prompt_param)
        request_id = f"{kind}-{uuid.uuid4().hex}"
        try:
            request = await self.runner.submit(request_id, prompt_ids, params)
        except EngineFullError as e:
            raise APIError(429, f"the server's queue is full ({e}); retry later", "rate_limit_error",
                           code="queue_full") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), "service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param_named(str(e))) from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return request

    def usage(self, prompt_len: int, counts: list[Counts]) -> p.Usage:
        """Every choice's tokens (n choices share one prefilled prompt, counted once)."""
        completion = sum(c.completion_tokens for c in counts)
        cached = counts[0].cached_prompt_tokens if counts else 0
        return p.Usage(prompt_tokens=prompt_len, completion_tokens=completion, total_tokens=prompt_len + completion,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached))


def param_named(message: str) -> str | None:
    """The request field an error names by its first word (`presence_penalty must be ...`,
    `tools[0].function.name ...`, `response_format: ...`), or None when it names none."""
    head = message.split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0].rstrip(":")
    return head if head in p.ChatCompletionRequest.model_fields or head in p.CompletionRequest.model_fields \
        else None


async def all_choices(http: Request, choices: list) -> list | None:
    """Each choice coroutine's result, run together; None when the client disconnects first (they
    are cancelled, which aborts the request). Either way nothing of them outlives this call."""
    async def together():
        return await asyncio.gather(*choices)

    return await unless_disconnected(http, together())


async def interleaved(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from every stream as each comes: n choices' chunks in one response. An error in
    one stream ends them all (each stream's own cleanup aborts its sample)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index: int, stream: AsyncIterator):
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, end))
        except Exception as e:  # noqa: BLE001 (raised again in the consumer)
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def stream_response(request: EngineRequest | None, chunks) -> StreamingResponse:
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


async def unless_disconnected(http: Request, work):
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
