"""Generation throughput: prefill and decode tokens/s of llama_jax's engine at batch 1 and 16, against
the memory-bandwidth roofline of a decode step, with HF transformers' `generate` (static cache) on
the same weights in the same run.

    python -m bench.decode              # CPU: Llama-3.2-1B shapes, float32, with HF (~10 min)
                                        # GPU/TPU: Llama-3.1-8B shapes, bfloat16, without HF
    python -m bench.decode --quick      # 4 layers of dim 512 and a 32k vocabulary, ~1 min
    python -m bench.decode --dtype bfloat16 --no-hf

llama_jax: the batching engine (infer/batching.py) on its own layout (`prepare`: per-layer
buffers), the batch's prompts added at once and prefilled in one chunk (as few steps as its chunk
shapes allow: at most 8 rows a step); decode is `steps` engine steps, each a decode step of every
row and its host work (scheduling, reading the sampled tokens back). All shapes are compiled first
(`warm_up`); times are medians over repeats.

HF: `model.generate(..., cache_implementation="static")`, greedy, with min_new_tokens so no row
stops early, without torch.compile; a streamer notes when the prompt goes in and when each token
comes out, so prefill = until the first new token, decode = the `steps` tokens after it.

Roofline: a decode step must read every weight it multiplies by (an untied embedding table only
gathers B rows) and the KV cache slots its attention reads (ours: its rows' pages, in blocks of
PAGES_PER_BLOCK pages; HF: its whole static cache), so tokens/s <= batch * bandwidth / those bytes. Bandwidth is a large
copy's bytes read + written per second: numpy on CPU, a jitted elementwise pass on an accelerator.
Random weights: the speed of a step does not depend on their values. Prints one markdown table and
appends it, with machine, date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import LlamaConfig, init_params, kernels
from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.weights import DecodeParams, decode_params
from llama_jax.infer.tokens import PAGE_SIZE, paged_attention_impl
from llama_jax.infer.huge_pages import reexec_with_huge_pages
from llama_jax.quantize import param_bytes, quantize_params
from llama_jax.kernels.paged_attention_xla import PAGES_PER_BLOCK
from bench.results import append_results, git_commit, machine, median_seconds

SECTION = "## Decode throughput (bench/decode.py)"


def model_config(quick: bool, preset: str, dtype: str) -> LlamaConfig:
    if quick:
        return LlamaConfig(vocab_size=32768, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=256,
                           max_seq_len=1024, tie_embeddings=True, dtype=dtype, param_dtype=dtype, bos_id=1, eos_id=2)
    return LlamaConfig.preset(preset, dtype=dtype, param_dtype=dtype, max_seq_len=4096)


def memory_bandwidth() -> tuple[float, str]:
    """(bytes read + written per second, what was measured): a host copy on CPU, a device copy on
    an accelerator (where the weights and cache live)."""
    if jax.default_backend() == "cpu":
        return host_bandwidth(), "host copy bandwidth"
    from bench.attention import copy_bandwidth

    return copy_bandwidth(2 << 30, reps=7), f"{jax.devices()[0].device_kind} copy bandwidth"


def host_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes read + written per second by np.copyto of a large array, the fastest of reps: a
    roofline is an upper bound, and a median on this shared host once put a decode step above it."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # pages touched before timing
    return 2 * nbytes / min(median_seconds(lambda: np.copyto(dst, src), 1) for _ in range(reps))


def decode_bytes(cfg: LlamaConfig, params: DecodeParams, batch: int, kv_slots: int) -> int:
    """Bytes one decode step must read: weights it multiplies by, and the KV slots it attends over."""
    weights = param_bytes(params)
    if not cfg.tie_embeddings:
        weights -= param_bytes(params.tok_embeddings)
    cache = 2 * cfg.n_layers * batch * kv_slots * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return weights + cache


class LlamaJaxRun:
    """The batching engine on `batch` rows: `rep()` -> (prefill seconds: the steps until every row
    has its first token, decode seconds: `steps` engine steps after one untimed one)."""

    def __init__(self, cfg, params, batch, prompt_len, steps):
        context = prompt_len + steps + 3
        self.engine = BatchingEngine(cfg, params, max_batch=batch, max_seq_len=context, page_size=PAGE_SIZE,
                                     chunk_shapes=[(batch, prompt_len)], prefix_caching=False,
                                     attention_impl=paged_attention_impl(cfg))
        self.tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))
        self.greedy = RequestParams(context - prompt_len, temperature=0.0)
        self.steps = steps
        self.engine.warm_up()
        self.rep()  # untimed: the first call of each compiled program

    def rep(self) -> tuple[float, float]:
        engine = self.engine
        for request_id in list(engine.requests):
            engine.abort(request_id)
        start = time.perf_counter()
        for b, row in enumerate(self.tokens):
            engine.add(str(b), row.tolist(), self.greedy)
        while any(s.prefilling for samples in engine.requests.values() for s in samples):
            engine.step()
        prefilled = time.perf_counter()
        engine.step()  # settles the first decode step after a prefill
        decode_start = time.perf_counter()
        for _ in range(self.steps):
            engine.step()
        return prefilled - start, time.perf_counter() - decode_start

    def kv_slots(self) -> int:
        """KV slots a decode step read: the XLA paged attention reads blocks of PAGES_PER_BLOCK
        pages up to the furthest position."""
        block = PAGES_PER_BLOCK * PAGE_SIZE
        written = max(s.written for samples in self.engine.requests.values() for s in samples)
        return -(-written // block) * block


def hf_model(cfg, params):
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from llama_jax.convert.keymap import HF_KEYS, export_tensors

    hf = cfg.to_hf_config()
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    dtype = getattr(torch, cfg.dtype)
    with no_init_weights():
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    state = {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in export_tensors(HF_KEYS, cfg, params)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_embeddings:
        model.tie_weights()
    return model


class _Clock:
    """A generate streamer that only notes when each put() comes: the prompt, then each new token."""

    def __init__(self):
        self.times = []

    def put(self, _):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class HFRun:
    """One generate call of 1 + steps tokens per `rep()`, split at its first token, on `threads`
    torch threads: -> (prefill seconds, decode seconds)."""

    def __init__(self, model, cfg, batch, prompt_len, steps, threads):
        import torch

        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))
        self.input_ids = torch.from_numpy(tokens).long()
        self.model, self.batch, self.prompt_len, self.steps, self.threads = model, batch, prompt_len, steps, threads
        self.generate(2)  # warm-up

    def generate(self, n):
        import torch

        torch.set_num_threads(self.threads)
        clock = _Clock()
        with torch.inference_mode():
            out = self.model.generate(self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      cache_implementation="static", pad_token_id=0, streamer=clock)
        assert out.shape == (self.batch, self.prompt_len + n) and len(clock.times) == n + 1
        return clock.times

    def rep(self) -> tuple[float, float]:
        times = self.generate(1 + self.steps)
        return times[1] - times[0], times[-1] - times[1]


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_cpu = jax.default_backend() == "cpu"
    p.add_argument("--quick", action="store_true", help="a small model instead of the preset's shapes")
    p.add_argument("--preset", default="llama3.2-1b" if on_cpu else "llama3.1-8b",
                   help="model shapes (default: %(default)s on this backend)")
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16", choices=("float32", "bfloat16"),
                   help="weights and compute (default %(default)s here: XLA's CPU bfloat16 matmuls are slow)")
    p.add_argument("--attention-impl", default="xla" if on_cpu else "auto",
                   choices=kernels.IMPLS, help="(default %(default)s on this backend)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="decode steps timed")
    p.add_argument("--reps", type=int, default=3,
                   help="timed repeats of every system, interleaved (after one untimed warm-up run each)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers (always skipped off CPU)")
    p.add_argument("--hf-threads", type=int, nargs="+", default=None,
                   help="torch intra-op threads for HF, one row each (default: torch's, the core count). On a "
                        "loaded host 1 thread can be far faster: OpenMP workers spin waiting for descheduled peers")
    p.add_argument("--no-int8", action="store_true", help="skip llama_jax with int8 weights")
    args = p.parse_args()

    args.no_hf = args.no_hf or not on_cpu  # the comparison is on the same CPU; torch here is CPU-only
    cfg = dataclasses.replace(model_config(args.quick, args.preset, args.dtype), attention_impl=args.attention_impl)
    load_before = os.getloadavg()[0]
    bandwidth, bandwidth_what = memory_bandwidth()
    print(f"{bandwidth_what} {bandwidth / 1e9:.1f} GB/s; {cfg.num_params() / 1e9:.3f}B params, {args.dtype}")
    params = init_params(cfg, 0)  # stacked: HF's copy is exported from these
    variants = [("llama_jax", lambda: params)]
    if not args.no_int8:
        variants.append(("llama_jax int8", lambda: quantize_params(params, "int8")))

    # Every system's repeats interleave (rep 1 of each, then rep 2 of each, ..), so a change in the
    # shared host's load lands on all of them alike; times are medians over the repeats.
    runs = []  # (name, batch, run, roofline bytes per step, or a function of the run for the KV cache read)
    for name, make in variants:
        decode_cfg, tree = decode_params(cfg, make())  # the engine's layout: per-layer buffers
        for batch in args.batches:
            run = LlamaJaxRun(decode_cfg, tree, batch, args.prompt_len, args.steps)
            runs.append((f"{name} (JAX {jax.__version__})", batch, run,
                         lambda run, c=decode_cfg, tree=tree, batch=batch:
                         decode_bytes(c, tree, batch, run.kv_slots())))
    if not args.no_hf:
        import torch
        import transformers

        model = hf_model(cfg, params)
        del params, variants  # each system holds its own copy now
        gc.collect()
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        if not cfg.tie_embeddings:
            weights -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
        cache_len = args.prompt_len + 1 + args.steps  # static cache: max_length
        for threads, batch in [(t, b) for t in args.hf_threads or [torch.get_num_threads()] for b in args.batches]:
            cache = 2 * cfg.n_layers * batch * cache_len * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
            runs.append((f"HF transformers {transformers.__version__} (torch {torch.__version__}, {threads} threads)",
                         batch, HFRun(model, cfg, batch, args.prompt_len, args.steps, threads),
                         lambda run, nbytes=weights + cache: nbytes))
    times = [[] for _ in runs]
    for _ in range(args.reps):
        for (_, _, run, _), rep_times in zip(runs, times):
            rep_times.append(run.rep())
    rows = []
    for (name, batch, run, nbytes), rep_times in zip(runs, times):
        prefill_s = statistics.median(p for p, _ in rep_times)
        decode_s = statistics.median(d for _, d in rep_times)
        rows.append((name, batch, batch * args.prompt_len / prefill_s, batch * args.steps / decode_s,
                     batch * bandwidth / nbytes(run)))
        print(rows[-1])

    shape = "quick model" if args.quick else f"{args.preset} shapes"
    commit = git_commit("llama_jax/infer", "llama_jax/model.py", "llama_jax/kernels", "bench/decode.py")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"commit {commit}{', --quick' if args.quick else ''}")
    notes = (f"{shape}: {cfg.num_params() / 1e9:.3f}B params (dim {cfg.dim}, {cfg.n_layers} layers, vocab "
             f"{cfg.vocab_size}), random weights, {args.dtype} weights and compute, attention "
             f"{args.attention_impl}; prompt {args.prompt_len} "
             f"tokens, {args.steps} decode steps timed, greedy; medians of {args.reps} repeats, the systems' "
             f"interleaved; {bandwidth_what} {bandwidth / 1e9:.1f} GB/s; "
             f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after (a shared host). "
             f"Roofline = batch x bandwidth / (weight bytes + KV-cache bytes a decode step reads).")
    table = ["| engine | batch | prefill tok/s | decode tok/s | decode roofline tok/s | % of roofline |",
             "|---|---|---|---|---|---|"]
    for name, batch, prefill, decode, roof in rows:
        table.append(f"| {name} | {batch} | {fmt(prefill)} | {fmt(decode)} | {fmt(roof)} "
                     f"| {100 * decode / roof:.0f}% |")
    text = "\n".join([header, "", notes, "", *table])
    print("\n" + text)
    append_results(SECTION, text)


if __name__ == "__main__":
    reexec_with_huge_pages("bench.decode")  # as `python -m llama_jax.infer` runs; HF in this process gets it too
    main()
