"""/v1/completions: a prompt (text or token ids) continued, n choices, optionally echoed and scored.

Echo with logprobs scores the prompt on the engine thread (runner.py, infer/score.py) before the
generated tokens, or alone with max_tokens 0: what lm-eval's loglikelihood tasks send.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import Response

from llama_jax.serve import protocol as p
from llama_jax.serve.errors import APIError
from llama_jax.serve.generation import Generation, all_choices, interleaved, stream_response
from llama_jax.serve.logprobs import TextOffsets, joined
from llama_jax.serve.output import Counts, Delta, deltas
from llama_jax.serve.runner import ShuttingDownError


async def complete(gen: Generation, body: p.CompletionRequest, http: Request):
    gen.check_model(body.model)
    printed_from = 0  # the prompt's tokens before it are not in its text
    if isinstance(body.prompt, str):
        prompt_ids = await gen.tokenize(lambda: gen.tokenizer.encode(body.prompt, bos=True, eos=False),
                                        len(body.prompt), "prompt")
        prompt_text = body.prompt
        printed_from = int(prompt_ids[:1] == [gen.tokenizer.bos_id])  # the BOS the encoding added
    else:
        prompt_ids = list(body.prompt)
        gen.check_context(len(prompt_ids), body.max_tokens, "prompt")  # before reading them
        gen.check_token_ids(prompt_ids, "prompt", "prompt token id")
        prompt_text = gen.tokenizer.decode(prompt_ids)
    echo = prompt_text if body.echo else ""
    echo_logprobs = None
    if body.scores_prompt:
        gen.check_context(len(prompt_ids), body.max_tokens, "prompt")  # before scoring it
        scored = await _score(gen, prompt_ids, body.logprobs)
        echo_logprobs = gen.logprobs.prompt(prompt_ids, scored, TextOffsets(), printed_from)
    if body.max_tokens == 0:
        return _echo_alone(gen, body, prompt_ids, echo, echo_logprobs)
    params = gen.params(body, len(prompt_ids), body.max_tokens, body.logprobs, "prompt")
    request = await gen.start("cmpl", prompt_ids, params, "prompt")
    counts = [Counts() for _ in range(body.n)]
    if body.stream:
        return stream_response(request, _chunks(gen, request, body, echo, echo_logprobs, counts))

    async def choice(index: int) -> p.CompletionChoice:
        pieces = [d async for d in deltas(request, gen.tokenizer, body.stop_strings, counts[index], index)]
        tokens = [t for d in pieces for t in _scored_tokens(d, echo_logprobs)]
        logprobs = None if body.logprobs is None else gen.logprobs.completion(tokens, TextOffsets(len(echo)))
        if echo_logprobs is not None:
            logprobs = joined(echo_logprobs, logprobs)
        return p.CompletionChoice(index=index, text=echo + "".join(d.text for d in pieces), logprobs=logprobs,
                                  finish_reason=pieces[-1].finish_reason)

    choices = await all_choices(http, [choice(i) for i in range(body.n)])
    if choices is None:
        return Response(status_code=499)  # nobody reads it: the client is gone
    return p.CompletionResponse(id=request.id, created=int(time.time()), model=gen.model_name, choices=choices,
                                usage=gen.usage(request.prompt_len, counts))


async def _score(gen: Generation, prompt_ids: list[int], top_n: int):
    """The prompt's PromptLogprobs, from the runner's engine thread."""
    try:
        return await gen.runner.score(prompt_ids, top_n)
    except ShuttingDownError as e:
        raise APIError(503, str(e), "service_unavailable") from None
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None


def _echo_alone(gen: Generation, body: p.CompletionRequest, prompt_ids: list[int], echo: str,
                echo_logprobs: p.CompletionLogprobs | None):
    """max_tokens 0: the prompt echoed (and scored), no engine request."""
    gen.check_context(len(prompt_ids), 0, "prompt")
    gen.metrics.prompt_tokens.inc(len(prompt_ids))
    usage = gen.usage(len(prompt_ids), [])
    response = p.CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=gen.model_name,
        choices=[p.CompletionChoice(index=i, text=echo, logprobs=echo_logprobs, finish_reason="length")
                 for i in range(body.n)],
        usage=None if body.stream else usage)
    if not body.stream:
        return response

    async def chunks():
        yield response
        if body.include_usage:
            yield response.model_copy(update=dict(choices=[], usage=usage))

    return stream_response(None, chunks())


async def _chunks(gen: Generation, request, body: p.CompletionRequest, echo: str,
                  echo_logprobs: p.CompletionLogprobs | None, counts: list[Counts]):
    def chunk(choices, usage=None) -> p.CompletionResponse:
        return p.CompletionResponse(id=request.id, created=int(time.time()), model=gen.model_name,
                                    choices=choices, usage=usage)

    if echo:
        yield chunk([p.CompletionChoice(index=i, text=echo, logprobs=echo_logprobs, finish_reason=None)
                     for i in range(body.n)])
    offsets = [TextOffsets(len(echo)) for _ in range(body.n)]  # offsets into the text of all of a choice's chunks
    streams = [deltas(request, gen.tokenizer, body.stop_strings, counts[i], i) for i in range(body.n)]
    async for index, d in interleaved(streams):
        tokens = _scored_tokens(d, echo_logprobs)
        logprobs = None if body.logprobs is None else gen.logprobs.completion(tokens, offsets[index])
        yield chunk([p.CompletionChoice(index=index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)])
    if body.include_usage:
        yield chunk([], gen.usage(request.prompt_len, counts))


def _scored_tokens(delta: Delta, echo_logprobs) -> list:
    """A piece's tokens for its logprobs; with a scored prompt, the stop token that ended the text
    too (its text is not sent): a scorer (lm-eval) reads one entry per token the model produced, as
    OpenAI and vLLM list them."""
    if echo_logprobs is None or delta.stop_token is None:
        return delta.tokens
    return [*delta.tokens, delta.stop_token]
