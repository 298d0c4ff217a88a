"""Constrained decoding in the engine: decode tokens/s with a JSON-schema grammar on every row, on
half the rows and on none, at batch 1 and 16, on the real Llama 3 vocabulary (128,256 tokens); the
host time of the token masks against the step's; where a constrained step's extra time goes; and
the compile time of three schemas.

    python -m bench.structured --quick   # 4 layers of dim 512, Llama 3's vocabulary: ~6 min on 2 busy cores
    python -m bench.structured           # Llama-3.2-1B shapes (CPU: float32): 14 min on 2 busy cores,
                                         # where the host's noise was larger than the grammar's cost

Every system decodes the same prompts at temperature 1 (seeded) with the same max_tokens; a
constrained row carries `GrammarCompiler(grammar_vocabulary(tokenizer)).json_schema(RECORDS)`, an
object of a bounded title, an enum and an array of 200 records (integers, a bounded string, an
enum, an array of bounded strings), so no row completes its JSON within the timed steps (checked:
every row still runs after them). One engine per batch size, every program compiled first
(`warm_up(grammars=True)`), one untimed run of each system; then the systems' runs alternate
(plain, constrained, ..) and times are medians. A run prefills its rows, takes one untimed decode
step, and times `steps` decode steps (the engine's `step`: scheduling, the device work, reading the
tokens back, the matchers' accept). Mask ms: the host time of `engine.token_masks` (the llguidance
fill of the step's rows, wrapped with a clock), which a constrained step runs after dispatching the
model's forward and before sampling.

Where the time goes: one constrained step's inputs re-run as a ladder, each variant blocked once at
its end as the engine's step is, round-robin, medians: the plain step (forward and sampling in one
program), the forward and sampling as two programs without a mask, with a ready mask (its transfer
and `apply_token_mask`), and with the masks filled on the host between the two (the engine's
constrained step); then the pieces alone. The masks are filled by fresh matchers replaying the
rows' tokens (llguidance keeps a state's mask: a second fill of one state costs nothing). On CPU
the "device" is this host's cores: the masks' threads and XLA's share them.

Random weights: the speed of a step does not depend on their values (the grammar's walk does a
little: a random model's tokens are about uniform among those allowed). Prints the tables and
appends them, with machine, date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import time

import jax
import numpy as np

from bench.decode import model_config
from bench.grammar import SCHEMAS
from bench.results import git_commit, machine, publish
from llama_jax import LlamaConfig, init_params
from llama_jax.grammar import GrammarCompiler, grammar_vocabulary
from llama_jax.infer import engine as engine_module
from llama_jax.infer.engine import BatchingEngine, token_masks
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.sampling import apply_token_mask
from llama_jax.infer.step import model_logits_jit, model_step_jit, sample_step_jit
from llama_jax.infer.tokens import PAGE_SIZE
from llama_jax.infer.weights import decode_params
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path

SECTION = "## Constrained decoding (bench/structured.py)"

RECORD = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 99999},
    "name": {"type": "string", "minLength": 1, "maxLength": 32},
    "kind": {"enum": ["person", "place", "organization", "event"]},
    "aliases": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    "score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["id", "name", "kind", "aliases", "score"], "additionalProperties": False}
# minItems: a random model closes an array at about every other chance; the answer must outlast the timed steps.
RECORDS = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 64},
    "status": {"enum": ["draft", "published", "archived"]},
    "records": {"type": "array", "items": RECORD, "minItems": 200, "maxItems": 200}},
    "required": ["title", "status", "records"], "additionalProperties": False}
COMPILED_SCHEMAS = {"records (the one decoded)": RECORDS, "nested (bench/grammar.py)": SCHEMAS["nested"],
                    "pydantic (bench/grammar.py)": SCHEMAS["pydantic"]}


class MaskClock:
    """Wraps engine.token_masks: the host seconds of each call."""

    def __init__(self):
        self.seconds: list[float] = []
        engine_module.token_masks = self

    def __call__(self, constrained, rows, vocab_size):
        start = time.perf_counter()
        allowed = token_masks(constrained, rows, vocab_size)
        self.seconds.append(time.perf_counter() - start)
        return allowed


class Replay:
    """Fresh matchers walking the rows' decoded tokens again, a step per call: llguidance keeps the
    mask of a matcher's current state, so filling one state twice times nothing."""

    def __init__(self, grammar, tokens: list[list[int]], vocab_size: int):
        self.matchers = [grammar.matcher() for _ in tokens]
        self.tokens, self.vocab_size, self.t = tokens, vocab_size, 0

    def __len__(self):
        return min(map(len, self.tokens))

    def __call__(self) -> tuple[float, float, np.ndarray]:
        """(seconds of the step's token_masks, seconds of accepting its tokens, the masks)."""
        start = time.perf_counter()
        allowed = token_masks(list(zip(self.matchers, range(len(self.matchers)))), len(self.matchers),
                              self.vocab_size)
        filled = time.perf_counter()
        for matcher, tokens in zip(self.matchers, self.tokens):
            matcher.accept(tokens[self.t])
        self.t += 1
        return filled - start, time.perf_counter() - filled, allowed


