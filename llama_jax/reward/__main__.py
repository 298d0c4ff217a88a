"""Reward models: score records, and best-of-N sampling (rejection sampling) with a policy.

    python -m llama_jax.reward score --checkpoint RM --data convs.jsonl --out scores.jsonl
    python -m llama_jax.reward best-of-n --policy CKPT --reward-model RM --prompts prompts.jsonl \\
        --num-samples 8 --out best.jsonl          # and best.pairs.jsonl: DPO pairs

A reward model is trained with `python -m llama_jax.train --objective reward` or converted from
Hugging Face (`python -m llama_jax.convert hf`, LlamaForSequenceClassification). Errors are one line
on stderr with exit status 1 (2 for bad flags), never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import jax

from llama_jax import checkpoint
from llama_jax.abandoned_reads import quiet_abandoned_reads
from llama_jax.sharding import make_mesh


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama_jax.reward", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{score,best-of-n}")
    score = sub.add_parser("score", help="one JSON line with 'score' per input record, in input order",
                           description="Score records with a reward model: {\"messages\": [...]} (the last message "
                                       "the assistant's answer, rendered by the model's chat format) or {\"text\": ...}.")
    score.add_argument("--checkpoint", required=True, metavar="DIR", help="the reward model")
    score.add_argument("--data", required=True, metavar="FILE", help="JSONL records to score")
    score.add_argument("--out", required=True, metavar="FILE", help="JSONL scores, one per record, in order")
    best = sub.add_parser("best-of-n", help="K answers per prompt from a policy, the best kept by a reward model",
                          description="Rejection sampling: K answers per prompt from the policy (the prompt prefilled "
                                      "once, shared by its K samples), scored by the reward model; the best as an SFT "
                                      "record, the best and worst as a DPO pair, both read by python -m "
                                      "llama_jax.train unchanged.")
    best.add_argument("--policy", required=True, metavar="DIR", help="the model that answers (a checkpoint)")
    best.add_argument("--reward-model", required=True, metavar="DIR", help="the reward model that scores answers")
    best.add_argument("--prompts", required=True, metavar="FILE",
                      help="JSONL: {\"messages\": [...]} (ending with the turn to answer) or {\"prompt\": ...}")
    best.add_argument("--num-samples", type=int, default=8, metavar="K", help="answers per prompt (default %(default)s)")
    best.add_argument("--out", required=True, metavar="FILE",
                      help="SFT records of the best answers (with every sample and its score); the DPO pairs go "
                           "to OUT's name with .pairs before its suffix; a rerun resumes (OUT.progress)")
    best.add_argument("--temperature", type=float, default=0.8, metavar="T", help="default %(default)s")
    best.add_argument("--top-p", type=float, default=0.95, metavar="P", help="default %(default)s")
    best.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="default %(default)s")
    best.add_argument("--seed", type=int, default=0, metavar="S", help="default %(default)s")
    best.add_argument("--min-score", type=float, metavar="X", help="no SFT record for a prompt whose best scores under X")
    best.add_argument("--min-margin", type=float, metavar="X", help="no DPO pair whose best - worst is under X")
    best.add_argument("--batch-size", type=int, default=8, metavar="B",
                      help="prompts sampled at once, K engine rows each (default %(default)s)")
    for sp in (score, best):
        sp.add_argument("--mesh", metavar="SPEC", help="device mesh, e.g. tp8 or dp2,tp4 (default: one device)")
        sp.add_argument("--score-batch-size", type=int, default=16, metavar="B",
                        help="sequences per reward-model call (default %(default)s)")
        sp.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="compute dtype (default: the checkpoint's; float32 on CPU)")
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def load_reward(path: str, mesh, dtype):
    from llama_jax.infer.load import tokenizer_path
    from llama_jax.reward.model import load
    from llama_jax.tokenizer import load_tokenizer

    directory = checkpoint.find(path)
    tokenizer = load_tokenizer(tokenizer_path(directory))
    cfg, params = load(directory, mesh=mesh, dtype=dtype)
    return cfg, params, tokenizer


def run(args) -> int:
    mesh = make_mesh(args.mesh) if args.mesh else None
    if args.command == "score":
        from llama_jax.reward.score import read_records, score_file

        records = read_records(args.data)  # a bad record fails before the weights load
        cfg, params, tokenizer = load_reward(args.checkpoint, mesh, args.dtype)
        scores = score_file(cfg, params, tokenizer, args.data, args.out, batch_size=args.score_batch_size, mesh=mesh,
                            progress=args.progress, records=records)
        print(f"scored {len(scores)} records: mean {scores.mean():.4g}, min {scores.min():.4g}, max {scores.max():.4g}",
              file=sys.stderr)
        return 0
    from llama_jax.infer.load import load_for_inference
    from llama_jax.reward.best_of_n import Settings, best_of_n, read_prompts

    settings = Settings(args.num_samples, args.temperature, args.top_p, args.max_new_tokens, args.batch_size, args.seed,
                        args.min_score, args.min_margin)
    prompts = read_prompts(args.prompts)  # a bad record fails before any weight loads
    reward = load_reward(args.reward_model, mesh, args.dtype)
    policy = load_for_inference(args.policy, mesh=mesh, dtype=args.dtype)
    summary = best_of_n(policy, reward, args.prompts, args.out, settings, mesh=mesh,
                        reward_batch_size=args.score_batch_size, progress=args.progress, prompts=prompts)
    print(summary.line(), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"error: out of device memory ({str(e).splitlines()[0][:200]}); try a smaller --batch-size or "
              "--score-batch-size, or a mesh over more devices (--mesh)", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    quiet_abandoned_reads()
    sys.exit(main())
