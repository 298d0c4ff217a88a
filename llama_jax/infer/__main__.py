"""Generate text from a llama_jax checkpoint.

    python -m llama_jax.infer --checkpoint DIR --prompt "The capital of France is" --temperature 0
    python -m llama_jax.infer --checkpoint DIR --chat [--system "You are terse."]
    python -m llama_jax.infer --checkpoint DIR --prompts-file prompts.txt --batch-size 16 > out.jsonl
    python -m llama_jax.infer --checkpoint BASE --lora RUN/adapters --chat   # a LoRA adapter, unmerged

Errors are one line on stderr with exit status 1 (2 for bad flags), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from llama_jax import kernels
from llama_jax.abandoned_reads import quiet_abandoned_reads
from llama_jax.infer import huge_pages
from llama_jax.infer.load import load_for_inference
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.text import Chat, iter_completions, reply
from llama_jax.infer.tokens import Conversation, PromptTooLongError
from llama_jax.quantize import QUANTIZED_DTYPES
from llama_jax.sharding import batch_split, make_mesh

DEFAULT_MAX_NEW_TOKENS = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama_jax.infer", description=__doc__.split("\n\n")[0],
                                epilog=huge_pages.HELP)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="llama_jax checkpoint directory (or a training run's --out: its final model, OUT/model)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", help="complete this text (with --chat: one user turn)")
    source.add_argument("--prompts-file", metavar="F", type=Path,
                        help="one prompt per line, or JSONL with a 'prompt' field; writes JSONL results")
    p.add_argument("--chat", action="store_true",
                   help="the model's chat format (Llama 3's, or its tokenizer's chat template); interactive on "
                        "stdin unless --prompt/--prompts-file")
    p.add_argument("--system", metavar="TEXT", help="system prompt of the chat")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"new tokens per prompt at most, fewer where the model's context ends first; at least 1 "
                        f"and less than the context (default: {DEFAULT_MAX_NEW_TOKENS}, or what the context holds)")
    p.add_argument("--temperature", type=float, default=0.6, metavar="T", help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: off; at most 256")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                   help="in [-2, 2]: subtracted from the logit of every token already generated (OpenAI's)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="in [-2, 2]: subtracted from a token's logit once per time it was generated (OpenAI's)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 0, 1 is off: the logit of a prompt or generated token divided by R if positive, "
                        "multiplied by R otherwise (Hugging Face's and vLLM's)")
    p.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="the stop tokens cannot end a completion before N new tokens")
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="compute and weight dtype (default, as llama_jax.load's: the checkpoint's compute dtype; "
                        "float32 on CPU, where XLA's bfloat16 matmuls are much slower; bfloat16 there halves the "
                        "memory at that cost)")
    p.add_argument("--mesh", metavar="SPEC", help="device mesh, e.g. tp8 or dp2,tp4")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="prompts decoding at once (--prompts-file); a prompt starts as soon as a row is free")
    p.add_argument("--quantize", choices=tuple(QUANTIZED_DTYPES), help="weight-only quantization")
    p.add_argument("--lora", metavar="DIR",
                   help="LoRA adapters of --checkpoint (a LoRA run's OUT/adapters), served unmerged: the base "
                        "weights as loaded (int8 with --quantize, as a --quantize-base int8 run trained them) "
                        "plus alpha/r (x A) B in each adapted projection")
    p.add_argument("--merge-lora", action="store_true",
                   help="merge --lora into the weights as they load instead (W + alpha/r A B, then quantized "
                        "with --quantize): no adapter matmuls per token, but a quantized merge rounds the update")
    p.add_argument("--attention-impl", choices=kernels.IMPLS,
                   help="paged attention for prefill and decode: 'pallas' (our kernels, GPU/TPU) or the XLA "
                        "path, which every other value and the default run")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="'bytes', 'llama3', a tokenizer.model or a Hugging Face tokenizer.json beside its "
                        "tokenizer_config.json, or a checkpoint directory (default: the checkpoint's)")
    p.add_argument("--truncate", action="store_true",
                   help="keep the first and last tokens of a prompt too long for the context, instead of failing")
    p.add_argument("--output", metavar="F", type=Path, help="JSONL results of --prompts-file (default: stdout)")
    return p


def read_prompts(path: Path) -> list[str]:
    """Non-blank lines; JSONL (each line an object with a string 'prompt') when the first starts with '{'."""
    try:
        lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts-file: cannot read {path} ({e})") from None
    if not lines:
        raise ValueError(f"--prompts-file: {path} holds no prompts")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            prompt = None
        if not isinstance(prompt, str):
            raise ValueError(f"--prompts-file: {path} line {n} is not a JSON object with a string 'prompt'")
        prompts.append(prompt)
    return prompts


def run(args, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if not (args.prompt is not None or args.prompts_file or args.chat):
        raise ValueError("nothing to do: pass --prompt TEXT, --prompts-file F or --chat")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Bad sampling values fail before the model loads (the engine's limits: top_k <= MAX_TOP_K).
    RequestParams(max(1, args.min_tokens), args.temperature, args.top_p, args.top_k,
                  presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                  repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None

    def check_budget(stored):  # as the server, before the weights load
        context = stored.max_seq_len
        if args.max_new_tokens is not None and args.max_new_tokens >= context:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {context} tokens (at most {context - 1})")

    mesh = make_mesh(args.mesh) if args.mesh else None
    model = load_for_inference(args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=args.quantize, lora=args.lora,
                               merge_lora=args.merge_lora, tokenizer=args.tokenizer,
                               attention_impl=args.attention_impl, check_config=check_budget)
    cfg, params, tokenizer = model.cfg, model.params, model.tokenizer
    options = dict(max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, mesh=mesh, truncate=args.truncate,
                   presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                   repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens)

    # An interactive chat keeps its KV cache between turns, so each turn prefills only its own
    # tokens (one sequence: not with a mesh that splits the batch, nor with --truncate).
    interactive = prompts is None and args.prompt is None
    conversation = (Conversation(cfg, params, mesh=mesh)
                    if interactive and batch_split(mesh) == 1 and not args.truncate else None)

    def complete(prompt_ids) -> str:
        """Stream one completion to stdout; return its text."""
        write = lambda _, piece: (stdout.write(piece), stdout.flush())  # noqa: E731
        if conversation is None:
            (_, completion), = iter_completions(cfg, params, tokenizer, [prompt_ids], on_text=write, **options)
        else:
            sampling = {k: v for k, v in options.items() if k not in ("mesh", "truncate")}
            completion = reply(conversation, tokenizer, prompt_ids, on_text=write, **sampling)
        stdout.write("\n")
        stdout.flush()
        return completion.text

    if prompts is not None:
        model_prompts = [Chat(tokenizer, args.system).user_turn(p) for p in prompts] if args.chat else prompts
        write_jsonl(cfg, params, tokenizer, prompts, model_prompts, args, options, stdout)
    elif args.prompt is not None:
        complete(Chat(tokenizer, args.system).user_turn(args.prompt) if args.chat else args.prompt)
    else:
        chat_loop(Chat(tokenizer, args.system), complete, stdin, stderr)
    return 0


def write_jsonl(cfg, params, tokenizer, prompts, model_prompts, args, options, stdout):
    """One JSON line per prompt, in the file's order, each written once it and those before it are done."""
    out = open(args.output, "w", encoding="utf-8") if args.output else stdout
    finished, next_index = {}, 0
    try:
        for i, c in iter_completions(cfg, params, tokenizer, model_prompts, batch_size=args.batch_size,
                                     **options):
            finished[i] = c
            while next_index in finished:
                c = finished.pop(next_index)
                record = {"index": next_index, "prompt": prompts[next_index], "completion": c.text,
                          "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                next_index += 1
    finally:
        if out is not stdout:
            out.close()


def chat_loop(chat: Chat, complete, stdin, stderr):
    """One user message per line until EOF or /exit; each answer streams to stdout."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            stderr.write("> ")
            stderr.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if not line.strip():
            continue
        try:
            answer = complete(chat.user_turn(line.rstrip("\n")))
        except PromptTooLongError as e:
            chat.messages.pop()
            stderr.write(f"error: {e} (the conversation is too long; --truncate keeps its end)\n")
            continue
        chat.assistant_turn(answer)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PromptTooLongError as e:
        print(f"error: {e} (pass --truncate to keep its last tokens)", file=sys.stderr)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"error: out of device memory ({str(e).splitlines()[0][:200]}); try --quantize int8, a smaller "
              "--batch-size, or a mesh over more devices (--mesh)", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    huge_pages.reexec_with_huge_pages("llama_jax.infer")  # once, on CPU: faster decode steps (see its module)
    quiet_abandoned_reads()  # a damaged checkpoint is one line on stderr, nothing after it
    sys.exit(main())
