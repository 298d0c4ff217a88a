"""One incremental parser of tool calls out of generated text, for streamed and whole outputs alike.

    parser = ToolCallParser(syntax_for(...), CallIds(seed))
    for piece in pieces:                 # decoded text; special tokens through feed_special
        for event in parser.feed(piece): ...
    turn = parser.finish()               # content, tool_calls, finish_reason (+ the last events)

A whole (non-streamed) output is the same calls: feed it, then finish(). After each piece the
syntax reads everything so far (`syntaxes.Snapshot`) and the parser emits what is new: content
deltas, a call's start (id, name), its argument text deltas, its end. So the content deltas joined
are the final content and each call's argument deltas joined are its final `arguments`, however
the text was cut into pieces (tests/tools/test_parser.py feeds every cut).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from llama_jax.tools.definitions import CallIds
from llama_jax.tools.syntaxes import PYTHON_TAG, PYTHON_TAG_NAME, Snapshot

END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclasses.dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


@dataclasses.dataclass(frozen=True)
class CallFinished:
    index: int


@dataclasses.dataclass
class ParsedTurn:
    """An assistant turn as OpenAI returns it. content is None when the turn is only calls;
    finish_reason is "tool_calls" when there are calls, else "stop" (the caller knows "length")."""

    content: str | None
    tool_calls: list  # [{"id", "type": "function", "function": {"name", "arguments"}}]
    finish_reason: str
    end_token: str | None = None  # the special token that ended the turn, if one was fed
    events: list = dataclasses.field(default_factory=list)  # the events finish() emitted

    def message(self) -> dict:
        """The assistant message for the next request's history."""
        message = {"role": "assistant", "content": self.content}
        return message | ({"tool_calls": self.tool_calls} if self.tool_calls else {})


def _content(raw: str, final: bool) -> str:
    """Content without whitespace at its ends; before the end, trailing whitespace waits for what
    follows it (it is dropped if nothing does)."""
    return raw.strip() if final else raw.lstrip().rstrip()


class ToolCallParser:
    """Feeds text pieces to a syntax, emits events; `finish()` gives the whole turn."""

    def __init__(self, syntax, call_ids: Callable[[], str] | None = None, *, end_tokens=END_TOKENS):
        """end_tokens: the names of the special tokens that end a turn (Llama 3's by default; an HF
        model's: its stop tokens' names)."""
        self.syntax = syntax
        self.end_tokens = frozenset(end_tokens)
        self._call_ids = call_ids or CallIds()
        self._text = []
        self._memo = {}  # the syntax's scanning state, resumed as the text grows
        self._content = ""
        self._calls = []  # [id, name, arguments emitted, done]
        self._end_token = None
        self._finished = None

    def feed(self, text: str) -> list:
        """A piece of decoded text (not a special token's name: those go through feed_special)."""
        if self._finished is not None:
            raise ValueError("the parser has finished: feed a new ToolCallParser for a new turn")
        if not text:
            return []
        self._text.append(text)
        return self._update(final=False)

    def feed_special(self, name: str) -> list:
        """A special token: <|python_tag|> starts a Llama call; an end token (<|eot_id|>, <|eom_id|>)
        is recorded (it ends the turn, the caller then calls finish()); any other is its name as text."""
        if name in self.end_tokens:
            self._end_token = name
            return []
        return self.feed(PYTHON_TAG if name == PYTHON_TAG_NAME else name)

    def finish(self) -> ParsedTurn:
        """The whole turn; idempotent."""
        if self._finished is None:
            events = self._update(final=True)
            calls = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                     for call_id, name, arguments, _ in self._calls]
            self._finished = ParsedTurn(content=self._content if self._content or not calls else None,
                                        tool_calls=calls, finish_reason="tool_calls" if calls else "stop",
                                        end_token=self._end_token, events=events)
        return self._finished

    def _update(self, final: bool) -> list:
        snap: Snapshot = self.syntax.snapshot("".join(self._text), final, self._memo)
        events = []
        content = _content(snap.content, final)
        if content.startswith(self._content) and len(content) > len(self._content):
            events.append(ContentDelta(content[len(self._content):]))
            self._content = content
        for index, call in enumerate(snap.calls):
            if index == len(self._calls):
                self._calls.append([self._call_ids(), call.name, "", False])
                events.append(CallStarted(index, self._calls[index][0], call.name))
            state = self._calls[index]
            if call.arguments.startswith(state[2]) and len(call.arguments) > len(state[2]):
                events.append(ArgumentsDelta(index, call.arguments[len(state[2]):]))
                state[2] = call.arguments
            if call.done and not state[3]:
                state[3] = True
                events.append(CallFinished(index))
        if final:
            for index, state in enumerate(self._calls):
                if not state[3]:
                    state[3] = True
                    events.append(CallFinished(index))
        return events


def parse_whole(syntax, text: str, call_ids: Callable[[], str] | None = None) -> ParsedTurn:
    """A whole output's turn (text with <|python_tag|> already as syntaxes.PYTHON_TAG, if any)."""
    parser = ToolCallParser(syntax, call_ids)
    parser.feed(text)
    return parser.finish()
