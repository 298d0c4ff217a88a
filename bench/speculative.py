"""Speculative decoding against plain decode, at batch 1 (and a batch of 8), on this host:
prompt lookup (`ngram`) on text the model repeats and on text it does not, and a draft model.

    python -m bench.speculative            # 128 new tokens per request
    python -m bench.speculative --quick    # 48 new tokens: a few minutes on a 2-core CPU

No trained weights are at hand here (no network), so the text is made by construction:
- "repeats": random weights whose unembedding maps each token's normed embedding to a fixed next
  token, the vocabulary in cycles of 2 to 6 (`repeating_params`): the greedy text goes round a cycle,
  as an edit or an extraction copies its prompt, and prompt lookup guesses it. The layers keep their
  random weights, so every logit still depends on the context.
- "free-form": the random weights as drawn, sampled at temperature 1 (greedy, random weights loop):
  the text does not repeat, prompt lookup finds little to propose and that fails, and the cost of
  trying is what is measured.
- "draft": a target of 8 layers of dim 1024 and a draft of 2 layers of dim 256 built on the same
  next-token table (their own random layers otherwise): acceptance comes from what they share, as a
  Llama 3.2 1B drafting for a 3.1 8B shares its training.
Every system decodes the same prompts with every program compiled first (warm_up, one untimed run);
runs alternate between systems; tokens/s are medians over --reps. Prints one markdown table and
appends it, with machine, date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.results import git_commit, machine, publish
from llama_jax import LlamaConfig, init_params
from llama_jax.infer.engine import BatchingEngine, prefill_shapes
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.speculation import SpeculativeConfig

SECTION = "## Speculative decoding (bench/speculative.py)"
PAGE_SIZE = 16


def next_tokens(vocab_size: int, seed: int = 0) -> np.ndarray:
    """nxt[t]: the token a repeating model puts after t, the vocabulary in cycles of 2 to 6 tokens."""
    rng = np.random.default_rng(seed)
    order, nxt, i = rng.permutation(vocab_size), np.zeros(vocab_size, int), 0
    while i < vocab_size:
        cycle = order[i:i + 2 + i % 5]
        nxt[cycle] = np.roll(cycle, -1)
        i += len(cycle)
    return nxt


def repeating_params(cfg: LlamaConfig, params, *, seed: int = 0, strength: float = 0.1, embedding_scale: float = 10.0):
    """`params` (untied embeddings) with the unembedding that maps each token's normed embedding to
    its next_tokens(seed) successor with a logit margin of about strength * dim, and the embeddings
    scaled up so that the residual stream stays mostly the token's own: every layer normalizes its
    input, so what the random layers add keeps its size (the logits still move with the context)."""
    if cfg.tie_embeddings:
        raise ValueError("repeating_params needs an output matrix of its own (tie_embeddings=False)")
    embedding = np.asarray(params["tok_embeddings"], np.float32)
    normed = embedding / np.sqrt((embedding ** 2).mean(-1, keepdims=True))
    output = np.zeros((cfg.dim, cfg.vocab_size), np.float32)
    output[:, next_tokens(cfg.vocab_size, seed)] = strength * normed.T
    dtype = params["output"].dtype
    return {**params, "output": jnp.asarray(output, dtype),
            "tok_embeddings": jnp.asarray(embedding * embedding_scale, params["tok_embeddings"].dtype)}


def model(dim: int, layers: int, dtype: str, context: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=32768, dim=dim, n_layers=layers, n_heads=max(2, dim // 64),
                       n_kv_heads=max(1, dim // 256), multiple_of=256, max_seq_len=context, dtype=dtype,
                       param_dtype=dtype, bos_id=1, eos_id=2)


class System:
    """An engine of `batch` rows and what it decodes: run(prompts) -> (seconds, proposed, accepted)."""

    def __init__(self, name, cfg, params, *, batch: int, new_tokens: int, context: int, speculative=None,
                 temperature: float = 0.0):
        self.name, self.new_tokens, self.temperature = name, new_tokens, temperature
        self.engine = BatchingEngine(cfg, params, max_batch=batch, max_seq_len=context, page_size=PAGE_SIZE,
                                     decode_batches=[batch], chunk_shapes=prefill_shapes(64, max_rows=batch),
                                     speculative=speculative)
        self.engine.warm_up()

    def run(self, prompts) -> tuple[float, int, int]:
        engine = self.engine
        before = dict(engine.counters)
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add(str(i), prompt, RequestParams(self.new_tokens, temperature=self.temperature, seed=i))
        self.tokens = {}  # request id -> its tokens, of the last run
        while engine.has_work():
            for out in engine.step():
                self.tokens.setdefault(out.request_id, []).append(out.token_id)
        seconds = time.perf_counter() - start
        return (seconds, engine.counters["proposed_tokens"] - before["proposed_tokens"],
                engine.counters["accepted_tokens"] - before["accepted_tokens"])


def measure(systems, prompts_of, reps: int) -> dict:
    """{name: (median tokens/s, proposed, accepted)} over alternating runs (one untimed run each first)."""
    for system in systems:
        system.run(prompts_of())
    runs = {s.name: [] for s in systems}
    for _ in range(reps):
        prompts = prompts_of()
        for system in systems:
            runs[system.name].append(system.run(prompts))
    out = {}
    for system in systems:
        seconds = statistics.median(r[0] for r in runs[system.name])
        tokens = len(prompts) * system.new_tokens
        out[system.name] = (tokens / seconds, sum(r[1] for r in runs[system.name]), sum(r[2] for r in runs[system.name]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="48 new tokens per request")
    p.add_argument("--new-tokens", type=int, help="new tokens per request (default 128; 48 with --quick)")
    p.add_argument("--k", type=int, default=4, help="speculative tokens per step at most (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed runs of every system, alternating")
    p.add_argument("--dtype", default="float32" if jax.default_backend() == "cpu" else "bfloat16",
                   choices=("float32", "bfloat16"))
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args()
    new_tokens = args.new_tokens or (48 if args.quick else 128)
    prompt_len, context = 64, 64 + new_tokens
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    ngram = SpeculativeConfig("ngram", num_tokens=args.k)
    rows = ["| text | batch | system | tokens/s (median) | vs plain | proposed | accepted |", "|---|---|---|---|---|---|---|"]

    def table(text, batch, results):
        base = next(iter(results.values()))[0]
        for name, (rate, proposed, accepted) in results.items():
            share = f"{accepted} ({100 * accepted / proposed:.0f}%)" if proposed else "-"
            rows.append(f"| {text} | {batch} | {name} | {rate:.1f} | {rate / base:.2f}x | {proposed or '-'} | {share} |")

    cfg = model(512, 8, args.dtype, context)
    random = init_params(cfg, 0)
    repeating = repeating_params(cfg, random)
    for text, params, temperature in (("repeats", repeating, 0.0), ("free-form", random, 1.0)):
        for batch in (1, 8):
            common = dict(batch=batch, new_tokens=new_tokens, context=context, temperature=temperature)
            systems = [System("plain", cfg, params, **common),
                       System(f"ngram, K={args.k}", cfg, params, **common, speculative=ngram)]
            draw = lambda batch=batch: [rng.integers(3, cfg.vocab_size, prompt_len).tolist()  # noqa: E731
                                        for _ in range(batch)]
            table(text, batch, measure(systems, draw, args.reps))
    target_cfg, draft_cfg = model(1024, 8, args.dtype, context), model(256, 2, args.dtype, context)
    target = repeating_params(target_cfg, init_params(target_cfg, 1))
    draft = repeating_params(draft_cfg, init_params(draft_cfg, 2))
    common = dict(batch=1, new_tokens=new_tokens, context=context)
    systems = [System("plain", target_cfg, target, **common),
               System(f"draft, K={args.k}", target_cfg, target, **common,
                      speculative=SpeculativeConfig("draft", num_tokens=args.k, draft=(draft_cfg, draft))),
               System(f"ngram, K={args.k}", target_cfg, target, **common, speculative=ngram)]
    table("repeats (draft)", 1, measure(systems, lambda: [rng.integers(3, 32768, prompt_len).tolist()], args.reps))
    commit = git_commit("llama_jax/infer", "llama_jax/model.py", "bench/speculative.py")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"{jax.devices()[0].device_kind}, commit {commit}{', --quick' if args.quick else ''}\n\n"
              f"Greedy (free-form: temperature 1), {prompt_len}-token random prompts, {new_tokens} new tokens each; a {cfg.num_params() / 1e6:.0f}M "
              f"model (8 layers of dim 512, 32k vocabulary, {args.dtype}); the draft rows: a "
              f"{target_cfg.num_params() / 1e6:.0f}M target (8 x 1024) and a {draft_cfg.num_params() / 1e6:.0f}M draft "
              f"(2 x 256) sharing a next-token table (the module says how the text is made); pages of {PAGE_SIZE}; "
              f"medians of {args.reps} alternating runs; proposed / accepted summed over them; load average "
              f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after.")
    publish(SECTION, header, rows, append=not args.no_append)


if __name__ == "__main__":
    main()
