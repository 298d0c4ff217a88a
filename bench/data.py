"""Data throughput: how fast `python -m llama_jax.data prepare` tokenizes and packs (tokens/s per
worker), how fast a process reads prepared rows by global index (rows/s), and how fast the train
step consumes rows of the same shape, side by side on this machine.

    python -m bench.data                                   # llama3 tokenizer, 32 MiB of text, rows of 256
    python -m bench.data --tokenizer bytes --mib 64 --workers 1 2 4 --seq-len 2048 --batch-size 8

The corpus is JSONL, one record per Python standard-library source file, repeated to --mib. Read
throughput is measured twice: one process reading whole global batches, and one of 8 processes
reading its eighth (what a host of a multi-host run does); rows are in the page cache, as they are
once a run has touched them. The train step is bench.train's (random tokens, full rows) for
--config on --mesh; its rows/s is the rate the reader must sustain. Prints a markdown table and
appends it, with machine, date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from llama_jax.sharding.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)

import psutil  # noqa: E402

from bench.results import git_commit, machine, publish  # noqa: E402

SECTION = "## Data throughput (bench/data.py)"


def write_corpus(path: Path, mib: int) -> int:
    """JSONL of standard-library sources, repeated to about `mib` MiB; returns its size in bytes."""
    from llama_jax.data.sources import builtin_corpus_paths

    texts = [Path(p).read_text(errors="replace") for p in builtin_corpus_paths()]
    size = 0
    with open(path, "w") as f:
        while size < mib << 20:
            for text in texts:
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line.encode())
    return size


def tokenizer_path(choice: str, directory: Path) -> str:
    from llama_jax.tokenizer import write_byte_tokenizer
    from llama_jax.tokenizer import default_tokenizer_path

    if choice == "bytes":
        return write_byte_tokenizer(directory / "tokenizer.model")
    return default_tokenizer_path() if choice == "llama3" else choice


def time_prepare(corpus: Path, tokenizer: str, seq_len: int, out: Path, workers: int) -> tuple[float, dict]:
    from llama_jax.data import prepare

    start = time.perf_counter()
    manifest = prepare([corpus], tokenizer, seq_len, out, workers=workers, progress=False)
    return time.perf_counter() - start, manifest


def read_rate(data_dir: Path, batch_size: int, rows: list[int], min_seconds: float = 2.0) -> float:
    """Rows/s of one process reading `rows` of each global batch, step after step."""
    from llama_jax.data import GlobalBatches, PreparedData

    batches = GlobalBatches(PreparedData(data_dir), batch_size, seed=0, rows=rows)
    batches.read(0)  # opens the shards' readers
    start, step = time.perf_counter(), 1
    while time.perf_counter() - start < min_seconds:
        batches.read(step)
        step += 1
    return (step - 1) * len(rows) / (time.perf_counter() - start)


def step_rate(config: str, mesh_spec: str, batch_size: int, seq_len: int, steps: int) -> tuple[float, str]:
    """Rows/s the train step consumes, and a phrase for the table."""
    import jax

    from bench.train import bench_jax, mesh_for, model_config, random_batch

    cfg = model_config(config, "float32" if jax.devices()[0].platform == "cpu" else "bfloat16", seq_len)
    mesh = mesh_for(mesh_spec)
    seconds, _ = bench_jax(cfg, mesh, random_batch(cfg, batch_size, seq_len), steps, 2, 1, False)
    return batch_size / seconds, f"{config} ({cfg.num_params() / 1e6:.2f}M params), {mesh_spec} on {mesh.size} " \
                                 f"{jax.devices()[0].platform} devices"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="llama3", help="'llama3', 'bytes' or a path (default %(default)s)")
    p.add_argument("--mib", type=int, default=32, help="corpus size in MiB (default %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                   help="prepare worker counts to time (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="global rows per step")
    p.add_argument("--processes", type=int, default=8, help="the multi-host case: this many processes share a batch")
    p.add_argument("--config", default="tiny-bytes", help="train step model: a preset or the trainer's default "
                                                          "(%(default)s)")
    p.add_argument("--mesh", default="fsdp-1", help="train step mesh (default %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    B, T = args.batch_size, args.seq_len

    lines = ["| what | setting | rate | per worker / process |", "|---|---|---|---|"]
    load_before = psutil.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = write_corpus(tmp / "corpus.jsonl", args.mib)
        tokenizer = tokenizer_path(args.tokenizer, tmp)
        data_dir = None
        for workers in args.workers:
            out = tmp / f"data{workers}"
            seconds, manifest = time_prepare(tmp / "corpus.jsonl", tokenizer, T, out, workers)
            tps = manifest["tokens"] / seconds
            lines.append(f"| prepare | {workers} worker{'s' * (workers > 1)}, {size / 2**20:.0f} MiB -> "
                         f"{manifest['tokens']:,} tokens, {manifest['rows']:,} rows | {tps:,.0f} tokens/s "
                         f"({size / seconds / 2**20:.1f} MiB/s) | {tps / workers:,.0f} tokens/s |")
            data_dir = data_dir or out
        whole = read_rate(data_dir, B, list(range(B)))
        lines.append(f"| read | 1 process, all {B} rows of each batch | {whole:,.0f} rows/s ({whole * T:,.0f} tokens/s)"
                     f" | {whole:,.0f} rows/s |")
        share = B // args.processes if B % args.processes == 0 else None
        if share:
            part = read_rate(data_dir, B, list(range(share)))
            lines.append(f"| read | 1 of {args.processes} processes, {share} rows of each batch | {part:,.0f} rows/s "
                         f"| {part:,.0f} rows/s |")
    consumed, what = step_rate(args.config, args.mesh, B, T, args.steps)
    lines.append(f"| train step | {what} | {consumed:,.1f} rows/s ({consumed * T:,.0f} tokens/s) | |")
    lines.append(f"| read / train step | 1 process | {whole / consumed:,.0f}x | |")

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"### {now}, {machine()}, commit {git_commit()}\n\n"
              f"Tokenizer {args.tokenizer}, rows of {T} tokens, global batch {B}; corpus: JSONL of Python stdlib "
              f"sources ({args.mib} MiB); reads from the page cache; load average {load_before:.1f} before / "
              f"{psutil.getloadavg()[0]:.1f} after (a shared host).")
    return publish(SECTION, header, lines, append=not args.no_append)


if __name__ == "__main__":
    sys.exit(main() and 0)
