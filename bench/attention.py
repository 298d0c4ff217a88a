"""Attention throughput: our Pallas kernels against XLA, cuDNN and JAX's own Pallas kernels.

    python -m bench.attention            # GPU / TPU: seq 1k..32k, H=32, K=8, D=128, bf16
    python -m bench.attention --quick    # any backend, tiny sizes (CPU: kernels interpreted)

Training attention: forward and forward+backward TFLOP/s, causal FLOPs counted as the useful
half of the square: forward 4 * B * H * T * T * D / 2, backward 2.5 times that (five matmuls to
the forward's two), recomputation not counted. Batch shrinks as the sequence grows so every
row has the same tokens. JAX's Pallas reference kernels (ops.gpu.attention.mha, ops.tpu
.flash_attention) are multi-head only, so they get K/V repeated to H heads (and, on TPU,
transposed head-major) outside the timing; their gradients are then w.r.t. the repeated K/V.
The XLA path is skipped where its [B, H, T, T] float32 scores would pass 16 GiB.

Decode: one query per sequence against 32k bf16 positions per row at batch 8, in pages of 16
shuffled over the pool (the serving engine's layout, kernels.paged_attention); cells are the K/V
page bytes read per second and their fraction of a device copy's bandwidth measured in the same
run (issue #13's target: >= 80%). JAX's paged kernels (ops.gpu.paged_attention,
ops.tpu.paged_attention) take a kv-head-major pool [K, N, P, D], transposed outside the timing.
cuDNN has no paged attention.

Prints one markdown table and appends it, with machine, date and commit, to bench/RESULTS.md
under its own section (other scripts append to that file too).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from llama_jax.kernels import flash_attention, paged_attention_pallas, paged_attention_xla
from llama_jax.kernels.common import default_lowering
from bench.results import append_results, git_commit

SECTION = "## Attention kernels (bench/attention.py)"
IMPLS = ("pallas (ours)", "xla", "cudnn", "jax pallas ops")
XLA_SCORES_LIMIT = 16 * 2**30  # bytes of f32 scores past which the XLA path is not tried


def timeit(fn, *args, reps=7, sample_s=0.02):
    """Median seconds per call: compiled and warmed first, each sample synced once at its end."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    inner = max(1, int(sample_s / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def copy_bandwidth(nbytes, reps):
    """Bytes read + written per second by an elementwise pass: the memory ceiling we can reach."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    seconds = timeit(jax.jit(lambda x: x + 1), x, reps=reps)
    return 2 * x.nbytes / seconds


def causal_attention_flops(B, H, T, D):
    """Forward FLOPs of causal attention: QK^T and PV over the visible half of the square."""
    return 4 * B * H * T * T * D / 2


def _has_cudnn():
    return (jax.default_backend() == "gpu"
            and "rocm" not in jax.devices()[0].client.platform_version.lower())


def _repeat_kv(q, k, v):
    G = q.shape[2] // k.shape[2]
    return q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)


def _head_major(q, k, v):
    return tuple(x.transpose(0, 2, 1, 3) for x in _repeat_kv(q, k, v))


def attention_impls(lowering, interpret, D):
    """name -> (prepare, fn): prepare(q, k, v) runs untimed, fn(*prepared) is timed; or a reason
    the impl does not run here. q [B, T, H, D], k, v [B, T, K, D]."""
    scale = D ** -0.5
    same = lambda q, k, v: (q, k, v)
    impls = {
        "pallas (ours)": (same, lambda q, k, v: flash_attention(q, k, v, lowering=lowering,
                                                                interpret=interpret)),
        "xla": (same, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                   implementation="xla")),
        "cudnn": (same, lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")) if _has_cudnn() else "no cuDNN",
        "jax pallas ops": "no Pallas lowering",
    }
    try:  # JAX's example kernels move between releases; their absence must not stop ours
        if lowering == "triton":
            from jax.experimental.pallas.ops.gpu.attention import mha

            impls["jax pallas ops"] = (_repeat_kv, lambda q, k, v: mha(
                q, k, v, None, sm_scale=scale, causal=True, interpret=interpret))
        elif lowering == "mosaic":
            from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention as tpu_fa

            impls["jax pallas ops"] = (_head_major, lambda q, k, v: tpu_fa(
                q, k, v, causal=True, sm_scale=scale))
    except ImportError as e:
        impls["jax pallas ops"] = f"not in jax {jax.__version__}: {e}"
    return impls


def bench_training(args, lowering, interpret):
    rows = []
    D, H, K = 128, args.heads, args.kv_heads
    for T in args.seqs:
        B = max(1, args.tokens // T)
        keys = jax.random.split(jax.random.key(T), 4)
        q, do = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in keys[:2])
        k, v = (jax.random.normal(kk, (B, T, K, D), jnp.bfloat16) for kk in keys[2:])
        fwd_flops = causal_attention_flops(B, H, T, D)
        cells = {"fwd": {}, "fwd+bwd": {}}
        for name, impl in attention_impls(lowering, interpret, D).items():
            if isinstance(impl, str):
                cells["fwd"][name] = cells["fwd+bwd"][name] = f"n/a ({impl})"
                continue
            if name == "xla" and 4 * B * H * T * T > XLA_SCORES_LIMIT:
                cells["fwd"][name] = cells["fwd+bwd"][name] = "skipped (T^2 scores)"
                continue
            prepare, f = impl
            qkv = jax.block_until_ready(jax.jit(prepare)(q, k, v))
            fwd = jax.jit(f)
            fwd_bwd = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
            for label, fn, fargs, flops in [("fwd", fwd, qkv, fwd_flops),
                                            ("fwd+bwd", fwd_bwd, (*qkv, do), 3.5 * fwd_flops)]:
                try:
                    seconds = timeit(fn, *fargs, reps=args.reps)
                    cells[label][name] = _fmt(flops / seconds / 1e12)
                except Exception as e:  # noqa: BLE001 - one failing impl must not stop the table
                    cells[label][name] = _failure(e)
        if T == args.seqs[0]:
            got = jax.jit(attention_impls(lowering, interpret, D)["pallas (ours)"][1])(q, k, v)
            want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
            err = float(jnp.linalg.norm((got - want).astype(jnp.float32))
                        / jnp.linalg.norm(want.astype(jnp.float32)))
            print(f"check T={T}: ours vs xla relative error {err:.1e}")
        for label in ("fwd", "fwd+bwd"):
            rows.append([f"{label} TFLOP/s", str(T), str(B)] + [cells[label][n] for n in IMPLS])
    return rows


def paged_decode_inputs(B, H, K, D, S, P=16, seed=0):
    """q [B, 1, H, D] at position S - 1 of every row (all its pages are read), k / v pages
    [B * S / P, P, K, D] bf16, each row's S / P pages shuffled over the pool."""
    keys = jax.random.split(jax.random.key(seed), 4)
    M = S // P
    q = jax.random.normal(keys[0], (B, 1, H, D), jnp.bfloat16)
    k_pages, v_pages = (jax.random.normal(kk, (B * M, P, K, D), jnp.bfloat16) for kk in keys[1:3])
    table = jax.random.permutation(keys[3], B * M).reshape(B, M).astype(jnp.int32)
    return q, k_pages, v_pages, table, jnp.full((B, 1), S - 1, jnp.int32)


