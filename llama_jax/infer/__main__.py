"""Generate text from a llama_jax checkpoint.

    python -m llama_jax.infer --checkpoint DIR --prompt "The capital of France is" --temperature 0
    python -m llama_jax.infer --checkpoint DIR --chat [--system "You are terse."]
    python -m llama_jax.infer --checkpoint DIR --prompts-file prompts.txt --batch-size 16 > out.jsonl
    python -m llama_jax.infer --checkpoint BASE --lora RUN/adapters --chat   # a LoRA adapter, unmerged
    python -m llama_jax.infer --checkpoint DIR --prompt "A person:" --json-schema person.json
    python -m llama_jax.infer --checkpoint DIR --chat --tools tools.json   # then "tool: RESULT" lines
    python -m llama_jax.infer --checkpoint DIR --prompt "..." --speculative ngram   # exact, faster on repeats

At the end a line on stderr says how many tokens were generated, in how many seconds (compiling
included), and with speculation how many proposed tokens were accepted. Errors are one line on
stderr with exit status 1 (2 for bad flags), never a traceback.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import jax

from llama_jax import checkpoint, kernels
from llama_jax.abandoned_reads import quiet_abandoned_reads
from llama_jax.infer import draft, huge_pages
from llama_jax.infer.load import load_for_inference, tokenizer_path
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.structured import grammar_compiler, output_grammar
from llama_jax.infer.text import Chat, check_tokenizer, iter_completions
from llama_jax.infer.tokens import Conversation, PromptTooLongError
from llama_jax.jsonfile import read_json_object, read_json_text
from llama_jax.tokenizer import load_tokenizer
from llama_jax.tools.turn import turn_grammar
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
    structure = p.add_mutually_exclusive_group()
    structure.add_argument("--json-schema", metavar="FILE", type=Path,
                           help="answers follow this JSON schema (a file), valid by construction; a keyword the "
                                "grammar engine cannot enforce is an error, as the server's response_format")
    structure.add_argument("--json-object", action="store_true", help="answers are a JSON object")
    p.add_argument("--tools", metavar="FILE", type=Path,
                   help="with --chat: a JSON list of OpenAI tool definitions ({type: function, function: {name, "
                        "description, parameters}}). A turn that calls tools prints one line per call, 'tool call: "
                        "NAME ARGUMENTS-JSON'; answer each call with a line 'tool: RESULT' (in order), and the "
                        "model goes on once every call has its result")
    p.add_argument("--tool-choice", metavar="C", default=None,
                   help="auto (default with --tools), required, none, or a tool's name (that tool, called once)")
    p.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_false",
                   help="at most one call a turn")
    p.add_argument("--tool-format", choices=("json", "pythonic"), default="json",
                   help="Llama 3's call syntax: json (3.1, 3.3) or pythonic (3.2 1B / 3B); an HF chat template "
                        "defines its own")
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
    draft.add_arguments(p)
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


def read_tools(path: Path) -> list:
    """The tool definitions in the file: a JSON list (or an object with a "tools" list, a request body)."""
    try:
        value = json.loads(read_json_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"--tools {path}: not valid JSON ({e})") from None
    except ValueError as e:
        raise ValueError(f"--tools {e}") from None
    if isinstance(value, dict) and isinstance(value.get("tools"), list):
        value = value["tools"]
    if not isinstance(value, list) or not value:
        raise ValueError(f"--tools {path}: expected a non-empty JSON list of tool definitions")
    return value


def tool_choice(choice: str | None):
    """--tool-choice as OpenAI's tool_choice: a mode, or a tool's name as a named choice."""
    if choice is None or choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def structure_options(args) -> dict:
    """--json-schema / --json-object as text.Chat.reply's and generate's keyword arguments."""
    if args.json_schema is not None:
        try:
            return {"json_schema": read_json_object(args.json_schema)}
        except ValueError as e:
            raise ValueError(f"--json-schema {e}") from None
    return {"response_format": {"type": "json_object"}} if args.json_object else {}


def check_structure(args, stored, structure: dict, tools: list | None) -> None:
    """The schema and the tools compiled for the checkpoint's tokenizer before a weight loads (into the
    process's grammar cache, so the turns compile nothing): a bad one is one line, not a late failure."""
    if not structure and tools is None and args.tool_choice is None:
        return
    tokenizer = load_tokenizer(tokenizer_path(checkpoint.find(args.checkpoint), args.tokenizer))
    check_tokenizer(stored, tokenizer)
    compiler = grammar_compiler(tokenizer, stored.vocab_size)
    if structure:
        try:
            output_grammar(tokenizer, stored.vocab_size, **structure)
        except ValueError as e:
            message = str(e).removeprefix("json_schema: ")
            raise ValueError(f"--json-schema {args.json_schema}: {message}" if args.json_schema else message) from None
    if not args.chat:
        return
    where = f"--tools {args.tools}" if args.tools else "--tool-choice"
    try:
        calling = new_chat(args, tokenizer, tools).calling
        turn_grammar(compiler, calling, None)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if calling is not None and calling.grammar is not None and structure:
        raise ValueError(f"{'--json-schema' if args.json_schema else '--json-object'} with --tools: pass "
                         f"--tool-choice none for a structured answer")


def new_chat(args, tokenizer, tools: list | None) -> Chat:
    if tools is None and args.tool_choice is None:
        return Chat(tokenizer, args.system)
    return Chat(tokenizer, args.system, tools=tools, tool_choice=tool_choice(args.tool_choice),
                parallel_tool_calls=args.parallel_tool_calls, tool_format=args.tool_format)


