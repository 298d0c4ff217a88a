"""Peak host memory of the converters on a synthetic multi-shard Meta checkpoint of a few GB.

    python -m bench.convert_memory               # 2.3 GB: 10 layers of a 1B-class model, 8 shards
    python -m bench.convert_memory --layers 24   # 4.1 GB

Builds a Meta download in a temporary directory one shard at a time (the builder never holds the
model): dim 2048, vocab 128256, 16 heads and 4 kv heads (so the 8 shards store each kv head twice,
as Meta's 405B MP16 download does), FFN 8192, untied, random bf16 weights, the real Llama 3
tokenizer. Then runs each step in a fresh subprocess and reads that process's peak resident set
(ru_maxrss, from wait4):

    imports only    python -c 'import llama_jax.convert.meta, ...'   the floor: jax, tensorstore
    meta            python -m llama_jax.convert meta SRC OURS
    to-hf           python -m llama_jax.convert to-hf OURS HF
    hf              python -m llama_jax.convert hf HF OURS2

The resident set counts the file pages a process has mapped and touched: a converter that kept
every shard mapped and read would show the whole checkpoint here even if it copied nothing. A
child's ru_maxrss starts from its parent's resident set when forked, so this process stays small:
the checkpoint is built in a process of its own, and numpy and torch are imported only there.
Prints a markdown table and appends it, with machine, date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from bench.results import append_results, git_commit, machine

SECTION = "## Converter peak memory (bench/convert_memory.py)"
MODEL = dict(dim=2048, n_heads=16, n_kv_heads=4, vocab_size=128256, multiple_of=256, ffn_dim_multiplier=1.5,
             norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False)
FFN = 8192  # Meta's rule for the dims above
IMPORTS = "import llama_jax.convert.meta, llama_jax.convert.hf, llama_jax.convert.export_hf, tensorstore"


def shard_layout(n_layers: int, n_shards: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape in one shard, how shards share it: 'split', 'kv' or 'copy')."""
    d, h, k, v = MODEL["dim"], MODEL["n_heads"], MODEL["n_kv_heads"], MODEL["vocab_size"]
    e, s = d // h, n_shards
    kv_rows = e * max(k // s, 1)
    layout = {"tok_embeddings.weight": ((v // s, d), "split"), "norm.weight": ((d,), "copy"),
              "output.weight": ((v // s, d), "split")}
    for i in range(n_layers):
        layout |= {
            f"layers.{i}.attention.wq.weight": ((h * e // s, d), "split"),
            f"layers.{i}.attention.wk.weight": ((kv_rows, d), "kv"),
            f"layers.{i}.attention.wv.weight": ((kv_rows, d), "kv"),
            f"layers.{i}.attention.wo.weight": ((d, h * e // s), "split"),
            f"layers.{i}.feed_forward.w1.weight": ((FFN // s, d), "split"),
            f"layers.{i}.feed_forward.w3.weight": ((FFN // s, d), "split"),
            f"layers.{i}.feed_forward.w2.weight": ((d, FFN // s), "split"),
            f"layers.{i}.attention_norm.weight": ((d,), "copy"),
            f"layers.{i}.ffn_norm.weight": ((d,), "copy"),
        }
    return layout


def random_bf16(shape, seed: int):
    import ml_dtypes
    import numpy as np
    import torch

    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02
    return torch.from_numpy(values.astype(ml_dtypes.bfloat16).view(np.int16)).view(torch.bfloat16)


def build(directory: Path, n_layers: int, n_shards: int) -> int:
    """Write the Meta download; returns its size in bytes."""
    import torch

    from llama_jax.tokenizer import default_tokenizer_path

    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(MODEL | {"n_layers": n_layers}))
    (directory / "tokenizer.model").write_bytes(Path(default_tokenizer_path()).read_bytes())
    copies = n_shards // MODEL["n_kv_heads"]
    for s in range(n_shards):
        shard = {}
        for name, (shape, kind) in shard_layout(n_layers, n_shards).items():
            # Equal seeds give equal copies: norms in every shard, a kv head in `copies` shards.
            piece = {"split": s, "kv": s // max(copies, 1), "copy": 0}[kind]
            shard[name] = random_bf16(shape, zlib.crc32(f"{name}/{piece}".encode()))
        torch.save(shard, directory / f"consolidated.{s:02d}.pth")
        del shard
    return sum(p.stat().st_size for p in directory.iterdir())


def measure(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak resident bytes) of one subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            errors.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed:\n{errors.read().decode()}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)

    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        start = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as builder:
            size = builder.submit(build, work / "meta", args.layers, args.shards).result()
        print(f"built a {gb(size)} Meta checkpoint in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        convert = [sys.executable, "-m", "llama_jax.convert"]
        steps = [
            ("imports only", [sys.executable, "-c", IMPORTS], None),
            ("meta -> ours", convert + ["meta", str(work / "meta"), str(work / "ours"), "--quiet"], work / "meta"),
            ("ours -> HF (to-hf)", convert + ["to-hf", str(work / "ours"), str(work / "hf"), "--quiet"],
             work / "ours"),
            ("HF -> ours (hf)", convert + ["hf", str(work / "hf"), str(work / "ours2"), "--quiet"], work / "hf"),
        ]
        rows = []
        for label, command, source in steps:
            seconds, peak = measure(command)
            rows.append((label, gb(directory_size(source)) if source else "-", gb(peak), f"{seconds:.0f} s"))
            print(f"{label}: peak RSS {gb(peak)} in {seconds:.0f} s", file=sys.stderr)

    largest = MODEL["vocab_size"] * MODEL["dim"] * 2
    table = "\n".join(["| step | input on disk | peak RSS | time |", "|---|---|---|---|"]
                      + [f"| {' | '.join(row)} |" for row in rows])
    entry = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
             f"commit {git_commit('llama_jax/convert', 'bench/convert_memory.py')}\n\n"
             f"Synthetic Meta checkpoint: {args.layers} layers, dim {MODEL['dim']}, vocab {MODEL['vocab_size']}, "
             f"{MODEL['n_heads']} heads / {MODEL['n_kv_heads']} kv heads, bf16, {args.shards} shards, "
             f"{gb(size)}; largest tensor {gb(largest)} (tok_embeddings and output, each).\n\n{table}\n")
    print(entry)
    if not args.no_append:
        append_results(SECTION, entry)


if __name__ == "__main__":
    main()
