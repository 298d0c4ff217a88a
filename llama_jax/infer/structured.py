"""Structured outputs for the Python API and the infer CLI: a JSON schema, OpenAI's response_format
or a compiled grammar as the engine's `RequestParams.grammar` (docs/structured_outputs.md).

    generate(cfg, params, tokenizer, prompts, json_schema={"type": "object", ...})
    generate(cfg, params, tokenizer, prompts, response_format={"type": "json_object"})
    generate(cfg, params, tokenizer, prompts, grammar=grammar_compiler(tokenizer, cfg.vocab_size).regex(r"\\d+"))

One GrammarCompiler per tokenizer file and logits width, kept for the process: llguidance's view of
Llama 3's vocabulary takes about a second to build, and each compiler keeps its compiled grammars
(by source), so a schema used again costs nothing. Plain Python: no jax here.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping

from llama_jax.tools.turn import turn_grammar

MAX_COMPILERS = 4  # tokenizer files x vocabulary sizes kept; a process seldom serves more than one
_compilers: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def grammar_compiler(tokenizer, vocab_size: int | None = None):
    """The process's grammar.GrammarCompiler for this tokenizer (keyed by its kind, file and stop
    tokens, so a tokenizer loaded again shares it) and logits width (default the tokenizer's)."""
    from llama_jax.grammar import GrammarCompiler, grammar_vocabulary

    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    key = (type(tokenizer).__qualname__, str(getattr(tokenizer, "path", id(tokenizer))), vocab_size,
           tuple(tokenizer.stop_tokens))
    with _lock:
        if key in _compilers:
            _compilers.move_to_end(key)
            return _compilers[key]
    compiler = GrammarCompiler(grammar_vocabulary(tokenizer, vocab_size=vocab_size))  # outside the lock: ~1 s
    with _lock:
        compiler = _compilers.setdefault(key, compiler)
        while len(_compilers) > MAX_COMPILERS:
            _compilers.popitem(last=False)
    return compiler


def output_grammar(tokenizer, vocab_size: int | None = None, *, json_schema=None,
                   response_format: Mapping | None = None, grammar=None):
    """The CompiledGrammar an answer must follow, or None: at most one of
    - json_schema: a JSON schema (dict, bool or JSON text), compiled strictly: a keyword llguidance
      cannot enforce is a ValueError naming it, never an unconstrained answer;
    - response_format: OpenAI's {"type": "text" | "json_object" | "json_schema", ...} (as the server);
    - grammar: a CompiledGrammar of this tokenizer and width (grammar_compiler(...).lark / .regex).
    Errors are one line, starting with the argument's name."""
    given = [name for name, value in (("json_schema", json_schema), ("response_format", response_format),
                                      ("grammar", grammar)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of json_schema, response_format and grammar, not {' and '.join(given)}")
    if grammar is not None:
        return _checked(grammar, tokenizer, vocab_size)
    if json_schema is not None:
        return grammar_compiler(tokenizer, vocab_size).json_schema(json_schema, strict=True)
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be a dict like {{'type': 'json_object'}}, got "
                         f"{type(response_format).__name__}")
    return turn_grammar(lambda: grammar_compiler(tokenizer, vocab_size), None, response_format)


def _checked(grammar, tokenizer, vocab_size: int | None):
    from llama_jax.grammar import CompiledGrammar

    if not isinstance(grammar, CompiledGrammar):
        raise ValueError(f"grammar must be a CompiledGrammar (grammar_compiler(tokenizer, vocab_size).lark(...) "
                         f"or .regex(...)), got {type(grammar).__name__}")
    width = tokenizer.vocab_size if vocab_size is None else vocab_size
    if grammar.vocabulary.vocab_size != width:
        raise ValueError(f"grammar was compiled for {grammar.vocabulary.vocab_size} token ids, but the model has "
                         f"{width}: compile it with grammar_compiler(tokenizer, {width})")
    return grammar


__all__ = ["grammar_compiler", "output_grammar", "MAX_COMPILERS"]
