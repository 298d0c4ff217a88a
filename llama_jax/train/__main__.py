"""python -m llama_jax.train: train or fine-tune a Llama on a device mesh (see --help)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from llama_jax.abandoned_reads import quiet_abandoned_reads

DESCRIPTION = """\
Train a Llama 3 model on a mesh of devices, resuming automatically from OUT/checkpoints.

With no flags it trains a small byte-level Llama (0.87M parameters) on Python's own standard
library sources for 300 steps over all devices (8 fake CPU devices on a CPU-only machine), then
writes OUT/model, which `python -m llama_jax.infer --checkpoint out/model` samples from.
"""

EPILOG = """\
examples:
  python -m llama_jax.train                                   # the demo run, a few minutes on CPU
  python -m llama_jax.train --mesh dp4,tp8 --config llama3.2-1b --data corpus/ --seq-len 2048 \\
      --batch-size 256 --steps 10000 --lr 3e-4 --out runs/1b
  python -m llama_jax.train --init-from ckpt/llama3.2-1b --data chats.jsonl --lr 1e-5 --steps 500
  python -m llama_jax.train --init-from ckpt/llama3.1-8b --data books/ --seq-len 131072 --batch-size 2 \\
      --mesh fsdp2,cp4 --remat full --lr 1e-5 --steps 200     # long context: each row split over 4 devices
  python -m llama_jax.train --init-from ckpt/1b-instruct --objective dpo --dpo-beta 0.1 --data prefs.jsonl \\
      --lr 1e-6 --steps 200 --out runs/dpo
  python -m llama_jax.train --init-from ckpt/1b-instruct --objective reward --data prefs.jsonl \\
      --lr 1e-5 --steps 500 --out runs/rm      # a reward model: OUT/model scores sequences
  python -m llama_jax.train --init-from ckpt/llama3.2-1b --lora-rank 16 --quantize-base int8 --data chats.jsonl \\
      --lr 2e-4 --steps 500 --out runs/lora     # QLoRA: OUT/adapters + the merged OUT/model
  (rerun the same command to resume; SIGTERM, to any one process of a run, saves and stops them all cleanly)

