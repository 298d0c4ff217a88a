"""An assistant turn, what /v1/chat/completions and the Python API's chat share: the grammar that
constrains it (the tools' call syntax, or a response_format, never both), and its text read as it
streams into content and tool calls.

    grammar = turn_grammar(compiler, calling, response_format)   # None: unconstrained
    reader = TurnReader(tokenizer, calling)                      # one per output
    ...decode with reader.special_text replacing those tokens' text (Llama 3's <|python_tag|>)...
    events = reader.feed(piece, stop_token)                      # per piece of text
    turn = reader.finish(finish_reason)                          # ParsedTurn: content, tool_calls, finish_reason

Plain Python: neither jax nor llguidance is imported here (the compiler is the caller's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from llama_jax.tools.parser import ContentDelta, ParsedTurn
from llama_jax.tools.syntaxes import PYTHON_TAG


def constrains(calling, response_format: Mapping | None) -> bool:
    """Whether a turn's decoding follows a grammar: tools whose choice allows a call, or a
    response_format other than text."""
    return (calling is not None and calling.grammar is not None) or \
        (response_format or {"type": "text"}).get("type") != "text"


def turn_grammar(compiler, calling, response_format: Mapping | None):
    """The compiled grammar of a turn (a CompiledGrammar), or None when nothing constrains it.

    compiler: a grammar.GrammarCompiler, or a function that makes one (called only when a grammar
    is needed). A json_schema response_format is compiled strictly whatever its `strict` says: a
    keyword the grammar engine cannot enforce is refused, never an unconstrained answer. Errors are
    one-line ValueErrors whose first word is the field they name (`tools`, `response_format`).
    """
    response_format = response_format or {"type": "text"}
    tool_grammar = calling.grammar if calling is not None else None
    if not constrains(calling, response_format):
        return None
    if tool_grammar is not None and response_format.get("type") != "text":
        raise ValueError("response_format with tools is not supported: pass tool_choice 'none' for a "
                         "structured answer, or no response_format")
    if callable(compiler):
        compiler = compiler()
    param = "tools" if tool_grammar is not None else "response_format"
    try:
        if tool_grammar is not None:
            return compiler.lark(tool_grammar)
        if response_format.get("type") == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
                raise ValueError("response_format.json_schema must be an object with a 'schema' object")
            return compiler.json_schema(spec["schema"], strict=True)
        return compiler.response_format(response_format)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(param) else f"{param}: {e}") from None


def special_text(tokenizer, calling) -> dict[int, str]:
    """Token ids whose decoded text a turn's reader takes as a stand-in: Llama 3's <|python_tag|>
    (which a model can also spell as plain text) when tools are read."""
    if calling is None or not hasattr(tokenizer, "python_tag_id"):
        return {}
    return {tokenizer.python_tag_id: PYTHON_TAG}


class TurnReader:
    """One output of an assistant turn, read piece by piece: each piece's events (parser.ContentDelta,
    CallStarted, ArgumentsDelta, CallFinished), then the whole turn. With tools one ToolCallParser
    reads it, so a streamed turn and a whole one cannot disagree; without tools (calling None) every
    piece is content, kept as generated."""

    def __init__(self, tokenizer, calling=None, call_ids=None):
        self.parser = calling.parser(call_ids) if calling is not None else None
        self.special_text = special_text(tokenizer, calling)
        self._names = {i: name for name, i in tokenizer.special_tokens.items()}
        self._content: list[str] = []

    def feed(self, text: str, stop_token: int | None = None) -> list:
        """A piece of decoded text (special_text ids already as their stand-ins), and the stop token
        that ended the output, if it ends with this piece and the caller knows it."""
        if self.parser is None:
            self._content.append(text)
            return [ContentDelta(text)] if text else []
        events = self.parser.feed(text)
        if stop_token is not None and stop_token in self._names:
            events += self.parser.feed_special(self._names[stop_token])
        return events

    def finish(self, finish_reason: str) -> ParsedTurn:
        """The whole turn; its events are those the end of the text emitted. finish_reason: the
        engine's ("stop" / "length"); a turn cut by the token limit stays "length" even with calls."""
        if self.parser is None:
            return ParsedTurn("".join(self._content), [], finish_reason)
        parsed = self.parser.finish()
        return dataclasses.replace(parsed, finish_reason="length" if finish_reason == "length" else
                                   parsed.finish_reason)


__all__ = ["TurnReader", "constrains", "special_text", "turn_grammar"]
