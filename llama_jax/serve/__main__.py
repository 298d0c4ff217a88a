"""Serve a llama_jax checkpoint over the OpenAI API (completions, chat completions, streaming).

    python -m llama_jax.serve --checkpoint DIR [--port 8000] [--mesh tp8] [--api-key KEY] [--lora RUN/adapters]
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "DIR-NAME", "messages": [{"role": "user", "content": "Hi"}]}'

Requests are batched continuously over a paged KV cache (llama_jax.infer.engine), allocated at
start for --max-batch sequences of --max-seq-len tokens (its size is printed). On SIGTERM new
requests and /health get 503 while the running ones get --grace-period seconds to finish (then
they are aborted); once none is left the server closes its socket and exits 0. Bad flags or paths
are one line on stderr and exit status 1 (2 for unknown flags), before anything loads.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import jax
import uvicorn

from llama_jax.abandoned_reads import quiet_abandoned_reads
from llama_jax.infer import draft, huge_pages
from llama_jax.infer.engine import BatchingEngine, serving_shapes
from llama_jax import checkpoint
from llama_jax.infer.load import InferenceModel, load_for_inference, tokenizer_path
from llama_jax.quantize import QUANTIZED_DTYPES
from llama_jax.serve.app import create_app, uvicorn_config
from llama_jax.serve.limits import DEFAULT_MAX_REQUEST_BYTES
from llama_jax.sharding import batch_split, make_mesh
from llama_jax.tokenizer import load_tokenizer

API_KEY_ENV = "LLAMA_JAX_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama_jax.serve", description=__doc__.split("\n\n")[0],
                                epilog=huge_pages.HELP)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="llama_jax checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--mesh", metavar="SPEC", help="device mesh, e.g. tp8 or dp2,tp4 (default: one device)")
    p.add_argument("--max-batch", type=int, default=64, metavar="B",
                   help="requests decoded together at most; more wait in the queue (default: %(default)s). The KV "
                        "cache is allocated at start for B sequences of --max-seq-len tokens (or --kv-pages): 2 x "
                        "layers x kv heads x head dim x the dtype's bytes a token, e.g. 64 KiB for Llama-3.2-1B in "
                        "float32, so 64 sequences of its 131072-token context would take 512 GiB: lower "
                        "--max-seq-len, --max-batch or --kv-pages to fit the memory. The server prints the size "
                        "it allocates")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="longest prompt + max_tokens of one request (default: the model's context)")
    p.add_argument("--kv-pages", type=int, metavar="N",
                   help="KV cache pages in all (default: enough for --max-batch requests of --max-seq-len)")
    p.add_argument("--page-size", type=int, default=16, metavar="T", help="tokens per KV cache page (default: %(default)s)")
    p.add_argument("--quantize", choices=tuple(QUANTIZED_DTYPES), help="weight-only quantization")
    p.add_argument("--lora", metavar="DIR",
                   help="LoRA adapters of --checkpoint (a LoRA run's OUT/adapters), served unmerged beside the "
                        "weights as loaded (int8 with --quantize, as a --quantize-base int8 run trained them)")
    p.add_argument("--merge-lora", action="store_true",
                   help="merge --lora into the weights as they load instead (then quantized with --quantize): no "
                        "adapter matmuls per token, but a quantized merge rounds the update")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer file (default: the checkpoint's)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the name clients pass as 'model' (default: the checkpoint directory's name)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}; unset: no key)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                   help="larger request bodies get a 413 before they are read (default: %(default)s, 4 MiB; a "
                        "whole 128k-token context is under 2 MB of JSON)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish before they are aborted "
                        "(default: %(default)s)")
    draft.add_arguments(p)
    return p


def check_args(args) -> None:
    """One-line ValueError for any flag that cannot work whatever the model (load_engine checks the
    others against it, before its weights load; the engine checks its settings again, but only once
    the weights are in memory)."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_batch", "max_seq_len", "kv_pages", "page_size", "max_request_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be >= 0, got {args.grace_period}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    draft.check_arguments(args)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now, so a busy port fails before the model loads."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def load_engine(args, before_weights=None):
    """(BatchingEngine, tokenizer) for the flags: the model loaded by llama_jax.infer.load (as `python
    -m llama_jax.infer` loads it, in the checkpoint's compute dtype: float32 on CPU), every flag
    checked against it first; then `before_weights()`, then its weights load."""
    mesh = make_mesh(args.mesh) if args.mesh else None
    if mesh is not None and args.max_batch % batch_split(mesh):
        raise ValueError(f"--max-batch {args.max_batch} does not divide over the mesh's batch split of "
                         f"{batch_split(mesh)}")

    def check_config(cfg):
        if args.max_seq_len is not None and args.max_seq_len > cfg.max_seq_len:
            raise ValueError(f"--max-seq-len {args.max_seq_len} is longer than the model's context of "
                             f"{cfg.max_seq_len}")
        if args.draft_checkpoint:
            target = load_tokenizer(tokenizer_path(checkpoint.find(args.checkpoint), args.tokenizer))
            draft.check_draft_tokenizer(args.draft_checkpoint, target)
        if before_weights is not None:
            before_weights()

    model = load_for_inference(args.checkpoint, mesh=mesh, quantize=args.quantize, lora=args.lora,
                               merge_lora=args.merge_lora, tokenizer=args.tokenizer, check_config=check_config)
    return make_engine(model, args, draft.with_draft(draft.check_arguments(args), args, model)), model.tokenizer


