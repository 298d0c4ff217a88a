"""One device check: every attention path's correctness on the device, then its speed, in one run.

    python -m bench.device_check                  # GPU (H200): ~6 minutes, compiles included
    python -m bench.device_check --quick          # any backend, tiny shapes (CPU: kernels interpreted)
    python -m bench.device_check --only correctness decode --skip-train

Sections (issue #14), each check in its own try/except so one lowering error never hides the rest,
each section with a time budget past which its remaining checks are skipped:
- env: jax / jaxlib versions, device kind, backend.
- correctness: our flash kernel (forward and dq/dk/dv, GQA, packed segments, head_dim 64 / 128,
  float32 / bfloat16, a length that is no multiple of the block), our paged kernel on the device's
  lowering (ragged rows, a shuffled page pool), the flash kernel as one device of cp4 runs it (its
  load-balanced query chunks against all keys, masked by positions), cuDNN's fused attention, the model's
  `kernels.attention` dispatch for every impl (auto: what the backend runs by default; cuDNN where it
  runs, on unpacked bf16 rows) and `kernels.paged_attention`'s for pallas and xla,
  all against `kernels/reference.py` in float32 at HIGHEST matmul precision on the same device.
  Error = max |got - want| / max |want| (and the mean over max |want|), so one tolerance per dtype.
- timing: causal attention fwd and fwd+bwd TFLOP/s at 4k / 8k / 16k (constant tokens), ours vs
  cuDNN vs XLA, FLOPs counted as bench/attention.py does.
- decode: K/V page bytes read per second of our paged kernel, the XLA paged path and JAX's own
  paged kernel, 32k bf16 positions per row in shuffled pages of 16, as a fraction of a device
  copy's bandwidth measured in the same run (issue #13's target: >= 80%); and greedy decode at batch
  1 with prompt lookup against plain on bench/speculative.py's repeating model (16 x 2048, bf16): the
  same tokens (FAIL otherwise), the speedup and the share of guesses kept.
- train: Llama-3.2-1B train step (bf16 compute, float32 AdamW state, full remat) for pallas, auto, xla:
  tokens/s and MFU against the data-sheet peak and against a measured bf16 matmul rate.

Prints one markdown table and appends it, with machine, date and commit, to bench/RESULTS.md; with
$OUT set, also writes $OUT/device_check.log and $OUT/device_check.json (every result, full errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench.attention import attention_impls, causal_attention_flops, copy_bandwidth, paged_decode_impls, \
    paged_decode_inputs, timeit
from bench.results import RESULTS, append_results, git_commit, machine, median_seconds
from llama_jax.kernels import _is_cuda, attention, flash_attention, paged_attention, paged_attention_pallas, \
    resolve_impl
from llama_jax.kernels.common import default_lowering
from llama_jax.kernels.reference import attention_reference, paged_attention_reference
from llama_jax.sharding.context import balanced_order

SECTION = "## Device check (bench/device_check.py)"
SECTIONS = ("env", "correctness", "timing", "decode", "train")
# max |err| / max |want| past which a check fails: float32 through GPU matmuls, bfloat16 inputs.
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 3e-2}
ERROR_LINES = 15
XLA_SCORES_LIMIT = 8 * 2**30  # bytes of [B, H, T, T] f32 scores past which XLA attention is not timed


@dataclasses.dataclass
class Result:
    section: str
    check: str
    shape: str
    status: str  # PASS / FAIL / ERROR / SKIP / INFO
    value: str = ""  # the measurement or the error's first line
    compare: str = ""  # vs the reference or cuDNN
    seconds: float = 0.0
    error: str = ""  # full traceback, for the JSON


class Log:
    """Progress lines to stdout (flushed: the device run is watched live) and kept for $OUT."""

    def __init__(self):
        self.lines: list[str] = []
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f}s] {message}"
        self.lines.append(line)
        print(line, flush=True)


def short_error(e: BaseException) -> str:
    """The informative part of a long Triton / Mosaic / XLA message: its first lines and its last."""
    lines = [line[:300] for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
    if len(lines) > ERROR_LINES + 3:
        lines = lines[:ERROR_LINES] + [f"... ({len(lines) - ERROR_LINES - 3} lines) ..."] + lines[-3:]
    return "\n".join(lines)


class Phase:
    """Runs one section's checks, each isolated and timed, until the section's budget is spent."""

    def __init__(self, name: str, budget_s: float, log: Log, results: list[Result]):
        self.name, self.budget_s, self.log, self.results = name, budget_s, log, results
        self.start = time.perf_counter()

    def run(self, check: str, shape: str, fn) -> Result | None:
        """fn() -> (status, value, compare); any exception becomes an ERROR row."""
        if time.perf_counter() - self.start > self.budget_s:
            result = Result(self.name, check, shape, "SKIP", f"{self.name} budget {self.budget_s:.0f}s spent")
        else:
            self.log(f"{self.name}: {check} [{shape}] ...")
            start = time.perf_counter()
            try:
                status, value, compare = fn()
                result = Result(self.name, check, shape, status, value, compare)
            except Exception as e:  # noqa: BLE001 - one failing path must not stop the check
                message = short_error(e)
                self.log("  " + message.replace("\n", "\n  "))
                result = Result(self.name, check, shape, "ERROR", message.splitlines()[0][:120],
                                error=traceback.format_exc()[-20000:])
            result.seconds = time.perf_counter() - start
        self.log(f"  {result.status} {result.value} {result.compare} ({result.seconds:.1f}s)")
        self.results.append(result)
        return result


# Errors against the reference ------------------------------------------------------------------

def relative_errors(got, want) -> tuple[float, float]:
    """(max, mean) of |got - want| over max |want|, in float32."""
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(want)), 1e-30)
    err = jnp.abs(got - want)
    return float(jnp.max(err) / scale), float(jnp.mean(err) / scale)


def compare(named_pairs, dtype):
    """PASS if every (name, got, want) is within dtype's tolerance; the worst is reported."""
    tolerance = TOLERANCE[dtype]
    if any(jnp.isnan(jnp.asarray(got, jnp.float32)).any() for _, got, _ in named_pairs):
        return "FAIL", "NaN in output", ""
    errors = {name: relative_errors(got, want) for name, got, want in named_pairs}
    worst = max(errors, key=lambda n: errors[n][0])
    status = "PASS" if errors[worst][0] <= tolerance else "FAIL"
    return status, f"max {errors[worst][0]:.1e} ({worst}), mean {errors[worst][1]:.1e}", f"tol {tolerance:.0e}"


