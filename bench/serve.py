"""Serving under load: the OpenAI server (continuous batching) against static batching (a batch of
the concurrency size admitted only when the previous one is done) on one request trace.

    python -m bench.serve              # Llama-3.2-1B shapes, float32 on CPU (long: tens of minutes)
    python -m bench.serve --quick      # a small model with the real vocabulary, a few minutes
    python -m bench.serve --concurrency 16 --rates inf --requests 64

For each output length distribution, arrival rate and concurrency a trace is drawn (seeded):
Poisson arrivals at `rate` requests/s (inf: all at t=0), prompts of random token ids and uniform
lengths, and a number of output tokens per request, uniform or heavy-tailed (lognormal, like chat
traffic; see OUTPUT_DISTS). Both systems replay it:

- server: `python -m llama_jax.serve`'s app over a BatchingEngine (max batch = the concurrency,
  the static batch's size) in this process, on uvicorn as the CLI runs it, driven over HTTP by an
  asyncio + aiohttp client (a third of httpx's CPU per streamed token: it shares the host's cores)
  in a process of its own that keeps at most `concurrency` requests open (a request arriving while
  all are busy waits for one). Each request is a streamed, greedy completion of its token ids
  with `max_tokens` = its output length and `logprobs: 0`, whose chunks say exactly which tokens
  each carries.
- static: one loop takes up to `concurrency` requests that have arrived, adds them at once to a
  BatchingEngine (same params, slots and decode batches; generate's larger prompt chunks of 1x64,
  1x256 or 4x64 tokens; prefix caching off) with max_tokens = the longest of them, steps it until
  all are done, and waits for the next arrival when none is there: every request of the batch runs
  to the longest's length, and the next batch waits for the whole batch to end, the head-of-line
  blocking continuous batching removes. It runs in this process without HTTP, which favours it.

Each trace is replayed `--repeats` times, server and static alternating (this host's speed drifts
by tens of percent over minutes); each system's row is its run of median throughput, and the ratio
printed is of the medians.

Times count from each request's arrival: time to first token (TTFT) includes waiting for a slot or
a batch; inter-token latency (ITL) is every gap between consecutive tokens of a request; output
tokens/s is all output tokens over the span from the first arrival to the last token. Random
weights (speed does not depend on their values); greedy, so both produce the same tokens. Prints
one markdown table and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import json
import multiprocessing
import os
import socket
import threading
import time

import aiohttp
import jax
import numpy as np
import uvicorn

from llama_jax import LlamaConfig, init_params
from llama_jax.infer.engine import BatchingEngine, serving_shapes

STATIC_CHUNKS = [(1, 64), (1, 256), (4, 64)]  # the static batches' prompt chunks (rows, tokens)
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.huge_pages import reexec_with_huge_pages
from llama_jax.serve.app import create_app, uvicorn_config
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path
from bench.results import append_results, git_commit, machine

SECTION = "## Serving under load (bench/serve.py)"
MODEL = "bench"
# Prompt ids stay below Llama 3's special tokens (128000+), so no prompt holds a stop or header token.
PROMPT_ID_LIMIT = 128000


@dataclasses.dataclass(frozen=True)
class Request:
    arrival: float  # seconds after the trace starts
    prompt: list[int]
    output_len: int


@dataclasses.dataclass
class Timing:
    """When each output token of one request arrived (seconds after the trace starts)."""

    arrival: float
    token_times: list[float] = dataclasses.field(default_factory=list)


def model_config(quick: bool, preset: str, layers: int | None = None) -> LlamaConfig:
    if quick:  # the real vocabulary, so the real tokenizer detokenizes in the server
        return LlamaConfig(vocab_size=128256, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=256,
                           max_seq_len=256, tie_embeddings=True, dtype="float32", param_dtype="float32")
    cfg = LlamaConfig.preset(preset, dtype="float32", param_dtype="float32", max_seq_len=1024)
    return cfg if layers is None else dataclasses.replace(cfg, n_layers=layers)


# Output lengths. Chat traffic is heavy-tailed (ShareGPT, which vLLM's serving benchmarks replay:
# most replies are short, a few are many times longer), and that tail is what static batching pays
# for: every row of a batch runs as long as its longest. "uniform": MIN-MAX uniformly (the old
# trace); "lognormal": exp(N(mu, 1)) with the uniform trace's mean (so the same work on average),
# rounded and clipped to MIN-MAX x LOGNORMAL_SPAN.
OUTPUT_DISTS = ("uniform", "lognormal")
LOGNORMAL_SIGMA = 1.0
LOGNORMAL_SPAN = 4  # the lognormal trace's longest output: 4x the uniform's MAX


def output_range(dist: str, output_lens: tuple[int, int]) -> tuple[int, int]:
    return output_lens if dist == "uniform" else (output_lens[0], LOGNORMAL_SPAN * output_lens[1])


def describe_outputs(dist: str, output_lens: tuple[int, int]) -> str:
    low, high = output_range(dist, output_lens)
    if dist == "uniform":
        return f"uniform {low}-{high}"
    mean = (output_lens[0] + output_lens[1]) / 2
    return f"lognormal (sigma {LOGNORMAL_SIGMA:g}, mean {mean:g}) {low}-{high}"


def make_trace(n: int, rate: float, prompt_lens: tuple[int, int], output_lens: tuple[int, int],
               seed: int, dist: str = "uniform") -> list[Request]:
    rng = np.random.default_rng(seed)
    gaps = np.zeros(n) if rate == float("inf") else rng.exponential(1 / rate, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    if dist == "uniform":  # drawn in the old trace's order, so a seed gives the same trace as before
        return [Request(float(t), rng.integers(0, PROMPT_ID_LIMIT, rng.integers(*prompt_lens, endpoint=True)).tolist(),
                        int(rng.integers(*output_lens, endpoint=True))) for t in arrivals]
    prompts = [rng.integers(0, PROMPT_ID_LIMIT, rng.integers(*prompt_lens, endpoint=True)).tolist() for _ in arrivals]
    mu = np.log((output_lens[0] + output_lens[1]) / 2) - LOGNORMAL_SIGMA ** 2 / 2  # that mean
    outputs = np.clip(np.rint(rng.lognormal(mu, LOGNORMAL_SIGMA, n)), *output_range(dist, output_lens))
    return [Request(float(t), prompt, int(m)) for t, prompt, m in zip(arrivals, prompts, outputs)]


# The server ------------------------------------------------------------------------------------

class Server:
    """The app on uvicorn in a thread, on a free local port."""

    def __init__(self, engine, tokenizer):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(create_app(engine, tokenizer, MODEL), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *_):
        self.server.should_exit = True
        self.thread.join()


async def replay_over_http(url: str, trace: list[Request], concurrency: int) -> list[Timing]:
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as client:
        start = time.perf_counter()

        async def one(request: Request) -> Timing:
            await asyncio.sleep(max(0.0, request.arrival - (time.perf_counter() - start)))
            timing = Timing(request.arrival)
            body = {"model": MODEL, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0,
                    "logprobs": 0, "stream": True}
            async with slots, client.post("/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.content:  # one line at a time
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    choice = json.loads(line.removeprefix(b"data: "))["choices"][0]
                    now = time.perf_counter() - start
                    tokens = len(choice["logprobs"]["tokens"]) if choice["logprobs"] else 0
                    timing.token_times += [now] * tokens
            return timing

        return await asyncio.gather(*(one(r) for r in trace))


class Client:
    """replay_over_http in a process of its own, so the load generator never competes with the
    server's event loop and engine thread for this process's GIL (clients are remote in real use)."""

    def __enter__(self):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_client_process, args=(child,), daemon=True)
        self.process.start()
        return self

    def replay(self, url: str, trace: list[Request], concurrency: int) -> list[Timing]:
        self.conn.send((url, trace, concurrency))
        return self.conn.recv()

    def __exit__(self, *_):
        self.conn.send(None)
        self.process.join()


def _client_process(conn) -> None:
    while (job := conn.recv()) is not None:
        conn.send(asyncio.run(replay_over_http(*job)))


# Static batching -------------------------------------------------------------------------------

def static_batches(trace: list[Request], concurrency: int, clock):
    """Yields the indices of each batch the static loop runs, given clock() -> seconds since the
    start; sleeps until the next arrival when nothing is waiting."""
    i = 0
    while i < len(trace):
        now = clock()
        if trace[i].arrival > now:
            time.sleep(trace[i].arrival - now)
            now = clock()
        j = i
        while j < len(trace) and j - i < concurrency and trace[j].arrival <= now:
            j += 1
        yield list(range(i, j))
        i = j


def replay_static(engine: BatchingEngine, trace: list[Request], concurrency: int) -> list[Timing]:
    timings = [Timing(r.arrival) for r in trace]
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    for batch in static_batches(trace, concurrency, clock):
        longest = RequestParams(max(trace[i].output_len for i in batch), temperature=0.0)
        for i in batch:
            engine.add(str(i), trace[i].prompt, longest, stream=i)
        while engine.has_work():
            for out in engine.step():
                times = timings[int(out.request_id)].token_times
                if len(times) < trace[int(out.request_id)].output_len:  # the rest is the batch's padding
                    times.append(clock())
    return timings


# Report ----------------------------------------------------------------------------------------

def summarize(timings: list[Timing]) -> dict:
    ttft = [t.token_times[0] - t.arrival for t in timings if t.token_times]
    itl = [b - a for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(len(t.token_times) for t in timings)
    span = max(t.token_times[-1] for t in timings if t.token_times) - min(t.arrival for t in timings)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return dict(tokens=tokens, tok_s=tokens / span, ttft50=pct(ttft, 50), ttft99=pct(ttft, 99),
                itl50=pct(itl, 50), itl99=pct(itl, 99))


def median_run(results: list[dict]) -> dict:
    """The run of median throughput (the lower middle one of an even count), whole."""
    return sorted(results, key=lambda r: r["tok_s"])[(len(results) - 1) // 2]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.3g}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model with Llama 3's vocabulary, short requests")
    p.add_argument("--preset", default="llama3.2-1b", help="model shapes without --quick (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None,
                   help="the preset's shapes with fewer layers (a shorter run; the table says how many)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="clients at most in flight")
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help="Poisson arrival rates in requests/s; inf: all at once (default: 4 inf, --quick: 8 inf)")
    p.add_argument("--requests", type=int, default=None, help="requests per trace (default: 2 x concurrency, >= 8)")
    p.add_argument("--prompt-lens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="prompt tokens (default: 32 256, --quick: 8 64)")
    p.add_argument("--output-lens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="output tokens (default: 32 128, --quick: 8 48)")
    p.add_argument("--output-dists", nargs="+", choices=OUTPUT_DISTS, default=list(OUTPUT_DISTS),
                   help="output length distributions, a trace each (default: both; see OUTPUT_DISTS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="replays of each trace per system, alternating; rows are the median runs (default: 3)")
    args = p.parse_args()
    rates = args.rates or ([8.0, float("inf")] if args.quick else [4.0, float("inf")])
    prompt_lens = tuple(args.prompt_lens or ((8, 64) if args.quick else (32, 256)))
    output_lens = tuple(args.output_lens or ((8, 48) if args.quick else (32, 128)))

    if args.layers is not None and (args.quick or args.layers < 1):
        p.error("--layers takes a positive count, without --quick")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    cfg = model_config(args.quick, args.preset, args.layers)
    tokenizer = Llama3Tokenizer(default_tokenizer_path())
    load_before = os.getloadavg()[0]
    print(f"{cfg.num_params() / 1e9:.3f}B params", flush=True)
    params = init_params(cfg, 0)
    rows = []
    with Client() as client:
        for concurrency in args.concurrency:
            # A server with as many batch slots as the static batch has rows: the same capacity.
            # The shapes `python -m llama_jax.serve` compiles.
            shapes = serving_shapes(concurrency)
            engine = BatchingEngine(cfg, params, max_batch=concurrency, **shapes)
            engine.warm_up()
            # Static batching on an engine with generate's larger prompt chunks, from the same
            # per-layer weights; without the prefix cache, which would serve its repeats.
            static_engine = BatchingEngine(engine.cfg, engine.params, max_batch=concurrency,
                                           decode_batches=shapes["decode_batches"], chunk_shapes=STATIC_CHUNKS,
                                           prefix_caching=False)
            static_engine.warm_up()
            with Server(engine, tokenizer) as server:
                client.replay(server.url, make_trace(2, float("inf"), prompt_lens, (2, 2), args.seed), concurrency)
                for dist in args.output_dists:
                    for rate in rates:
                        n = args.requests or max(8, 2 * concurrency)
                        trace = make_trace(n, rate, prompt_lens, output_lens, args.seed, dist)
                        runs = {"server (continuous)": [], "static batches": []}
                        for _ in range(args.repeats):  # alternating, so a drift of the host's speed hits both
                            runs["server (continuous)"].append(summarize(client.replay(server.url, trace,
                                                                                       concurrency)))
                            runs["static batches"].append(summarize(replay_static(static_engine, trace,
                                                                                  concurrency)))
                            print({name: round(r[-1]["tok_s"], 1) for name, r in runs.items()}, flush=True)
                        medians = {name: median_run(r) for name, r in runs.items()}
                        for name, result in medians.items():
                            rows.append((dist, rate, concurrency, n, name, result))
                        served, static = medians.values()
                        print(f"{dist} rate {rate:g}: server / static throughput "
                              f"{served['tok_s'] / static['tok_s']:.2f}x (medians of {args.repeats})", flush=True)
            del engine, static_engine
            gc.collect()

    commit = git_commit("llama_jax/infer", "llama_jax/serve", "llama_jax/model.py", "bench/serve.py")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"commit {commit}{', --quick' if args.quick else ''}")
    server_shapes = ("the server's shapes (serving_shapes: one call per step, decode batches of 1, 4, 8, 16, .. rows "
                     "plus a prompt chunk of 4x16 tokens when there are any)")
    shape = "quick model" if args.quick else f"{args.preset} shapes"
    notes = (f"{shape}: {cfg.num_params() / 1e9:.3f}B params (dim {cfg.dim}, {cfg.n_layers} layers, vocab "
             f"{cfg.vocab_size}), random weights, float32, JAX {jax.__version__} on {jax.default_backend()}; "
             f"prompts uniform {prompt_lens[0]}-{prompt_lens[1]} tokens; outputs (tokens): "
             f"{'; '.join(describe_outputs(d, output_lens) for d in args.output_dists)}; "
             f"greedy; server: max batch = concurrency, "
             f"{server_shapes}, pages of 16; "
             f"static: one call per step (decode batches of 1, 4, 8, 16, .. rows and a prompt chunk of "
             f"1x256, 1x64 or 4x64 when there are prompt tokens) without HTTP, prefix cache off, a batch of the requests waiting "
             f"(at most concurrency), every request of it run to its longest, arrivals meanwhile waiting; each row "
             f"the run of median throughput of {args.repeats}, the systems alternating; load average "
             f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after (a shared host). Times from arrival.")
    table = ["| outputs | rate (req/s) | concurrency | requests | system | output tok/s | TTFT p50 ms | TTFT p99 ms "
             "| ITL p50 ms | ITL p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dist, rate, concurrency, n, name, r in rows:
        table.append(f"| {dist} | {rate:g} | {concurrency} | {n} | {name} | {r['tok_s']:.1f} | {ms(r['ttft50'])} "
                     f"| {ms(r['ttft99'])} | {ms(r['itl50'])} | {ms(r['itl99'])} |")
    text = "\n".join([header, "", notes, "", *table])
    print("\n" + text)
    append_results(SECTION, text)


if __name__ == "__main__":
    reexec_with_huge_pages("bench.serve")  # as `python -m llama_jax.serve` runs (both systems get it)
    main()