def make_engine(model: InferenceModel, args, speculative=None) -> BatchingEngine:
    """The serving engine over the loaded model: the one place the server constructs it."""
    return BatchingEngine(model.cfg, model.params, mesh=model.mesh, max_batch=args.max_batch,
                          max_seq_len=args.max_seq_len, page_size=args.page_size, num_pages=args.kv_pages,
                          speculative=speculative,
                          # One call per step, decode rows and a prefill chunk together; a few
                          # running requests do not pay for a full decode batch of padding, in a
                          # handful of programs compiled at start (12 at --max-batch 64).
                          **serving_shapes(args.max_batch, multiple=batch_split(model.mesh)))


def kv_cache_summary(engine) -> str:
    """The KV cache the engine allocated: its bytes and what they hold."""
    pages, size = engine.stats()["pages_total"], engine.page_size
    gib = sum(x.nbytes for x in jax.tree.leaves(engine.pages)) / 2**30
    return (f"KV cache: {gib:.3g} GiB, {pages} pages of {size} tokens ({pages * size} tokens: {engine.max_batch} "
            f"sequences of {engine.max_seq_len} at most, {pages * size // engine.max_seq_len} of them at full length)")


# uvicorn cancels the handlers still running this long after the grace period (a last resort: by
# then the runner has ended their requests with an error the clients can read).
CANCEL_AFTER_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn, draining the app's runner when a signal comes: the socket stays open and new
    requests (and /health) get 503 while the running ones have `grace_period` seconds; once none is
    left, uvicorn's shutdown closes the socket and waits for the last responses. A second signal
    starts that shutdown at once."""

    def __init__(self, config: uvicorn.Config, runner, grace_period: float):
        super().__init__(config)
        self.runner, self.grace_period = runner, grace_period

    def handle_exit(self, sig, frame) -> None:
        if not self.runner.accepting:
            super().handle_exit(sig, frame)
            return
        self.runner.drain(self.grace_period)
        threading.Thread(target=self._exit_when_drained, name="llama_jax-drain", daemon=True).start()

    def _exit_when_drained(self) -> None:
        # The runner aborts what is left after the grace period; the timeout is for an engine
        # thread that died and will never say it drained.
        self.runner.drained.wait(self.grace_period + CANCEL_AFTER_GRACE_S)
        self.should_exit = True  # uvicorn's main loop checks it every 0.1 s


def serve(app, sock: socket.socket, *, grace_period: float = 30.0, log_level: str = "info") -> None:
    """Run `app` on the bound `sock` until SIGTERM or SIGINT, then drain; returns once stopped."""
    config = uvicorn_config(app, timeout_graceful_shutdown=grace_period + CANCEL_AFTER_GRACE_S,
                            log_level=log_level)
    server = DrainingServer(config, app.state.runner, grace_period)
    # uvicorn re-raises the signal it stopped for once it has restored the previous handler; this
    # one absorbs SIGTERM then, so a drained server exits 0 rather than dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        bound = []  # the socket, bound once every flag is checked, so a busy port fails before the weights load
        engine, tokenizer = load_engine(args, before_weights=lambda: bound.append(listen(args.host, args.port)))
        sock, = bound
        print(kv_cache_summary(engine), file=sys.stderr, flush=True)
        engine.warm_up(grammars=True)  # compiled now, not while the first requests wait (JSON and tools too)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, tokenizer, name, api_key=args.api_key, max_request_bytes=args.max_request_bytes)
    host, port = sock.getsockname()[:2]
    print(f"serving {name!r} (context {engine.max_seq_len} tokens, {args.max_batch} batch slots) on "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        serve(app, sock, grace_period=args.grace_period)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    huge_pages.reexec_with_huge_pages("llama_jax.serve")  # once, on CPU: faster decode steps (see its module)
    quiet_abandoned_reads()  # a damaged checkpoint is one line on stderr, nothing after it
    sys.exit(main())
