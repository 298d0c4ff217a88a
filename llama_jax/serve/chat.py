"""/v1/chat/completions: messages through the model's chat format, n choices, tool calls and
structured outputs that are valid by construction.

- `tools` / `tool_choice`: the tools are rendered as the model's format renders them
  (llama_jax/tools), and decoding is constrained to the format's call syntax by its grammar
  (llama_jax/grammar): "required" and a named function from the first token, "auto" once the
  call begins. One parser reads every choice's text, streamed or not (`_turn`), so the two cannot
  disagree: its events become the stream's deltas, its final turn the whole message.
- `response_format`: json_object or json_schema, compiled strictly whatever the request's
  `strict` says: a keyword the grammar engine cannot enforce is a 400 naming it, never an
  unconstrained answer. An answer cut by max_tokens ends with finish_reason "length".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from llama_jax.serve import protocol as p
from llama_jax.serve.errors import APIError
from llama_jax.serve.generation import Generation, all_choices, interleaved, param_named, stream_response
from llama_jax.serve.output import Counts, deltas


async def chat(gen: Generation, body: p.ChatCompletionRequest, http: Request):
    gen.check_model(body.model)
    messages = chat_messages(body.messages)
    calling = _tool_calling(gen, body, messages)
    encode = ((lambda: calling.encode_dialog(gen.tokenizer, messages)) if calling is not None else
              (lambda: gen.tokenizer.encode_dialog(messages)))
    prompt_ids = await gen.tokenize(encode, sum(len(m.get("content") or "") for m in messages), "messages")
    grammar = await _grammar(gen, body, calling)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_tokens or body.max_completion_tokens
    params = gen.params(body, len(prompt_ids), max_tokens, logprobs, "messages", grammar)
    request = await gen.start("chatcmpl", prompt_ids, params, "messages")
    counts = [Counts() for _ in range(body.n)]
    turns = [_turn(gen, request, body, calling, counts[i], i) for i in range(body.n)]
    if body.stream:
        return stream_response(request, _chunks(gen, request, body, turns, counts))

    async def choice(index: int) -> p.ChatChoice:
        tokens, last = [], None
        async for _, piece_tokens, last in turns[index]:
            tokens += piece_tokens
        return p.ChatChoice(index=index, message=_message(last), finish_reason=last.finish_reason,
                            logprobs=gen.logprobs.chat(tokens) if body.logprobs else None)

    choices = await all_choices(http, [choice(i) for i in range(body.n)])
    if choices is None:
        return Response(status_code=499)  # nobody reads it: the client is gone
    return p.ChatCompletionResponse(id=request.id, created=int(time.time()), model=gen.model_name, choices=choices,
                                    usage=gen.usage(request.prompt_len, counts))


def chat_messages(messages: list[p.ChatMessage]) -> list[dict]:
    """The request's messages as the chat formats take them: OpenAI's newer `developer` role is
    Llama's system; content as one string (None for an assistant message that only calls tools)."""
    out = []
    for m in messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls is not None:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _tool_calling(gen: Generation, body: p.ChatCompletionRequest, messages: list[dict]):
    """The request's tools.request.ToolCalling, or None when neither tools nor tool messages are in it."""
    uses_tools = body.tools is not None or body.tool_choice is not None or body.parallel_tool_calls is not None or \
        any(m["role"] in ("tool", "ipython") or "tool_calls" in m for m in messages)
    if not uses_tools:
        return None
    from llama_jax.tools.definitions import check_tool_call_ids
    from llama_jax.tools.request import tool_calling

    try:
        check_tool_call_ids(messages)
        return tool_calling(gen.tokenizer, body.tools, body.tool_choice,
                            parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls)
    except ValueError as e:
        raise APIError(400, str(e), param=param_named(str(e))) from None


async def _grammar(gen: Generation, body: p.ChatCompletionRequest, calling):
    """The compiled grammar that constrains every choice, or None."""
    from llama_jax.tools.turn import constrains, turn_grammar

    if not constrains(calling, body.response_format):
        return None
    try:  # in a worker thread: the first compiler is built there, and a grammar compiles in it
        return await asyncio.to_thread(turn_grammar, gen.grammars, calling, body.response_format)
    except ValueError as e:
        raise APIError(400, str(e), param=param_named(str(e))) from None


async def _turn(gen: Generation, request, body: p.ChatCompletionRequest, calling, counts: Counts,
                index: int) -> AsyncIterator[tuple[list, list, object]]:
    """Sample `index` as (events, its tokens, turn): the parser's events for each piece of text
    (ContentDelta / CallStarted / ArgumentsDelta / CallFinished), the last with the whole turn
    (tools.parser.ParsedTurn). Without tools every piece is content."""
    from llama_jax.tools.turn import TurnReader

    reader = TurnReader(gen.tokenizer, calling)
    async for d in deltas(request, gen.tokenizer, body.stop_strings, counts, index, reader.special_text):
        events = reader.feed(d.text, d.stop_token.token_id if d.stop_token is not None else None)
        if d.finish_reason is None:
            yield events, d.tokens, None
            continue
        turn = reader.finish(d.finish_reason)
        yield events + turn.events, d.tokens, turn


def _message(turn) -> p.AssistantMessage:
    calls = [p.ToolCallOut(**call) for call in turn.tool_calls] or None
    return p.AssistantMessage(content=turn.content, tool_calls=calls)


def _delta(event) -> p.ChatDelta | None:
    from llama_jax.tools import parser as events_of

    if isinstance(event, events_of.ContentDelta):
        return p.ChatDelta(content=event.text)
    if isinstance(event, events_of.CallStarted):
        return p.ChatDelta(tool_calls=[p.ToolCallDelta(index=event.index, id=event.id, type="function",
                                                       function=p.FunctionDelta(name=event.name, arguments=""))])
    if isinstance(event, events_of.ArgumentsDelta):
        return p.ChatDelta(tool_calls=[p.ToolCallDelta(index=event.index,
                                                       function=p.FunctionDelta(arguments=event.text))])
    return None  # CallFinished: the next call's start or the finish reason says it


async def _chunks(gen: Generation, request, body: p.ChatCompletionRequest, turns: list, counts: list[Counts]):
    def chunk(choices, usage=None) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=request.id, created=int(time.time()), model=gen.model_name,
                                     choices=choices, usage=usage)

    yield chunk([p.ChatChunkChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))
                 for i in range(body.n)])
    async for index, (events, tokens, turn) in interleaved(turns):
        logprobs = gen.logprobs.chat(tokens) if body.logprobs and tokens else None
        for delta in filter(None, map(_delta, events)):
            yield chunk([p.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)])
            logprobs = None  # a piece's tokens go with its first chunk
        if turn is not None or logprobs is not None:
            yield chunk([p.ChatChunkChoice(index=index, delta=p.ChatDelta(), logprobs=logprobs,
                                           finish_reason=turn.finish_reason if turn is not None else None)])
    if body.include_usage:
        yield chunk([], gen.usage(request.prompt_len, counts))