def run(args, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if not (args.prompt is not None or args.prompts_file or args.chat):
        raise ValueError("nothing to do: pass --prompt TEXT, --prompts-file F or --chat")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if (args.tools or args.tool_choice) and not args.chat:
        raise ValueError("--tools and --tool-choice need --chat")
    if args.tools and args.prompts_file:
        raise ValueError("--tools answers one chat (--chat, with --prompt or on stdin), not a --prompts-file")
    # Bad sampling values fail before the model loads (the engine's limits: top_k <= MAX_TOP_K).
    RequestParams(max(1, args.min_tokens), args.temperature, args.top_p, args.top_k,
                  presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                  repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens)
    speculative = draft.check_arguments(args)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None
    structure = structure_options(args)
    tools = read_tools(args.tools) if args.tools else None

    def check_budget(stored):  # as the server, before the weights load
        context = stored.max_seq_len
        if args.max_new_tokens is not None and args.max_new_tokens >= context:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {context} tokens (at most {context - 1})")
        check_structure(args, stored, structure, tools)
        if args.draft_checkpoint:
            draft.check_draft_tokenizer(args.draft_checkpoint,
                                        load_tokenizer(tokenizer_path(checkpoint.find(args.checkpoint), args.tokenizer)))

    mesh = make_mesh(args.mesh) if args.mesh else None
    model = load_for_inference(args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=args.quantize, lora=args.lora,
                               merge_lora=args.merge_lora, tokenizer=args.tokenizer,
                               attention_impl=args.attention_impl, check_config=check_budget)
    cfg, params, tokenizer = model.cfg, model.params, model.tokenizer
    speculative = draft.with_draft(speculative, args, model)
    counters, seconds = collections.Counter(), [0.0]  # the engines' counters; the seconds spent generating
    sampling = dict(max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                    min_tokens=args.min_tokens, **structure)
    options = dict(sampling, mesh=mesh, truncate=args.truncate, speculative=speculative, counters=counters)

    def write(*index_and_piece):  # on_text of iter_completions (index, piece) and of Chat.reply (piece)
        stdout.write(index_and_piece[-1])
        stdout.flush()

    start = time.perf_counter()
    if prompts is not None:
        model_prompts = [new_chat(args, tokenizer, None).user_turn(p) for p in prompts] if args.chat else prompts
        write_jsonl(cfg, params, tokenizer, prompts, model_prompts, args, options, stdout)
    elif not args.chat:
        (_, _), = iter_completions(cfg, params, tokenizer, [args.prompt], on_text=write, **options)
        stdout.write("\n")
    else:
        # An interactive chat keeps its KV cache between turns, so each turn prefills only its own
        # tokens (one sequence: not with a mesh that splits the batch, nor with --truncate).
        interactive = args.prompt is None
        target = (Conversation(cfg, params, mesh=mesh, speculative=speculative)
                  if interactive and batch_split(mesh) == 1 and not args.truncate else model)
        truncate = args.truncate if target is model else False
        generating = {} if target is not model else dict(speculative=speculative, counters=counters)

        def answer(chat: Chat, message: str | None):
            """Stream one turn's content to stdout, then its calls, one line each."""
            began = time.perf_counter()
            try:
                turn = chat.reply(target, message, on_text=write, truncate=truncate, **sampling, **generating)
            finally:
                seconds[0] += time.perf_counter() - began
            if turn.content is not None or not turn.tool_calls:
                stdout.write("\n")
            calls = turn.complete_calls()
            for call in calls:  # one line each: the arguments as compact JSON, whatever white space the model wrote
                arguments = json.dumps(json.loads(call["function"]["arguments"]), ensure_ascii=False)
                stdout.write(f"tool call: {call['function']['name']} {arguments}\n")
            stdout.flush()
            if len(calls) < len(turn.tool_calls):
                stderr.write(f"(a call to {turn.tool_calls[len(calls)]['function']['name']} was cut at "
                             f"--max-new-tokens: left out)\n")

        chat = new_chat(args, tokenizer, tools)
        if args.prompt is not None:
            answer(chat, args.prompt)
        else:
            chat_loop(chat, answer, stdin, stderr)
        if target is not model and target.engine is not None:
            counters.update(target.engine.counters)
    if not args.chat or prompts is not None:
        seconds[0] = time.perf_counter() - start
    stderr.write(draft.summary(counters, seconds[0]) + "\n")
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


def chat_loop(chat: Chat, answer, stdin, stderr):
    """One user message per line until EOF or /exit; each answer streams to stdout. With tools, a line
    'tool: RESULT' is the result of the next call of the last turn that has none; once every call has
    its result, the model answers."""
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
        message = line.rstrip("\n")
        if chat.calling is not None and message.startswith("tool:"):
            if not chat.pending_calls():
                stderr.write("error: no tool call waits for a result (a 'tool:' line answers the last turn's calls)\n")
                continue
            chat.tool_result(message[len("tool:"):].strip())
            if chat.pending_calls():
                continue
            message = None
        elif interactive and chat.pending_calls():
            stderr.write("(the calls above wait for results: 'tool: RESULT' lines)\n")
        try:
            answer(chat, message)
        except PromptTooLongError as e:  # the dialog is left as it was before this line
            stderr.write(f"error: {e} (the conversation is too long; --truncate keeps its end)\n")


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
