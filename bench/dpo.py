"""DPO against SFT from the same converted checkpoint: peak host memory and step time, side by side.

    python -m bench.dpo                       # a 6.5M-parameter Llama-architecture HF model, CPU
    python -m bench.dpo --dim 512 --layers 8

Builds a Hugging Face LlamaForCausalLM with random weights and a ChatML tokenizer (the test suite's
SmolLM2-style tokenizer and template, tests/hf_chat_model.py), converts it with `python -m
llama_jax.convert hf`, writes chat-form preference pairs and the same chats with the chosen answer
as an SFT set, then runs `python -m llama_jax.train --init-from CKPT` on each, `--objective dpo`
and the default next-token objective, in fresh subprocesses with the same flags, and reads each
process's peak resident set (ru_maxrss, from wait4) and the run's summary.json (tokens/s after the
compiled first step). DPO packs two sequences a pair, so its rows hold as many tokens as SFT's; its
reference log-probs are one forward pass over the set before the first step (timed separately).
Prints a markdown table and appends it, with machine, date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import append_results, git_commit, machine

SECTION = "## DPO vs SFT from a converted checkpoint (bench/dpo.py)"
WORDS = ("the quick brown fox jumps over the lazy dog it was nobody noticed hello world how are you today "
         "I am fine thank you numbers").split()


def write_data(directory: Path, n: int, seed: int = 0) -> tuple[str, str]:
    """(preference pairs, the same chats with the chosen answer) as chat-form JSONL."""
    import random

    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    prefs, chats = [], []
    for _ in range(n):
        messages = [{"role": "user", "content": text(rng.randint(4, 12))}]
        chosen = {"role": "assistant", "content": text(rng.randint(4, 16))}
        rejected = {"role": "assistant", "content": text(rng.randint(4, 16))}
        prefs.append({"messages": messages, "chosen": chosen, "rejected": rejected})
        chats.append({"messages": [*messages, chosen]})
    (directory / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (directory / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return str(directory / "prefs.jsonl"), str(directory / "chats.jsonl")


def measure(argv: list[str]) -> tuple[float, int, str]:
    """(seconds, peak resident bytes, stderr) of one subprocess."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                                stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read().decode()
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(argv)} failed:\n{stderr}")
    return seconds, usage.ru_maxrss * 1024, stderr  # Linux reports kilobytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mesh", default="fsdp-1")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from tests.hf_chat_model import build  # the tests' SmolLM2-style model, at the bench's shapes

        build(tmp / "hf", dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn,
              max_positions=1024)
        subprocess.run([sys.executable, "-m", "llama_jax.convert", "hf", str(tmp / "hf"), str(tmp / "ckpt")],
                       check=True, capture_output=True)
        prefs, chats = write_data(tmp, args.records)
        common = ["--init-from", str(tmp / "ckpt"), "--seq-len", str(args.seq_len), "--batch-size",
                  str(args.batch_size), "--steps", str(args.steps), "--lr", "1e-5", "--warmup-steps", "0",
                  "--mesh", args.mesh, "--save-every", "100000", "--log-every", "1", "--no-progress"]
        rows, params = [], None
        for name, extra in (("SFT (next-token)", ["--data", chats]),
                            ("DPO (beta 0.1)", ["--data", prefs, "--objective", "dpo", "--dpo-beta", "0.1"])):
            out = tmp / name.split()[0].lower()
            seconds, peak, stderr = measure([sys.executable, "-m", "llama_jax.train", *common, *extra,
                                             "--out", str(out)])
            summary = json.loads((out / "summary.json").read_text())
            params = summary["params"]
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            reference = re.search(r"reference log-probs of (\d+) pairs computed in ([\d.]+) s", stderr)
            step_s = args.batch_size * args.seq_len / summary["tokens_per_s"]
            rows.append((name, peak / 2**30, step_s, summary["tokens_per_s"],
                         sum(m["tokens"] for m in metrics) / len(metrics),
                         f"{reference.group(2)} s" if reference else "-", seconds))

    cfg = (f"dim {args.dim}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, ffn {args.ffn}, "
           f"vocab 600 (ChatML BPE)")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"commit {git_commit('llama_jax', 'bench')}\n\n"
              f"HF LlamaForCausalLM ({cfg}; {params / 1e6:.2f}M params, float32) converted with "
              f"`llama_jax.convert hf`; `llama_jax.train --init-from` on mesh {args.mesh} (8 fake CPU devices), "
              f"float32, {args.batch_size} rows x {args.seq_len} tokens, {args.steps} steps, {args.records} "
              f"chat records; step time = rows x seq-len / the run's tokens/s after its compiled first step "
              f"(summary.json); peak RSS of the whole process (imports, compiles, data, weights, AdamW).\n")
    table = ["| objective | peak RSS (GiB) | step (s) | tokens/s | loss tokens / step | reference pass | "
             "wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, peak, step_s, tps, loss_tokens, reference, seconds in rows:
        table.append(f"| {name} | {peak:.2f} | {step_s:.2f} | {tps:.0f} | {loss_tokens:.0f} | {reference} | "
                     f"{seconds:.0f} |")
    entry = header + "\n" + "\n".join(table) + "\n"
    print(entry)
    append_results(SECTION, entry)


if __name__ == "__main__":
    main()