data: .jsonl/.json files hold one record per line, {"text": ...} or {"messages": [{"role", "content"}, ...]}
(chat: loss on assistant turns only); .parquet files and `datasets` directories (save_to_disk) give one
document per row of their 'text' (or 'messages') column; any other file is plain text; directories are read
recursively. For big corpora and multi-host runs, prepare once: python -m llama_jax.data prepare --help.
--objective dpo and --objective reward read JSONL preference pairs, {"prompt": ..., "chosen": ...,
"rejected": ...} (plain text) or {"messages": [...], "chosen": {assistant message}, "rejected": {...}} (the
checkpoint's chat format).
"""


def build_parser() -> argparse.ArgumentParser:
    from llama_jax.config import ATTENTION_IMPLS, REMAT_POLICIES
    from llama_jax.train.run_config import DEFAULT_MODEL, OBJECTIVES, TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m llama_jax.train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--config", help=f"preset name or config.json path (default: {DEFAULT_MODEL}, the byte-level "
                                    "demo model); ignored when resuming or with --init-from")
    g.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from the weights of a llama_jax checkpoint (or of a training run's --out: OUT/model)")
    g.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                   help="compute dtype (master weights and optimizer state stay float32); "
                        "default bfloat16 on GPU/TPU, float32 on CPU")
    g.add_argument("--remat", choices=tuple(REMAT_POLICIES), help="recompute activations "
                   "in the backward pass to save memory (default: the config's, 'none' for presets)")
    g.add_argument("--attention-impl", choices=ATTENTION_IMPLS, help="attention kernel")

    from llama_jax.lora import TARGETS

    g = p.add_argument_group("LoRA / QLoRA (train adapters on a frozen --init-from base)")
    g.add_argument("--lora-rank", type=int, metavar="R", help="train rank-R adapters A [in, R], B [R, out] on the "
                   "targeted weights instead of the weights themselves; writes OUT/adapters and the merged OUT/model")
    g.add_argument("--lora-alpha", type=float, metavar="A",
                   help="the update is scaled by alpha / rank (default alpha = 2 x rank)")
    g.add_argument("--lora-targets", metavar="W,W", help=f"weights to adapt (default all: {','.join(TARGETS)})")
    g.add_argument("--quantize-base", choices=("int8",), help="hold the frozen base as int8 weights (QLoRA), as "
                   "`infer --quantize int8` does")

    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=list(d.data), metavar="PATH",
                   help="a dataset made by `python -m llama_jax.data prepare`, or text / JSONL / Parquet files and "
                        "directories, prepared into OUT/data on first use (default: a fixed list of Python stdlib "
                        "sources)")
    g.add_argument("--tokenizer", help="'bytes', 'llama3', a tokenizer.model / tokenizer.json path or a checkpoint "
                                       "directory (default: the resumed run's, the --init-from checkpoint's, llama3 "
                                       "for 128k-vocab models, else bytes)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global rows per step, over all devices and processes (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="split each batch into this many sequential microbatches (default %(default)s)")

    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="cosine decay ends at this fraction of --lr (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default %(default)s)")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm,
                   help="global gradient-norm clip, 0 for none (default %(default)s)")
    g.add_argument("--b1", type=float, default=d.b1, help="Adam beta1 (default %(default)s)")
    g.add_argument("--b2", type=float, default=d.b2, help="Adam beta2 (default %(default)s)")
    g.add_argument("--z-loss", type=float, default=d.z_loss,
                   help="weight of the log(Z)^2 auxiliary loss, e.g. 1e-4 (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="init and data-order seed (default %(default)s)")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="lm: next-token loss (pre-training, SFT); dpo: Direct Preference Optimization on preference "
                        "pairs, the initial weights as the reference; reward: a reward model (a score head on the "
                        "last token, zero at the start) trained with the Bradley-Terry loss on preference pairs "
                        "(default %(default)s)")
    g.add_argument("--dpo-beta", type=float, default=d.dpo_beta,
                   help="DPO's beta: how far the policy may move from the reference (default %(default)s)")

    g = p.add_argument_group("mesh and processes")
    g.add_argument("--mesh", default=d.mesh,
                   help="axes and sizes, tp innermost: 'fsdp8', 'dp4,tp8', 'dp2,fsdp-1,tp2' (-1: the rest); cp "
                        "splits each row's tokens (long context: 'fsdp2,cp4'; --seq-len a multiple of 2 x cp); "
                        "default %(default)s, every device as FSDP")
    g.add_argument("--cpu-devices", type=int, default=8,
                   help="fake devices the CPU backend exposes when XLA_FLAGS does not say (default %(default)s)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process: process 0's address")
    g.add_argument("--num-processes", type=int, help="multi-process: how many processes")
    g.add_argument("--process-id", type=int, help="multi-process: this process's index")
    g.add_argument("--distributed", action="store_true",
                   help="multi-process: let jax find the cluster itself (SLURM, Open MPI, TPU pods)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="run directory: checkpoints, metrics, OUT/model (default %(default)s)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval (default %(default)s)")
    g.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept (default %(default)s)")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help="metrics.jsonl / TensorBoard interval (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return p


def train_config(args: argparse.Namespace):
    """The TrainConfig of parsed flags; ValueError (one line) for a bad combination."""
    from llama_jax.train.run_config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["data"] = tuple(args.data)
    values["progress"] = not args.no_progress
    if args.lora_targets is not None:
        values["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return TrainConfig(**values)


def main(argv: list[str] | None = None, hooks=None) -> int:
    """The CLI; `hooks` (loop.Hooks) are for callers that drive it in-process, as the tests do."""
    args = build_parser().parse_args(argv)
    if args.cpu_devices > 1:
        from llama_jax.sharding.mesh import use_cpu_devices

        use_cpu_devices(args.cpu_devices)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from llama_jax.sharding import initialize_distributed
    from llama_jax.train.loop import NonFiniteLoss, train
    from llama_jax.train.report import summary_line

    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
        summary = train(train_config(args), hooks)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    if jax.process_index() == 0:
        print(summary_line(summary))
    return 0


if __name__ == "__main__":
    quiet_abandoned_reads()  # a damaged checkpoint is one line on stderr, nothing after it
    sys.exit(main())