def in_float32(fn):
    """fn on float32 copies of its array arguments, every matmul at full precision."""
    def reference(*args):
        with jax.default_matmul_precision("highest"):
            return fn(*(a.astype(jnp.float32) if a is not None and a.dtype in (jnp.bfloat16, jnp.float32) else a
                        for a in args))
    return jax.jit(reference)


def with_grads(fn):
    """jit of (q, k, v, extra, do) -> (out, dq, dk, dv)."""
    def run(q, k, v, extra, do):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, extra), q, k, v)
        return (out, *vjp(do.astype(out.dtype)))
    return jax.jit(run)


def packed_segments(B, T):
    """Three documents per row, boundaries differing between rows."""
    t = jnp.arange(T)[None, :]
    cuts = jnp.array([[T // 3, 2 * T // 3], [T // 4, T // 2]])[jnp.arange(B) % 2]
    return 1 + (t >= cuts[:, :1]).astype(jnp.int32) + (t >= cuts[:, 1:]).astype(jnp.int32)


def attention_inputs(B, T, H, K, D, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, do = (jax.random.normal(kk, (B, T, H, D), jnp.float32).astype(dtype) for kk in keys[:2])
    k, v = (jax.random.normal(kk, (B, T, K, D), jnp.float32).astype(dtype) for kk in keys[2:])
    return q, k, v, do


# Sections --------------------------------------------------------------------------------------

def check_env(phase: Phase, ctx) -> None:
    def env():
        import jaxlib

        d = jax.devices()[0]
        kernels = "interpreted" if ctx.interpret else ctx.lowering
        return "INFO", (f"python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
                        f"backend {jax.default_backend()} ({d.client.platform_version.strip()}), "
                        f"{len(jax.devices())} x {d.device_kind}, pallas {kernels}"), ""
    phase.run("environment", "-", env)


def check_correctness(phase: Phase, ctx) -> None:
    B, H, K = 2, (4 if ctx.quick else 8), 2
    lengths = (100,) if ctx.quick else (1024, 1000)
    head_dims = (64,) if ctx.quick else (128, 64)
    reference = with_grads(in_float32(lambda q, k, v, s: attention_reference(q, k, v, s)))

    def against_reference(fn, dtype, T, D, segments=True):
        def run():
            q, k, v, do = attention_inputs(B, T, H, K, D, dtype)
            s = packed_segments(B, T) if segments else None
            got = with_grads(fn)(q, k, v, s, do)
            want = reference(q, k, v, s, do)
            return compare(list(zip(("out", "dq", "dk", "dv"), got, want)), dtype)
        return run

    ours = lambda q, k, v, s: flash_attention(q, k, v, s, lowering=ctx.lowering, interpret=ctx.interpret)
    flash_cases = [(dtype, D, T) for dtype in (jnp.bfloat16, jnp.float32) for D in head_dims for T in lengths]

    def flash_check(dtype, D, T):
        shape = f"B{B} T{T} H{H} K{K} D{D} {jnp.dtype(dtype).name} packed"
        phase.run("flash_attention fwd+bwd (ours)", shape, against_reference(ours, dtype, T, D))

    # The model's own case first; the other flash variants last, so slow Triton compiles that use
    # up the budget skip variants, not whole paths.
    flash_check(*flash_cases[0])

    T, D = lengths[0], head_dims[0]
    if ctx.cudnn:
        cudnn = lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        phase.run("dot_product_attention cudnn", f"B{B} T{T} H{H} K{K} D{D} bfloat16 causal",
                  against_reference(cudnn, jnp.bfloat16, T, D, segments=False))
    # (impl, dtype, packed). cuDNN takes unpacked half-precision rows only (packed ones and float32 run
    # the blocked XLA path), so its rows, and those of "auto" (cuDNN on an NVIDIA GPU), are unpacked bf16.
    cases = [(impl, dtype, True) for impl in ("xla", "flash_xla", "pallas", "splash", "auto")
             for dtype in (jnp.bfloat16, jnp.float32)] + [("cudnn", jnp.bfloat16, False), ("auto", jnp.bfloat16, False)]
    for impl, dtype, packed in cases:
        shape = f"B{B} T{T} H{H} K{K} D{D} {jnp.dtype(dtype).name} {'packed' if packed else 'causal'}"
        if impl == "splash" and ctx.interpret:  # seconds a call in the Pallas interpreter; tests/kernels checks it
            phase.results.append(Result(phase.name, f"attention(impl={impl})", shape, "SKIP", "interpreted: in tests"))
            continue
        try:
            which = resolve_impl(impl, interpret=ctx.interpret)
        except ValueError as e:  # cuDNN off NVIDIA GPUs, splash off TPU
            phase.results.append(Result(phase.name, f"attention(impl={impl})", shape, "SKIP", str(e)[:80]))
            continue
        fn = lambda q, k, v, s, impl=impl: attention(q, k, v, s, impl=impl, interpret=ctx.interpret)
        name = f"attention(impl={impl}{f' -> {which}' if impl == 'auto' else ''})"
        phase.run(name, shape, against_reference(fn, dtype, T, D, segments=packed))

    check_context_parallel_shard(phase, ctx, B, H, K, D, T)
    check_paged(phase, ctx, H, K, D)
    for case in flash_cases[1:]:
        flash_check(*case)


def check_context_parallel_shard(phase: Phase, ctx, B, H, K, D, T, cp=4, device=1) -> None:
    """The flash kernel as device `device` of a cp mesh runs it under `kernels.attention`: its
    query chunks (one early, one late) against every key in gathered order, causal by position."""
    T -= T % (2 * cp)
    order = balanced_order(T, cp)
    mine = order.reshape(cp, T // cp)[device]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    reference = with_grads(in_float32(lambda q, k, v, s: attention_reference(q, k, v, s)[:, mine]))

    def shard(q, k, v, s):
        return flash_attention(q[:, mine], k[:, order], v[:, order], s[:, mine], kv_segment_ids_BS=s[:, order],
                               q_positions_BT=positions[:, mine], kv_positions_BS=positions[:, order],
                               lowering=ctx.lowering, interpret=ctx.interpret)

    for dtype in (jnp.float32,) if ctx.quick else (jnp.bfloat16, jnp.float32):
        def run(dtype=dtype):
            q, k, v, do = attention_inputs(B, T, H, K, D, dtype)
            s, do = packed_segments(B, T), do[:, :T // cp]
            got, want = with_grads(shard)(q, k, v, s, do), reference(q, k, v, s, do)
            return compare(list(zip(("out", "dq", "dk", "dv"), got, want)), dtype)
        shape = f"B{B} T{T}/cp{cp} H{H} K{K} D{D} {jnp.dtype(dtype).name} packed"
        phase.run("flash_attention by positions, cp shard (ours)", shape, run)


def check_paged(phase: Phase, ctx, H, K, D) -> None:
    """Paged attention (the serving engine's decode path) on ragged rows whose pages lie shuffled in
    a larger pool: our kernel on the device's lowering, `kernels.paged_attention`'s dispatch and the
    XLA paged path, against the gather reference."""
    B, P, M = 4, 16, (8 if ctx.quick else 128)  # up to M * P positions per row

    def paged_inputs(dtype, Tq):
        q, _, _, _ = attention_inputs(B, Tq, H, K, D, dtype, seed=3)
        N = B * M + 7
        keys = jax.random.split(jax.random.key(4), 3)
        k_pages, v_pages = (jax.random.normal(kk, (N, P, K, D), jnp.float32).astype(dtype) for kk in keys[:2])
        table = jax.random.permutation(keys[2], N)[:B * M].reshape(B, M).astype(jnp.int32)
        last = jnp.array([Tq - 1, M * P // 3, 20, M * P - 1])  # first page, middle, early, the last slot
        return q, k_pages, v_pages, table, last[:, None] - (Tq - 1) + jnp.arange(Tq)[None, :]

    reference = in_float32(lambda q, k, v, t, p: paged_attention_reference(q, k, v, t, p))
    paths = {f"paged_attention ({ctx.lowering}, ours)":
             lambda *a: paged_attention_pallas(*a, lowering=ctx.lowering, interpret=ctx.interpret),
             "paged_attention(impl=pallas)": lambda *a: paged_attention(*a, impl="pallas", interpret=ctx.interpret),
             "paged_attention(impl=xla)": lambda *a: paged_attention(*a, impl="xla")}
    for name, fn in paths.items():
        cases = ((jnp.bfloat16, 1), (jnp.float32, 4)) if name.endswith("ours)") else ((jnp.bfloat16, 1),)
        for dtype, Tq in cases:
            def run(fn=fn, dtype=dtype, Tq=Tq):
                args = paged_inputs(dtype, Tq)
                return compare([("out", jax.jit(fn)(*args), reference(*args))], dtype)
            phase.run(name, f"B{B} T{Tq} pages {M}x{P} H{H} K{K} D{D} {jnp.dtype(dtype).name} ragged", run)


def check_timing(phase: Phase, ctx) -> None:
    H, K, D = (4, 1, 64) if ctx.quick else (32, 8, 128)
    lengths, tokens = ((128,), 128) if ctx.quick else ((4096, 8192, 16384), 16384)
    impls = attention_impls(ctx.lowering, ctx.interpret, D)
    for T in lengths:
        B = max(1, tokens // T)
        q, k, v, do = attention_inputs(B, T, H, K, D, jnp.bfloat16)
        flops = causal_attention_flops(B, H, T, D)
        shape = f"B{B} T{T} H{H} K{K} D{D} bf16"
        for label, work in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            rates = {}
            for name in ("cudnn", "pallas (ours)", "xla"):
                impl = impls[name]
                if isinstance(impl, str):
                    phase.results.append(Result(phase.name, f"{name} {label}", shape, "SKIP", impl))
                    continue
                if name == "xla" and 4 * B * H * T * T > XLA_SCORES_LIMIT:
                    phase.results.append(Result(phase.name, f"{name} {label}", shape, "SKIP", "T^2 scores too big"))
                    continue
                _, f = impl
                fn = jax.jit(f) if label == "fwd" else jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
                args = (q, k, v) if label == "fwd" else (q, k, v, do)

                def run(fn=fn, args=args, name=name):
                    rates[name] = work * flops / timeit(fn, *args, reps=ctx.reps) / 1e12
                    versus = f"{rates[name] / rates['cudnn']:.2f}x cudnn" if "cudnn" in rates and name != "cudnn" else ""
                    return "INFO", f"{rates[name]:.3g} TFLOP/s", versus
                phase.run(f"{name} {label}", shape, run)


def check_decode(phase: Phase, ctx) -> None:
    H, K, D, B, S = (4, 1, 64, 2, 1024) if ctx.quick else (32, 8, 128, 8, 32768)
    bandwidth = {}

    def copy():
        bandwidth["copy"] = copy_bandwidth(2**24 if ctx.quick else 2**31, ctx.reps)
        return "INFO", f"{bandwidth['copy'] / 1e9:.0f} GB/s read+write", ""
    phase.run("device copy bandwidth", "2 GiB bf16" if not ctx.quick else "16 MiB bf16", copy)

    q, k_pages, v_pages, table, positions = paged_decode_inputs(B, H, K, D, S)  # every row's pages read
    for name, impl in paged_decode_impls(ctx.lowering, ctx.interpret, positions).items():
        shape = f"B{B} S{S} pages of 16 H{H} K{K} D{D} bf16"
        if ctx.interpret and name == "jax pallas ops":
            impl = "interpreted: JAX's kernel not timed"
        if isinstance(impl, str):
            phase.results.append(Result(phase.name, f"paged decode {name}", shape, "SKIP", impl))
            continue

        def run(impl=impl):
            prepare, fn = impl
            prepared = jax.block_until_ready(jax.jit(prepare)(q, k_pages, v_pages, table))
            rate = (k_pages.nbytes + v_pages.nbytes) / timeit(jax.jit(fn), *prepared, reps=ctx.reps)
            share = f"{100 * rate / bandwidth['copy']:.0f}% of copy" if "copy" in bandwidth else ""
            return "INFO", f"{rate / 1e9:.3g} GB/s", share
        phase.run(f"paged decode {name}", shape, run)
    check_speculative(phase, ctx)


def check_speculative(phase: Phase, ctx) -> None:
    """Greedy decode at batch 1 with and without prompt lookup on bench/speculative.py's repeating
    model: the same tokens (FAIL otherwise), and the speedup and acceptance."""
    from bench.speculative import System, model, repeating_params
    from llama_jax import init_params
    from llama_jax.infer.speculation import SpeculativeConfig

    # --quick: one width of verified rows (K=1), float32: few programs to compile on a CPU.
    dim, layers, new, k, dtype = (64, 1, 16, 1, "float32") if ctx.quick else (2048, 16, 128, 4, "bfloat16")
    shape = f"{layers} layers of dim {dim}, batch 1, {new} new tokens, K={k}, {dtype}"

    def run():
        cfg = model(dim, layers, dtype, 64 + new)
        params = repeating_params(cfg, init_params(cfg, 0))
        common = dict(batch=1, new_tokens=new, context=64 + new)
        plain = System("plain", cfg, params, **common)
        spec = System("ngram", cfg, params, **common, speculative=SpeculativeConfig("ngram", num_tokens=k))
        prompt = [np.random.default_rng(0).integers(3, cfg.vocab_size, 64).tolist()]
        rates = {}
        for system in (plain, spec, plain, spec):  # the first of each compiles nothing (warm_up) but warms caches
            seconds, proposed, accepted = system.run(prompt)
            rates[system.name] = new / seconds
        if plain.tokens != spec.tokens:
            return "FAIL", "greedy tokens differ with speculation", ""
        return "INFO", f"{rates['ngram']:.0f} vs {rates['plain']:.0f} tok/s ({rates['ngram'] / rates['plain']:.2f}x)", \
            f"{accepted} of {proposed} guesses kept"
    phase.run("speculative decode (ngram) vs plain", shape, run)


def check_train(phase: Phase, ctx) -> None:
    from llama_jax.config import LlamaConfig
    from llama_jax.sharding import make_mesh
    from llama_jax.train.metrics import chip_peak_flops, measure_matmul_flops, peak_flops
    from llama_jax.train.optim import OptimConfig, make_optimizer
    from llama_jax.train.step import init_state, make_train_step, put_batch
    from bench.train import random_batch

    device = jax.devices()[0]
    peaks = {}

    def matmul():
        peaks["measured"] = measure_matmul_flops(jnp.bfloat16, n=1024 if ctx.quick else 8192, device=device)
        datasheet = chip_peak_flops(device)
        return "INFO", f"{peaks['measured'] / 1e12:.3g} TFLOP/s", (
            f"{100 * peaks['measured'] / datasheet:.0f}% of data sheet" if datasheet else "")
    phase.run("bf16 matmul rate", "1024^3" if ctx.quick else "8192^3", matmul)
    peaks["sheet"], source = peak_flops([device])

    if ctx.quick:
        base = LlamaConfig.preset("tiny", dtype="bfloat16", remat="full")
        B, T = 2, 32
    else:
        base = LlamaConfig.preset("llama3.2-1b", dtype="bfloat16", param_dtype="float32", remat="full")
        B, T = ctx.train_batch, ctx.train_seq
    mesh = make_mesh({"dp": 1}, devices=[device])
    optimizer = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0, total_steps=10_000))
    batch = put_batch(random_batch(base, B, T), mesh)
    flops_per_step = base.flops_per_token(T) * B * T
    # auto: the default. Every train batch is packed, so on a GPU it is the blocked XLA path, not cuDNN
    # (whose speed the timing section measures).
    for impl in ("pallas", "auto", "xla"):
        shape = f"{'tiny' if ctx.quick else 'llama3.2-1b'} B{B} T{T} bf16 remat=full"
        if impl != "pallas" and ctx.quick:  # --quick keeps this code alive; the pallas step runs all of it
            phase.results.append(Result(phase.name, f"train step attention={impl}", shape, "SKIP", "--quick"))
            continue

        def run(impl=impl):
            cfg = dataclasses.replace(base, attention_impl=impl, attention_interpret=ctx.interpret)
            holder = {"state": init_state(cfg, optimizer, mesh, seed=0)}
            step = make_train_step(cfg, optimizer, mesh, batch_shape=(B, T))

            def one_step():
                holder["state"], metrics = step(holder["state"], batch)
                holder["loss"] = float(metrics["loss"])

            seconds = median_seconds(one_step, ctx.train_steps, warmup=2)
            del holder["state"]
            rate = flops_per_step / seconds
            mfu = [f"MFU {100 * rate / peaks['sheet']:.1f}% of {source}" if peaks["sheet"] else source]
            if "measured" in peaks:
                mfu.append(f"{100 * rate / peaks['measured']:.1f}% of measured matmul")
            status = "INFO" if jnp.isfinite(holder["loss"]) else "FAIL"
            return status, f"{B * T / seconds:,.0f} tok/s, {seconds * 1e3:.0f} ms/step, loss {holder['loss']:.2f}", \
                "; ".join(mfu)
        phase.run(f"train step attention={impl}", shape, run)


CHECKS = {"env": check_env, "correctness": check_correctness, "timing": check_timing, "decode": check_decode,
          "train": check_train}
# Seconds per section on an H200, compiles included (~6.5 minutes in all); checks past a budget are skipped.
BUDGET_S = {"env": 20, "correctness": 120, "timing": 90, "decode": 60, "train": 150}


# Report ----------------------------------------------------------------------------------------

def markdown(results: list[Result]) -> str:
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| section | check | shape | result / time | vs reference / cudnn |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.section} | {cell(r.check)} | {cell(r.shape)} | {r.status} {cell(r.value)} | "
                     f"{cell(r.compare)} |")
    return "\n".join(lines)


def write_out(out_dir: pathlib.Path, log: Log, results: list[Result], header: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "device_check.log").write_text("\n".join(log.lines) + "\n")
    (out_dir / "device_check.json").write_text(json.dumps(
        {**header, "results": [dataclasses.asdict(r) for r in results]}, indent=1))


@dataclasses.dataclass
class Context:
    quick: bool
    lowering: str
    interpret: bool
    cudnn: bool
    reps: int
    train_batch: int
    train_seq: int
    train_steps: int


def main(argv=None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Sections: " + ", ".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU (kernels interpreted)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--skip-train", action="store_true", help="leave out the train-step section")
    p.add_argument("--train-batch", type=int, default=4, help="train-step batch (default %(default)s)")
    p.add_argument("--train-seq", type=int, default=4096, help="train-step sequence length (default %(default)s)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument("--results", type=pathlib.Path, default=RESULTS, help="markdown file to append to")
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args(argv)

    lowering = default_lowering()
    interpret = lowering is None
    if interpret and not args.quick:
        p.error(f"backend {jax.default_backend()!r} has no Pallas lowering: use --quick")
    ctx = Context(quick=args.quick, lowering=lowering or "triton", interpret=interpret, cudnn=_is_cuda(),
                  reps=2 if args.quick else 5, train_batch=args.train_batch, train_seq=args.train_seq,
                  train_steps=2 if args.quick else 5)
    sections = [s for s in (args.only or SECTIONS) if not (args.skip_train and s == "train")]

    log, results = Log(), []
    for name in sections:
        phase = Phase(name, BUDGET_S[name] * args.budget_scale, log, results)
        try:
            CHECKS[name](phase, ctx)
        except Exception as e:  # noqa: BLE001 - a section's setup failing still leaves the others
            message = short_error(e)
            log(f"{name}: setup failed: {message}")
            results.append(Result(name, "section setup", "-", "ERROR", message.splitlines()[0][:120],
                                  error=traceback.format_exc()[-20000:]))
        log(f"{name}: done in {time.perf_counter() - phase.start:.0f}s")

    table = markdown(results)
    print(table, flush=True)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    device = jax.devices()[0]
    where = f"{device.platform}: {device.device_kind}" + (" (kernels interpreted)" if interpret else "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit("llama_jax", "bench")
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    log(f"total {time.perf_counter() - log.start:.0f}s; {summary}")

    if not args.no_append:
        quick = ", --quick" if args.quick else ""
        entry = (f"### {date}, {where}, {machine()}, commit {commit}{quick}\n\n"
                 f"jax {jax.__version__}; {summary}; total {time.perf_counter() - log.start:.0f}s. Errors are "
                 "max |got - want| / max |want| against the float32 HIGHEST-precision reference.\n\n" + table)
        append_results(SECTION, entry, args.results)
        log(f"appended to {args.results}")
    if os.environ.get("OUT"):
        write_out(pathlib.Path(os.environ["OUT"]), log, results,
                  {"date": date, "device": where, "machine": machine(), "commit": commit,
                   "jax": jax.__version__, "argv": sys.argv[1:] if argv is None else list(argv), "counts": counts})
        log(f"wrote {os.environ['OUT']}/device_check.json and .log")
    return results


if __name__ == "__main__":
    main()
