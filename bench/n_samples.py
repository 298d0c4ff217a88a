"""n samples of one long prompt: one request with n = 8 (the prompt prefilled once, its pages shared
by the samples) against 8 separate requests of the same prompt, with the prefix cache off and on.

    python -m bench.n_samples            # prompt 1024 tokens, 32 new tokens per sample, 8 samples
    python -m bench.n_samples --quick    # prompt 256 tokens, 16 new tokens: ~1 min on a CPU

The model is bench/decode.py's --quick shapes (4 layers of dim 512, a 32k vocabulary), random
weights. One engine setting for every system: 8 rows, pages of 16, prompt chunks of 4 rows x 256
tokens, every program compiled first (`warm_up`, then one untimed run of each system). A run adds
its requests at once and steps until all are done, sampling at temperature 1 without stop tokens
(every sample gets all its tokens). Each run draws a new random prompt, so nothing a run leaves in
the prefix cache serves another; the 8 separate requests, added together, are admitted together,
before any of them has written a page the others could reuse (so the cache on does not help them:
their prefills overlap). The systems' runs alternate; times are medians. Prints one markdown table
and appends it, with machine, date and commit, to bench/RESULTS.md.
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
from bench.results import git_commit, machine, publish
from llama_jax import init_params
from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.tokens import PAGE_SIZE

SECTION = "## n samples of one prompt (bench/n_samples.py)"
CHUNK = (4, 256)  # a step's prompt chunk: rows x tokens


class System:
    """One way to get n samples: `run(prompt)` -> (seconds, most pages held at once)."""

    def __init__(self, name, cfg, params, *, n: int, separate: bool, prefix_caching: bool, new_tokens: int,
                 context: int):
        self.name, self.n, self.separate = name, n, separate
        self.engine = BatchingEngine(cfg, params, max_batch=n, max_seq_len=context, page_size=PAGE_SIZE,
                                     decode_batches=[n], chunk_shapes=[CHUNK], prefix_caching=prefix_caching)
        self.params = RequestParams(new_tokens, temperature=1.0, seed=0)
        self.engine.warm_up()

    def run(self, prompt: list[int]) -> tuple[float, int]:
        engine, peak = self.engine, 0
        start = time.perf_counter()
        if self.separate:
            for i in range(self.n):
                engine.add(str(i), prompt, self.params, stream=i)
        else:
            engine.add("0", prompt, dataclasses.replace(self.params, n=self.n))
        while engine.has_work():
            engine.step()
            peak = max(peak, engine.scheduler.allocator.used)
        return time.perf_counter() - start, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 256-token prompt and 16 new tokens")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 1024; 256 with --quick)")
    p.add_argument("--new-tokens", type=int, help="new tokens per sample (default 32; 16 with --quick)")
    p.add_argument("--n", type=int, default=8, help="samples (default %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed runs of every system, alternating")
    p.add_argument("--dtype", default="float32" if jax.default_backend() == "cpu" else "bfloat16",
                   choices=("float32", "bfloat16"))
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args()
    prompt_len = args.prompt_len or (256 if args.quick else 1024)
    new_tokens = args.new_tokens or (16 if args.quick else 32)
    cfg = dataclasses.replace(model_config(True, "", args.dtype), max_seq_len=max(1024, prompt_len + new_tokens))
    context = prompt_len + new_tokens
    params = init_params(cfg, 0)
    load_before = os.getloadavg()[0]
    common = dict(n=args.n, new_tokens=new_tokens, context=context)
    systems = [System(f"1 request, n = {args.n}", cfg, params, separate=False, prefix_caching=True, **common),
               System(f"{args.n} requests, prefix cache off", cfg, params, separate=True, prefix_caching=False,
                      **common),
               System(f"{args.n} requests, prefix cache on", cfg, params, separate=True, prefix_caching=True,
                      **common)]
    rng = np.random.default_rng(0)
    draw = lambda: rng.integers(3, cfg.vocab_size, prompt_len).tolist()  # noqa: E731
    for system in systems:
        system.run(draw())  # untimed: the first call of each program
    times = {s.name: [] for s in systems}
    peaks = {}
    for _ in range(args.reps):
        for system in systems:
            seconds, peaks[system.name] = system.run(draw())
            times[system.name].append(seconds)
    base = statistics.median(times[systems[0].name])
    rows = ["| system | seconds (median) | sampled tokens/s | pages held at most | time / n = 8's |",
            "|---|---|---|---|---|"]
    for system in systems:
        seconds = statistics.median(times[system.name])
        rows.append(f"| {system.name} | {seconds:.3f} | {args.n * new_tokens / seconds:.0f} | {peaks[system.name]} "
                    f"| {seconds / base:.2f}x |")
    commit = git_commit("llama_jax/infer", "llama_jax/model.py", "llama_jax/kernels", "bench/n_samples.py")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"{jax.devices()[0].device_kind}, commit {commit}{', --quick' if args.quick else ''}\n\n"
              f"bench/decode.py's quick model ({cfg.num_params() / 1e6:.0f}M params, {args.dtype}), random weights; "
              f"{args.n} samples of a {prompt_len}-token prompt, {new_tokens} new tokens each, temperature 1; engine "
              f"of {args.n} rows, pages of {PAGE_SIZE}, chunks of {CHUNK[0]} x {CHUNK[1]} tokens; medians of "
              f"{args.reps} alternating runs; load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after.")
    publish(SECTION, header, rows, append=not args.no_append)


if __name__ == "__main__":
    main()
