"""A request's TokenOutputs -> the text to send: whole UTF-8 characters only, cut before the first
stop string, held back only as far as a stop string could still be starting."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence

from llama_jax.infer.requests import TokenOutput
from llama_jax.infer.text import TextStream


class StopStrings:
    """Finds the first stop string in text that arrives in pieces, across piece boundaries.

    `push` returns the text that is safe to send: everything except a tail that is a proper prefix
    of some stop string (it may yet complete one). Once a stop string is found, the text before it
    is returned with stopped=True; the stop string itself is never returned.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return text[:min(found)], True
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with (shorter than it)."""
        longest = min(len(text), max((len(s) - 1 for s in self.stops), default=0))
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


@dataclasses.dataclass
class Delta:
    text: str
    tokens: list  # the TokenOutputs whose text is in (or was cut from) this piece: its logprobs
    finish_reason: str | None  # set on the last Delta
    stop_token: TokenOutput | None = None  # on the last: the stop token that ended the text (not in it)


@dataclasses.dataclass
class Counts:
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


async def deltas(request, tokenizer, stops: Sequence[str], counts: Counts, index: int = 0,
                 special_text: Mapping[int, str] | None = None) -> AsyncIterator[Delta]:
    """Sample `index` of the request as text in pieces, each non-empty except perhaps the last (which
    carries the finish reason). special_text: token ids whose text is replaced (a tool-call parser's
    stand-in for <|python_tag|>, which the model can also spell in plain text). However it ends early
    (a stop string in the text, the consumer gone), the sample is aborted in the engine."""
    text_stream, stop_strings, pending, stop_token = TextStream(tokenizer), StopStrings(stops), [], None
    special_text = special_text or {}
    try:
        while True:
            out = await request.next(index)
            counts.completion_tokens += 1
            if counts.completion_tokens == 1:
                counts.cached_prompt_tokens = out.cached_prompt_tokens
            if out.finish_reason == "stop" and out.token_id in request.params.stop_token_ids:
                piece = text_stream.flush()  # the stop token ends the text; its own text is not sent
                stop_token = out
            elif out.token_id in special_text:
                pending.append(out)
                piece = text_stream.flush() + special_text[out.token_id]
            else:
                pending.append(out)
                piece = text_stream.push(out.token_id) + (text_stream.flush() if out.finish_reason else "")
            text, stopped = stop_strings.push(piece)
            if stopped or out.finish_reason is not None:
                yield Delta(text if stopped else text + stop_strings.flush(), pending,
                            "stop" if stopped else out.finish_reason, stop_token)
                return
            if text:
                yield Delta(text, pending, None)
                pending = []
    finally:
        request.abort(index)  # a stop string, a client gone, a cancelled task: free it (no-op once finished)