class System:
    """`constrained` of an engine's `batch` rows under the grammar: `rep()` -> (decode seconds of
    `steps` steps, mask seconds in them)."""

    def __init__(self, name, engine, batch, constrained, grammar, prompts, steps, clock):
        self.name, self.engine, self.batch, self.steps, self.clock = name, engine, batch, steps, clock
        self.constrained, self.prompts = constrained, prompts
        max_tokens = steps + 3  # the prefill's token, one untimed step, the timed ones, one more: none ends
        self.params = [RequestParams(max_tokens, temperature=1.0, seed=b, grammar=grammar if b < constrained else None)
                       for b in range(batch)]

    def rep(self) -> tuple[float, float]:
        engine = self.engine
        for request_id in list(engine.requests):
            engine.abort(request_id)
        for b, (prompt, params) in enumerate(zip(self.prompts, self.params)):
            engine.add(str(b), prompt, params)
        while any(s.prefilling for samples in engine.requests.values() for s in samples):
            engine.step()
        engine.step()  # settles the first decode step after a prefill
        self.clock.seconds.clear()
        start = time.perf_counter()
        for _ in range(self.steps):
            engine.step()
        seconds = time.perf_counter() - start
        running = sum(len(samples) for samples in engine.requests.values())
        if running != self.batch:
            raise RuntimeError(f"{self.name}: {self.batch - running} rows ended within the timed steps")
        return seconds, sum(self.clock.seconds)