def paged_decode_impls(lowering, interpret, positions):
    """name -> (prepare, fn) over (q, k_pages, v_pages, table), or why the impl does not run here."""
    same = lambda *a: a  # noqa: E731
    head_major = lambda q, k, v, t: (q[:, 0], k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3), t)  # noqa: E731
    lengths = positions[:, 0] + 1
    impls = {
        "pallas (ours)": (same, lambda q, k, v, t: paged_attention_pallas(q, k, v, t, positions, lowering=lowering,
                                                                          interpret=interpret)),
        "xla": (same, lambda q, k, v, t: paged_attention_xla(q, k, v, t, positions)),
        "cudnn": "no paged path",
        "jax pallas ops": "no Pallas lowering",
    }
    try:  # JAX's example kernels move between releases; their absence must not stop ours
        if lowering == "triton":
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged

            impls["jax pallas ops"] = (head_major, lambda q, k, v, t: gpu_paged(q, k, v, t, lengths,
                                                                                 interpret=interpret))
        elif lowering == "mosaic":
            from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged

            impls["jax pallas ops"] = (head_major, lambda q, k, v, t: tpu_paged(q, k, v, lengths, t,
                                                                                 pages_per_compute_block=8))
    except ImportError as e:
        impls["jax pallas ops"] = f"not in jax {jax.__version__}: {e}"
    return impls


