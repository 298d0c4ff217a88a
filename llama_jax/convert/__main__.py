"""Convert Llama 3 checkpoints to and from llama_jax's checkpoint directory.

    python -m llama_jax.convert meta  SRC DST    Meta download (params.json, consolidated.NN.pth)
    python -m llama_jax.convert hf    SRC DST    Hugging Face model directory (safetensors)
    python -m llama_jax.convert to-hf SRC DST    our checkpoint -> Hugging Face model directory
"""

from __future__ import annotations

import argparse
import sys
import warnings

from llama_jax.abandoned_reads import quiet_abandoned_reads

_DTYPES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")

_DESCRIPTION = """\
Convert Llama 3 / 3.1 / 3.2 text models. DST is written into a temporary directory beside it and
renamed into place when complete: an error or an interrupt leaves nothing at DST. Conversion
streams one tensor at a time, so it needs memory for the largest tensor, not for the model.
"""

_META_HELP = """\
SRC is a Meta download: params.json, consolidated.00.pth .. consolidated.NN.pth (any model-parallel
split Meta ships: 1 for 1B/3B/8B, 8 for 70B, 8 or 16 for 405B) and tokenizer.model. DST becomes a
llama_jax checkpoint (config.json, params/, tokenizer.model) that `python -m llama_jax.infer
--checkpoint DST` runs as it is. The .pth files are read without torch, by an unpickler that
builds only tensors and containers: a file whose pickle would run code is refused.
"""

_HF_HELP = """\
SRC is a Hugging Face Llama directory: config.json (transformers 4.x or 5.x) and model.safetensors
or model.safetensors.index.json with its shards. HF's rotary permutation of q/k is undone, tied
embeddings stay tied. Any Llama-architecture model converts (SmolLM, TinyLlama, ...). The tokenizer
comes along: original/tokenizer.model when present, else a Llama 3 tokenizer.json converted to
tiktoken ranks, else any other tokenizer.json as it is, with its tokenizer_config.json (chat
template), chat_template.jinja and generation_config.json, which infer and train then use. A reward
model (LlamaForSequenceClassification with num_labels=1) becomes a llama_jax reward checkpoint
(llama_jax.reward); other num_labels are refused.
"""

_TO_HF_HELP = """\
SRC is a llama_jax checkpoint; DST becomes a directory that
transformers.LlamaForCausalLM.from_pretrained(DST) loads: config.json, generation_config.json,
sharded safetensors with model.safetensors.index.json, and original/tokenizer.model. A Llama 3
tokenizer also becomes tokenizer.json and tokenizer_config.json (with the chat template), which
transformers.AutoTokenizer.from_pretrained(DST) loads; another model's tokenizer files, carried
from `convert hf`, are copied as they are. A reward checkpoint (llama_jax.reward) becomes a
transformers.LlamaForSequenceClassification with num_labels=1 and a pad_token_id set, by which
transformers finds each row's last token: pad batches with that id.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{meta,hf,to-hf}")

    def command(name, help, description):
        sub = commands.add_parser(name, help=help, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("src", metavar="SRC", help="directory to convert")
        sub.add_argument("dst", metavar="DST", help="directory to create")
        sub.add_argument("--dtype", choices=_DTYPES, help="storage dtype of the converted weights "
                         "(default: the source's own; bfloat16 stays bfloat16)")
        sub.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        return sub

    meta = command("meta", "Meta download -> llama_jax checkpoint", _META_HELP)
    meta.add_argument("--rope-scaling-factor", type=float, metavar="F",
                      help="Llama 3.1 rope scaling factor (params.json has none; default: that of the released "
                           "model with the same shapes: 8 for 3.1, 32 for 3.2 1B/3B)")
    command("hf", "Hugging Face model directory -> llama_jax checkpoint", _HF_HELP)
    to_hf = command("to-hf", "llama_jax checkpoint -> Hugging Face model directory", _TO_HF_HELP)
    to_hf.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                       help="largest safetensors file, e.g. 5GB, 500MB (default: 5GB)")
    to_hf.add_argument("--base", action="store_true",
                       help="a base (pretrained) model: stop generation only at <|end_of_text|>. By default "
                            "<|eom_id|> and <|eot_id|> stop it too, as instruct models need, when the checkpoint "
                            "has a Llama 3 tokenizer")
    return parser


def run(args: argparse.Namespace) -> None:
    common = dict(dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    if args.command == "meta":
        from llama_jax.convert.meta import convert_meta

        out = convert_meta(args.src, args.dst, rope_scaling_factor=args.rope_scaling_factor, **common)
    elif args.command == "hf":
        from llama_jax.convert.hf import convert_hf

        out = convert_hf(args.src, args.dst, **common)
    else:
        from llama_jax.convert.export_hf import export_hf, parse_size

        out = export_hf(args.src, args.dst, max_shard_size=parse_size(args.max_shard_size), base=args.base,
                        **common)
    print(f"wrote {out}")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0, 1 for a conversion error (one line on stderr),
    2 for a usage error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            run(args)
    except ValueError as e:
        message = " ".join(str(e).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written at DST", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    quiet_abandoned_reads()  # a damaged checkpoint is one line on stderr, nothing after it
    sys.exit(main())
