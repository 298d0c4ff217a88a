"""Structured outputs: grammars (JSON schemas, any JSON object, Lark, regex) compiled by llguidance
into per-request matchers that fill the engine's allowed-token bitmask. See docs/structured_outputs.md.

    vocabulary = grammar_vocabulary(tokenizer, vocab_size=config.vocab_size)   # once per engine
    compiler = GrammarCompiler(vocabulary)                                     # its LRU of grammars
    matcher = compiler.json_schema(schema).matcher()                           # per request
    matcher.fill(allowed_LW[row]); ...; matcher.accept(token); matcher.is_finished()

Imported lazily, so importing llama_jax.grammar loads neither llguidance nor a tokenizer.
"""

from llama_jax.lazy import lazy_getattr

_EXPORTS = {
    "GrammarVocabulary": "vocab",
    "grammar_vocabulary": "vocab",
    "CompiledGrammar": "compile",
    "GrammarCompiler": "compile",
    "JSON_WHITESPACE": "compile",
    "json_schema_source": "compile",
    "GrammarMatcher": "matcher",
    "fill_rows": "matcher",
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
