"""python -m llama_jax.data prepare: tokenize and pack training data once (see --help)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
inputs: .jsonl/.json files hold one record per line, {"text": ...} or {"messages": [{"role", "content"}, ...]}
(chat: loss on assistant turns only); .parquet files and Hugging Face `datasets` directories (save_to_disk)
give one document per row of --column (or of a 'messages' column); any other file is plain text;
directories are read recursively, in sorted order.

examples:
  python -m llama_jax.data prepare --data corpus/ chats.jsonl --tokenizer llama3 --seq-len 2048 --out data/c2k
  python -m llama_jax.train --data data/c2k --seq-len 2048 --config llama3.2-1b --out runs/1b
  python -m llama_jax.data prepare --data corpus/ --tokenizer bytes --seq-len 256 --out data/demo
  python -m llama_jax.train --data data/demo            # train's default model: byte-level, rows of 256
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama_jax.data",
                                description="Prepare training data: packed rows in ArrayRecord shards + manifest.json.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    q = commands.add_parser("prepare", help="tokenize and pack PATHs into DATA (reused when it already matches)",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--data", nargs="+", required=True, metavar="PATH", help="files or directories")
    q.add_argument("--tokenizer", required=True,
                   help="'bytes' (the byte-level tokenizer of train's default model, kept in ~/.cache/llama_jax), "
                        "'llama3', a tokenizer.model / tokenizer.json path, or a checkpoint directory")
    q.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    q.add_argument("--out", required=True, metavar="DATA", help="the prepared dataset's directory")
    q.add_argument("--workers", type=int, help="tokenizing processes (default: 1 for small inputs, else one per CPU)")
    q.add_argument("--column", default="text", help="Parquet / datasets column holding the text (default %(default)s)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llama_jax.data.prepare import prepare
    from llama_jax.tokenizer import resolve_tokenizer

    try:
        manifest = prepare(args.data, resolve_tokenizer(args.tokenizer), args.seq_len, args.out, workers=args.workers,
                           column=args.column, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {manifest['rows']} rows of {manifest['seq_len']} tokens, {manifest['tokens']} tokens "
          f"({manifest['loss_tokens']} with loss) from {len(manifest['sources'])} source(s), "
          f"{len(manifest['shards'])} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