def bench_decode(args, lowering, interpret, bandwidth):
    D, H, K, B, S = 128, args.heads, args.kv_heads, args.decode_batch, args.cache
    q, k_pages, v_pages, table, positions = paged_decode_inputs(B, H, K, D, S)
    kv_bytes = k_pages.nbytes + v_pages.nbytes
    cells = []
    for name, impl in paged_decode_impls(lowering, interpret, positions).items():
        if isinstance(impl, str):
            cells.append(f"n/a ({impl})")
            continue
        try:
            prepare, f = impl
            prepared = jax.block_until_ready(jax.jit(prepare)(q, k_pages, v_pages, table))
            seconds = timeit(jax.jit(f), *prepared, reps=args.reps)
            rate = kv_bytes / seconds
            cells.append(f"{_fmt(rate / 1e9)} GB/s ({100 * rate / bandwidth:.0f}%)")
        except Exception as e:  # noqa: BLE001
            cells.append(_failure(e))
    return [[f"paged decode, {S // 1024}k per row", str(S), str(B)] + cells]


def _fmt(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _failure(e):
    text = str(e)
    print(f"  failed: {type(e).__name__}: {text[:300]}")
    return "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else "error"


def markdown(rows):
    header = ["metric", "seq", "batch", *IMPLS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes; runs on CPU (interpreted)")
    p.add_argument("--results", type=pathlib.Path,
                   default=pathlib.Path(__file__).resolve().parent / "RESULTS.md")
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args(argv)

    lowering = default_lowering()
    interpret = lowering is None
    if interpret and not args.quick:
        p.error(f"backend {jax.default_backend()!r} has no Pallas lowering: use --quick")
    if interpret:
        lowering = "triton"  # run the GPU kernels in the Pallas interpreter
    if args.quick:
        args.seqs, args.tokens, args.heads, args.kv_heads = [128, 256], 256, 4, 1
        args.decode_batch, args.cache, args.reps, copy_bytes = 2, 1024, 2, 2**24
    else:
        args.seqs, args.tokens = [1024 * 2**i for i in range(6)], 32768
        args.heads, args.kv_heads = 32, 8
        args.decode_batch, args.cache, args.reps, copy_bytes = 8, 32768, 7, 2**31

    device = jax.devices()[0]
    machine = f"{device.platform}: {device.device_kind}"
    machine += " (kernels interpreted)" if interpret else ""
    print(f"{machine}; jax {jax.__version__}; H={args.heads} K={args.kv_heads} D=128 bf16")
    bandwidth = copy_bandwidth(copy_bytes, args.reps)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    rows = bench_training(args, lowering, interpret)
    rows += bench_decode(args, lowering, interpret, bandwidth)
    table = markdown(rows)
    print(table)

    if not args.no_append:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        quick = ", --quick" if args.quick else ""
        commit = git_commit("llama_jax/kernels", "bench/attention.py")
        entry = (f"### {date}, {machine}, commit {commit}{quick}\n\n"
                 f"jax {jax.__version__}; H={args.heads}, K={args.kv_heads}, D=128, bf16, causal; "
                 f"{args.tokens} tokens per step; copy bandwidth {bandwidth / 1e9:.0f} GB/s. "
                 "TFLOP/s counts causal FLOPs (fwd 2*B*H*T^2*D, bwd 2.5x fwd); decode cells are "
                 "K/V page bytes read per second (% of the copy bandwidth).\n\n" + table)
        append_results(SECTION, entry, args.results)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