def step_parts(system: System, reps: int) -> dict[str, float]:
    """Seconds of a step of `system` (every row constrained) built up piece by piece on the inputs of
    its last step, each variant blocked once at its end as the engine's step is (median of `reps`
    round-robin rounds, after an untimed one). The forward's re-runs write the same keys and values
    at the same positions; the masks are filled by fresh matchers replaying the rows' tokens."""
    engine, grammar, vocab_size = system.engine, system.params[0].grammar, system.engine.cfg.vocab_size
    system.rep()
    tokens = [s.tokens[s.prompt_len:] for samples in engine.requests.values() for s in samples]
    inputs = None

    def capture(params, pages, step_inputs, **kw):
        nonlocal inputs
        inputs = step_inputs
        return model_logits_jit(params, pages, step_inputs, **kw)

    engine_module.model_logits_jit = capture
    try:
        engine.step()
    finally:
        engine_module.model_logits_jit = model_logits_jit
    kw = dict(cfg=engine.cfg, mesh=engine.mesh)
    walked = Replay(grammar, tokens, vocab_size)
    walked = [walked() for _ in range(len(walked))]
    allowed = token_masks([(grammar.matcher(), row) for row in range(len(tokens))], len(tokens), vocab_size)
    with_mask = inputs._replace(allowed_LW=allowed)
    replay = Replay(grammar, tokens, vocab_size)

    def forward():
        engine.pages, logits = model_logits_jit(engine.params, engine.pages, inputs, **kw)
        return logits

    def one_program():
        engine.pages, out = model_step_jit(engine.params, engine.pages, inputs, **kw)
        return out.tokens_L

    def engine_step():  # the engine's constrained step: the masks filled while the forward runs
        logits = forward()
        return sample_step_jit(logits, inputs._replace(allowed_LW=replay()[2])).tokens_L

    logits = jax.block_until_ready(forward())
    apply_mask = jax.jit(apply_token_mask)
    variants = {
        "plain step (one program)": one_program,
        "two programs, no mask": lambda: sample_step_jit(forward(), inputs).tokens_L,
        "two programs, a mask": lambda: sample_step_jit(forward(), with_mask).tokens_L,
        "two programs, the masks filled meanwhile": engine_step,
        "forward": forward,
        "sample, no mask": lambda: sample_step_jit(logits, inputs).tokens_L,
        "sample, a mask": lambda: sample_step_jit(logits, with_mask).tokens_L,
        "apply_token_mask": lambda: apply_mask(logits, allowed),
        "allowed_LW transfer": lambda: jax.device_put(allowed),
    }
    times = {name: [] for name in variants}
    for round in range(min(reps, len(replay) - 1) + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            if round:  # the first: programs the engine never ran (sampling without a mask) compile
                times[name].append(time.perf_counter() - start)
    parts = {name: statistics.median(t) for name, t in times.items()}
    parts["masks (host)"] = statistics.fmean(m for m, _, _ in walked)
    parts["accepts (host)"] = statistics.fmean(a for _, a, _ in walked)
    return parts


def compile_times(vocabulary, reps: int) -> list[tuple[str, float, float, float]]:
    """(schema, cold seconds: a fresh compiler's json_schema, cached seconds: the same call again,
    first mask seconds: llguidance builds its lexer lazily), medians of reps."""
    rows = []
    row_W = np.zeros(vocabulary.mask_words, np.uint32)
    for name, schema in COMPILED_SCHEMAS.items():
        cold, cached, first = [], [], []
        for _ in range(reps):
            compiler = GrammarCompiler(vocabulary)
            start = time.perf_counter()
            grammar = compiler.json_schema(schema)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            compiler.json_schema(schema)
            cached.append(time.perf_counter() - start)
            start = time.perf_counter()
            grammar.matcher().fill(row_W)
            first.append(time.perf_counter() - start)
        rows.append((name, statistics.median(cold), statistics.median(cached), statistics.median(first)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_cpu = jax.default_backend() == "cpu"
    p.add_argument("--quick", action="store_true",
                   help="bench/decode.py's quick model (4 layers of dim 512) with Llama 3's vocabulary")
    p.add_argument("--preset", default="llama3.2-1b", help="model shapes without --quick (default %(default)s)")
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, help="decode steps timed (default 64; 16 without --quick)")
    p.add_argument("--reps", type=int, default=5, help="timed runs of every system, alternating")
    p.add_argument("--no-append", action="store_true", help="print the tables only")
    args = p.parse_args()
    steps = args.steps or (64 if args.quick else 16)

    load_before = os.getloadavg()[0]
    tokenizer = Llama3Tokenizer(default_tokenizer_path())
    if args.quick:
        cfg = dataclasses.replace(model_config(True, "", args.dtype), vocab_size=tokenizer.vocab_size,
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    else:
        cfg = LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, max_seq_len=4096)
    vocabulary = grammar_vocabulary(tokenizer, vocab_size=cfg.vocab_size)
    compiled = compile_times(vocabulary, reps=5)
    grammar = GrammarCompiler(vocabulary).json_schema(RECORDS)
    print(f"{cfg.num_params() / 1e6:.0f}M params, vocabulary {cfg.vocab_size}, {args.dtype}; compile: {compiled}")

    cfg, params = decode_params(cfg, init_params(cfg, 0), donate=True)  # one copy, the engines' layout
    clock = MaskClock()
    rng = np.random.default_rng(0)
    systems, engines = [], {}
    for batch in args.batches:
        context = args.prompt_len + steps + 3
        engine = BatchingEngine(cfg, params, max_batch=batch, max_seq_len=context, page_size=PAGE_SIZE,
                                decode_batches=[batch], chunk_shapes=[(batch, args.prompt_len)],
                                prefix_caching=False)
        engine.warm_up(grammars=True)
        engines[batch] = engine
        prompts = rng.integers(3, 128000, (batch, args.prompt_len)).tolist()  # no special tokens
        for name, constrained in [("plain", 0), ("JSON schema, every row", batch),
                                  ("JSON schema, half the rows", batch // 2)]:
            if name == "plain" or constrained:
                systems.append(System(name, engine, batch, constrained, grammar, prompts, steps, clock))
    for system in systems:
        system.rep()  # untimed: the first call of each program, and the grammar's lexer states
    times = {id(s): [] for s in systems}
    for _ in range(args.reps):
        for system in systems:
            times[id(system)].append(system.rep())
    parts = {}
    for batch, engine in engines.items():
        every_row = next(s for s in systems if s.batch == batch and s.constrained == batch)
        parts[batch] = step_parts(every_row, reps=max(args.reps, 15))
        print(batch, parts[batch])

    rows = ["| batch | rows with a grammar | decode tokens/s | / plain | step ms | mask ms per step | mask / step |",
            "|---|---|---|---|---|---|---|"]
    plain_rate = {}
    for system in systems:
        seconds = statistics.median(t for t, _ in times[id(system)])
        mask = statistics.median(m for _, m in times[id(system)])
        rate = system.batch * steps / seconds
        plain_rate.setdefault(system.batch, rate)
        rows.append(f"| {system.batch} | {system.constrained} | {rate:,.0f} | {rate / plain_rate[system.batch]:.3f} "
                    f"| {1e3 * seconds / steps:.2f} | {1e3 * mask / steps:.3f} | {100 * mask / seconds:.1f}% |")
    names = list(next(iter(parts.values())))
    rows += ["", "Where a constrained step's time goes (ms, every row constrained; the step's inputs re-run, "
             "round-robin medians; the masks and accepts: means over the rows' replayed tokens):", "",
             "| part | " + " | ".join(f"batch {batch}" for batch in parts) + " |", "|---|" + "---|" * len(parts)]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(f"{1e3 * measured[name]:.2f}" for measured in parts.values()) + " |")
    rows += ["", "Grammar compile (ms, medians of 5): cold = a fresh GrammarCompiler's json_schema; cached = the "
             "same call again (its LRU cache); first mask = the first fill (llguidance builds its lexer lazily):", "",
             "| schema | cold | cached | first mask |", "|---|---|---|---|"]
    rows += [f"| {name} | {1e3 * cold:.2f} | {1e3 * cached:.4f} | {1e3 * first:.2f} |"
             for name, cold, cached, first in compiled]

    import llguidance

    shape = "bench/decode.py's quick model with Llama 3's vocabulary" if args.quick else f"{args.preset} shapes"
    commit = git_commit("llama_jax/infer", "llama_jax/grammar", "llama_jax/model.py", "bench/structured.py")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"{jax.devices()[0].device_kind}, commit {commit}, llguidance {llguidance.__version__}"
              f"{', --quick' if args.quick else ''}\n\n"
              f"{shape} ({cfg.num_params() / 1e6:.0f}M params, vocabulary {cfg.vocab_size:,}, {args.dtype}), random "
              f"weights; {args.prompt_len}-token prompts, {steps} decode steps timed, temperature 1, seeded; the "
              f"RECORDS schema (no row completes); medians of {args.reps} alternating runs; load average "
              f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after. Mask ms: the host time of "
              f"engine.token_masks (llguidance's fill of the step's constrained rows), run while the forward computes.")
    publish(SECTION, header, rows, append=not args.no_append)


if __name__ == "__main__":
    main()
