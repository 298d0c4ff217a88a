"""Grammar sources (a JSON schema, any JSON object, a Lark grammar, a regex) compiled by llguidance
for one vocabulary, cached by their source text.

A compiled grammar is an llguidance matcher that never consumes a token: each request gets a copy
(`CompiledGrammar.matcher()`, microseconds), so a schema repeated across requests is parsed and
checked once, and its lexer states, built lazily while masks are computed, are shared by the copies.

JSON whitespace: llguidance's default (any run of JSON whitespace between tokens) lets a model
that has lost its way emit newlines forever inside an object that is otherwise bounded. We allow
at each place JSON permits whitespace one optional newline then at most 20 spaces or tabs
(`JSON_WHITESPACE`): compact output, json.dumps' `", "` / `": "`, and pretty-printed objects up to
five levels of four-space indent all parse; unbounded runs and blank lines do not (llguidance 1.8
and later match the pattern once per place; 1.7 repeated it).
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Mapping

import llguidance

from llama_jax.grammar.matcher import GrammarMatcher
from llama_jax.grammar.vocab import GrammarVocabulary

JSON_WHITESPACE = r"\n?[ \t]{0,20}"
# Options for every JSON schema we compile; `overrides`, so a schema's own "x-guidance" cannot
# unbound the whitespace.
JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
CACHE_SIZE = 128  # distinct grammars kept compiled; a server sees a few schemas repeated many times
MAX_ERROR_CHARS = 300  # an unknown special token's error lists all the vocabulary's: a 400 says less


def _one_line(message: str) -> str:
    """llguidance's errors span lines (a regex error draws a caret under the pattern): one line,
    without the caret rows, cut to MAX_ERROR_CHARS."""
    lines = (line.strip() for line in message.splitlines())
    text = " ".join(line for line in lines if line and not re.fullmatch(r"\^+", line))
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 4] + " ..."


def _schema_value(schema) -> dict | bool:
    """A schema given as a dict, a bool, or JSON text; anything else is a ValueError."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema: not JSON ({e})") from None
    if isinstance(schema, Mapping):
        return dict(schema)
    if isinstance(schema, bool):
        return schema
    raise ValueError(f"json_schema: a schema is a JSON object (or true / false), got {type(schema).__name__}")


def json_schema_source(schema, *, strict: bool = True) -> str:
    """The schema as JSON text with our compile options in its "x-guidance" key: what a Lark
    grammar embeds as `%json <this>`, so a tool call's arguments get the same bounded whitespace."""
    value = _schema_value(schema)
    if value is False:
        raise ValueError("json_schema: false matches no value")
    if value is True:
        value = {}
    options = {**JSON_OPTIONS, **({} if strict else {"lenient": True})}
    try:
        return json.dumps({**value, "x-guidance": options}, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:  # a set, an object, NaN: nothing a JSON request could carry
        raise ValueError(f"json_schema: not JSON ({e})") from None


class CompiledGrammar:
    """One grammar for one vocabulary: `matcher()` gives each request its own state."""

    def __init__(self, kind: str, template: llguidance.LLMatcher, vocabulary: GrammarVocabulary):
        self.kind = kind
        self.vocabulary = vocabulary
        self._template = template
        self._lock = threading.Lock()  # pyo3 refuses concurrent borrows of one matcher

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            return GrammarMatcher(self._template.deep_copy(), self.vocabulary)


class GrammarCompiler:
    """Compiles grammars for one vocabulary, keeping the `cache_size` most recently used.

    Every method returns a `CompiledGrammar` or raises a one-line ValueError naming what llguidance
    cannot enforce (an unimplemented keyword, an unresolvable $ref, a bad regex): the server's 400.
    Thread-safe: the server may compile in its request handlers while the engine copies matchers.
    """

    def __init__(self, vocabulary: GrammarVocabulary, cache_size: int = CACHE_SIZE):
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self.vocabulary = vocabulary
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, str], CompiledGrammar] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        # Short errors: a verbose one prints the grammar and parser state, which a 400 should not.
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    def json_schema(self, schema, *, strict: bool = True) -> CompiledGrammar:
        """A JSON value valid against `schema` (dict, bool or JSON text). strict=False ignores the
        keywords llguidance cannot enforce instead of refusing the schema (OpenAI's strict: false)."""
        return self._compile("json_schema", json_schema_source(schema, strict=strict))

    def json_object(self) -> CompiledGrammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return self._compile("json_object", json_schema_source({"type": "object"}))

    def lark(self, grammar: str) -> CompiledGrammar:
        """llguidance's Lark dialect: special tokens as `<|eot_id|>` or `<[128009]>`, JSON schemas
        inline as `%json {...}` (see `json_schema_source`), `[lazy]` terminals for triggers."""
        if not isinstance(grammar, str):
            raise ValueError(f"lark: a grammar is a str, got {type(grammar).__name__}")
        return self._compile("lark", grammar)

    def regex(self, pattern: str) -> CompiledGrammar:
        """Text matching `pattern` (Rust regex syntax, anchored at both ends)."""
        if not isinstance(pattern, str):
            raise ValueError(f"regex: a pattern is a str, got {type(pattern).__name__}")
        return self._compile("regex", pattern)

    def response_format(self, response_format: Mapping) -> CompiledGrammar | None:
        """OpenAI's `response_format`: {"type": "text"} -> None (unconstrained),
        {"type": "json_object"}, or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return self.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or "schema" not in spec:
                raise ValueError("response_format.json_schema: an object with a 'schema' field is required")
            return self.json_schema(spec["schema"], strict=bool(spec.get("strict", False)))
        raise ValueError(f"response_format.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}")

    def _compile(self, kind: str, source: str) -> CompiledGrammar:
        key = (kind, source)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        compiled = CompiledGrammar(kind, self._build(kind, source), self.vocabulary)  # outside the lock: may take 100s of ms
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _build(self, kind: str, source: str) -> llguidance.LLMatcher:
        if kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(source)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(source)
        else:  # the options already sit in the schema's x-guidance; overrides keep them on top
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, overrides=JSON_OPTIONS)
        template = llguidance.LLMatcher(self.vocabulary.ll_tokenizer, grammar, log_level=0, limits=self._limits)
        if template.is_error():
            raise ValueError(f"{kind}: {_one_line(template.get_error())}")
        return template

    def __len__(self) -> int:
        return len(self._cache)


__all__ = ["JSON_WHITESPACE", "CACHE_SIZE", "CompiledGrammar", "GrammarCompiler", "json_schema_source"]
