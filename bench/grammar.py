"""Structured outputs on the host: llguidance's grammar compile time and per-token bitmask time through
llama_jax.grammar, on the real Llama 3 vocabulary (128,256 tokens) and the 512-token byte vocabulary,
with xgrammar on the same token sequences when it can be imported.

    python -m bench.grammar                      # ~1 min on 2 cores; appends to bench/RESULTS.md
    python -m bench.grammar --no-append --runs 5
    /tmp/venv/bin/python -m bench.grammar        # a throwaway venv (--system-site-packages) holding
                                                 # xgrammar, installed --no-deps with apache-tvm-ffi

Schemas: small (two fields), nested (bounded strings, integers, an enum, a const, a nested object),
pydantic (a model's model_json_schema(): $defs, $ref, anyOf with null, patterns, bounded arrays);
and a Lark tool call for tool_choice auto (free text or <|python_tag|> + a %json call + <|eom_id|>),
walked from its start (free-text masks) and after the trigger token (the call's masks). Compile = a fresh compiler's `json_schema` / `lark` (parse,
check, matcher), median of repeats; first mask = the first fill of a new grammar (llguidance builds
its lexer lazily). Per-token mask = `GrammarMatcher.fill` of one row, timed at every step of `--runs`
random walks (each step a uniformly random allowed token, seeded), mean and p99 over all steps.
xgrammar replays the same tokens (its any_whitespace with max_whitespace_cnt=21, a looser bound than
ours) with its GrammarMatcher.fill_next_token_bitmask into a numpy row; its compile has its cache off;
its vocabulary holds the special tokens' names as text (its structural tag matches the trigger as
text), and a sequence it refuses is timed up to the refused token.
One markdown table; appended with machine, date and commit to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from typing import Literal, Optional

import numpy as np
import pydantic

from bench.results import git_commit, machine, publish
from llama_jax.grammar import GrammarCompiler, grammar_vocabulary, json_schema_source
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path, write_byte_tokenizer

SECTION = "## Structured-output grammars (bench/grammar.py)"


class Tag(pydantic.BaseModel):
    label: Literal["red", "green", "blue"]
    weight: int = pydantic.Field(ge=0, le=10)
    model_config = pydantic.ConfigDict(extra="forbid")


class Item(pydantic.BaseModel):
    sku: str = pydantic.Field(pattern=r"^[A-Z]{3}[0-9]{2}$")
    name: str = pydantic.Field(min_length=1, max_length=16)
    tags: list[Tag] = pydantic.Field(min_length=1, max_length=3)
    parent: Optional[Tag] = None
    price_cents: int = pydantic.Field(gt=0, lt=100_000)
    model_config = pydantic.ConfigDict(extra="forbid")


SCHEMAS = {
    "small": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                                               "name": {"type": "string", "maxLength": 16}},
              "required": ["id", "name"], "additionalProperties": False},
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "home": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 16},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                     "required": ["street", "zip"], "additionalProperties": False},
            "role": {"enum": ["admin", "user", "guest"]},
            "version": {"const": "v1"},
        },
        "required": ["name", "age", "home", "role", "version"],
        "additionalProperties": False,
    },
    "pydantic": Item.model_json_schema(),
}
TOOL_CALL = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                              "parameters": SCHEMAS["small"]},
             "required": ["name", "parameters"], "additionalProperties": False}
AUTO_TOOL_LARK = (f"start: TEXT | <|python_tag|> call <|eom_id|>\nTEXT: /(.|\\n)*/\n"
                  f"call: %json {json_schema_source(TOOL_CALL)}\n")


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def sample_allowed(row_W: np.ndarray, rng: np.random.Generator) -> int:
    """A uniformly random allowed id (the k-th set bit, through per-word bit counts)."""
    counts = np.bitwise_count(row_W)
    cumulative = np.cumsum(counts, dtype=np.int64)
    k = int(rng.integers(cumulative[-1]))
    word = int(np.searchsorted(cumulative, k, side="right"))
    bits = np.flatnonzero(np.unpackbits(row_W[word:word + 1].view(np.uint8), bitorder="little"))
    return word * 32 + int(bits[k - int(cumulative[word]) + int(counts[word])])


def llguidance_run(compiler, make, runs: int, max_tokens: int, seed: int, prefix=()):
    """(compile seconds, first-mask seconds, per-step fill seconds, token sequences)."""
    compile_times = []
    for _ in range(3):
        fresh = GrammarCompiler(compiler.vocabulary)
        start = time.perf_counter()
        grammar = make(fresh)
        compile_times.append(time.perf_counter() - start)
    row = np.zeros(compiler.vocabulary.mask_words, np.uint32)
    start = time.perf_counter()
    grammar.matcher().fill(row)
    first_mask = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    fills, sequences = [], []
    for _ in range(runs):
        matcher = grammar.matcher()
        tokens = list(prefix)
        for token in prefix:
            matcher.accept(token)
        while len(tokens) < max_tokens and not matcher.is_finished():
            start = time.perf_counter()
            matcher.fill(row)
            fills.append(time.perf_counter() - start)
            token = sample_allowed(row, rng)
            matcher.accept(token)
            tokens.append(token)
        sequences.append(tokens)
    return statistics.median(compile_times), first_mask, fills, sequences


def xgrammar_run(tokenizer, stops, source, sequences, prefix_len: int):
    """The same measurements with xgrammar replaying `sequences`, or None when it is not importable."""
    try:
        import xgrammar
    except ImportError:
        return None
    # Special tokens as their names: xgrammar's structural tag matches "<|python_tag|>" as text.
    vocab = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                  stop_token_ids=list(stops))
    compile_times = []
    for _ in range(3):
        compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        start = time.perf_counter()
        if isinstance(source, dict):
            compiled = compiler.compile_json_schema(json.dumps(source), any_whitespace=True, max_whitespace_cnt=21)
        else:
            compiled = compiler.compile_structural_tag(source)
        compile_times.append(time.perf_counter() - start)
    row = np.zeros((1, (tokenizer.vocab_size + 31) // 32), np.int32)
    start = time.perf_counter()
    xgrammar.GrammarMatcher(compiled).fill_next_token_bitmask(row)
    first_mask = time.perf_counter() - start
    fills, refused = [], 0
    for tokens in sequences:
        matcher = xgrammar.GrammarMatcher(compiled)
        for i, token in enumerate(tokens):
            if i >= prefix_len:
                start = time.perf_counter()
                matcher.fill_next_token_bitmask(row)
                fills.append(time.perf_counter() - start)
            if not matcher.accept_token(token):
                refused += 1
                break
    return statistics.median(compile_times), first_mask, fills, refused


def xgrammar_tool_tag(tokenizer):
    """xgrammar's structural tag for the same auto tool call (free text, or the call after its trigger)."""
    import xgrammar

    return xgrammar.StructuralTag.model_validate({"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<|python_tag|>"], "tags": [{
            "type": "tag", "begin": "<|python_tag|>", "content": {"type": "json_schema", "json_schema": TOOL_CALL},
            "end": "<|eom_id|>"}]}})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="random walks per grammar")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--no-append", action="store_true", help="print only, do not append to bench/RESULTS.md")
    args = p.parse_args()

    load_before = os.getloadavg()[0]
    tokenizers = {"Llama 3 (128,256)": Llama3Tokenizer(default_tokenizer_path()),
                  "bytes (512)": Llama3Tokenizer(write_byte_tokenizer(tempfile.mkdtemp() + "/tokenizer.model"))}
    rows = []
    for vocab_name, tokenizer in tokenizers.items():
        start = time.perf_counter()
        vocabulary = grammar_vocabulary(tokenizer)
        vocab_s = time.perf_counter() - start
        compiler = GrammarCompiler(vocabulary)
        cases = [(name, (lambda c, s=schema: c.json_schema(s)), schema, ()) for name, schema in SCHEMAS.items()]
        cases.append(("auto tool call (Lark), free text", lambda c: c.lark(AUTO_TOOL_LARK), "tool", ()))
        cases.append(("auto tool call (Lark), after the trigger token", lambda c: c.lark(AUTO_TOOL_LARK), "tool",
                      (tokenizer.python_tag_id,)))
        for name, make, source, prefix in cases:
            compile_s, first_s, fills, sequences = llguidance_run(compiler, make, args.runs, args.max_tokens, 0, prefix)
            done = sum(len(s) < args.max_tokens for s in sequences)
            note = f"{done}/{len(sequences)} complete" + (" (free text ends only on a stop token)" if not prefix and
                                                            source == "tool" else "")
            rows.append((vocab_name, name, f"llguidance (vocab {vocab_s:.2f} s)", compile_s, first_s, fills, note))
            try:
                xsource = xgrammar_tool_tag(tokenizer) if source == "tool" else source
                measured = xgrammar_run(tokenizer, vocabulary.stop_tokens, xsource, sequences, len(prefix))
            except ImportError:
                measured = None
            if measured is not None:
                import importlib.metadata

                x_compile, x_first, x_fills, refused = measured
                rows.append((vocab_name, name, f"xgrammar {importlib.metadata.version('xgrammar')}", x_compile,
                             x_first, x_fills, f"{refused} sequences refused"))
            print(rows[-1][:5])

    import llguidance

    commit = git_commit("llama_jax/grammar", "bench/grammar.py")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"commit {commit}, llguidance {llguidance.__version__}")
    notes = (f"{args.runs} random walks per grammar (uniform among allowed tokens, seed 0, at most "
             f"{args.max_tokens} tokens); compile: median of 3 fresh compilers; mask: one row's fill, every step; "
             f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after (a shared host).")
    table = [notes, "", "| vocabulary | grammar | engine | compile ms | first mask ms | mask mean ms | mask p99 ms "
             "| steps | note |", "|---|---|---|---|---|---|---|---|---|"]
    for vocab_name, name, engine, compile_s, first_s, fills, note in rows:
        mean, p99 = (f"{1e3 * statistics.fmean(fills):.3f}", f"{1e3 * percentile(fills, 99):.3f}") if fills else ("--", "--")
        table.append(f"| {vocab_name} | {name} | {engine} | {1e3 * compile_s:.2f} | {1e3 * first_s:.2f} "
                     f"| {mean} | {p99} | {len(fills)} | {note} |")
    publish(SECTION, header, table, append=not args.no_append)


if __name__ == "__main__":
    main()
