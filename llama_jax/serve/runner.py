"""The one thread that drives the engine, and the asyncio side of each request.

The engine is not thread-safe, so every call into it (add, abort, step) happens on this thread;
the event loop posts commands to a queue and gets each request's TokenOutputs back on an
asyncio.Queue through `loop.call_soon_threadsafe`. Idle, the thread sleeps on a condition variable
that each command notifies.

Prompt scoring (echo with logprobs: infer/score.py) runs here too, between steps, so the device
runs one program at a time and a score never races a step for its memory; the prompts of every
score posted since the last step go through the scorer in one call.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence

from llama_jax.infer.requests import RequestParams

log = logging.getLogger(__name__)


class ShuttingDownError(RuntimeError):
    """The server is draining (SIGTERM): it finishes what it has and takes nothing new."""


class EngineError(RuntimeError):
    """The engine failed while this request was in it; the request has been aborted."""


class EngineRequest:
    """One request's view of the engine: each of its n samples' TokenOutputs in order, and abort()."""

    def __init__(self, runner: EngineRunner, request_id: str, prompt_len: int, params: RequestParams):
        self.runner, self.id, self.prompt_len, self.params = runner, request_id, prompt_len, params
        n = getattr(params, "n", 1)
        self.queues = [asyncio.Queue() for _ in range(n)]  # per sample: TokenOutput, or an EngineError
        self.done = [False] * n  # per sample: its last output read, or it was aborted
        self.ended_samples: set[int] = set()  # (engine thread only) those the engine finished or was told to abort
        self.arrival = time.monotonic()
        self._last_token_time = [self.arrival] * n
        self._first_token = True

    @property
    def finished(self) -> bool:
        return all(self.done)

    async def next(self, index: int = 0):
        """Sample `index`'s next TokenOutput; raises EngineError when the engine failed or stopped under it."""
        output = await self.queues[index].get()
        if isinstance(output, BaseException):
            self.done = [True] * len(self.done)
            raise output
        if output.finish_reason is not None:
            self.done[index] = True
        self._observe_latency(index)
        return output

    def _observe_latency(self, index: int) -> None:
        metrics, now = self.runner.metrics, time.monotonic()
        if metrics is not None:  # the request's first token, then each sample's gaps between its tokens
            first, self._first_token = self._first_token, False
            latency = metrics.time_to_first_token if first else metrics.time_per_output_token
            latency.observe(now - (self.arrival if first else self._last_token_time[index]))
        self._last_token_time[index] = now

    def abort(self, index: int | None = None) -> None:
        """Stop sample `index` (None: every sample), freeing its slot and pages; once none is left
        running, the whole request's. A no-op for samples that finished."""
        indices = range(len(self.done)) if index is None else [index]
        if all(self.done[i] for i in indices):
            return
        for i in indices:
            self.done[i] = True
        if self.finished:
            self.runner.post("abort", self.id)
        else:  # a stop string ended this sample while the others go on
            self.runner.post("abort", self.id, index)


class EngineRunner:
    def __init__(self, engine, metrics=None, scorer=None):
        """scorer: an infer/score.Scorer (called with (prompts, top_n), prepared with prompt lengths), or None."""
        self.engine = engine
        self.metrics = metrics
        self.scorer = scorer
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._live: dict[str, tuple[asyncio.AbstractEventLoop, EngineRequest]] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="llama_jax-engine", daemon=True)
        self.accepting = True
        self.drained = threading.Event()  # set once draining (or stopped) with no request left in the engine

    # Event-loop side.

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def drain(self, grace_period: float) -> None:
        """Turn new requests away (ShuttingDownError) from now on; the running ones go on for
        `grace_period` seconds, then end with an EngineError (their clients get an error, not a cut
        connection). `drained` is set once none is left."""
        if self.accepting:
            self.accepting = False
            self.post("drain")  # an idle engine thread wakes to find nothing left
            timer = threading.Timer(grace_period, self.post, args=("abort_all",))
            timer.daemon = True
            timer.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the thread and wait for it."""
        self.accepting = False
        self.post("stop")
        self._thread.join(timeout)

    async def submit(self, request_id: str, prompt_ids: Sequence[int], params: RequestParams) -> EngineRequest:
        """Add a request; raises here what engine.add raises (EngineFullError, ValueError)."""
        if not self.accepting or not self.alive():
            raise ShuttingDownError("the server is shutting down")
        loop = asyncio.get_running_loop()
        request = EngineRequest(self, request_id, len(prompt_ids), params)
        added = loop.create_future()
        self.post("add", request, list(prompt_ids), loop, added)
        try:
            await added
        except asyncio.CancelledError:
            # The add still happens on the engine thread: the abort, queued after it, undoes it.
            request.abort()
            raise
        return request

    async def score(self, prompt_ids: Sequence[int], top_n: int):
        """The prompt's PromptLogprobs, computed on the engine thread; raises ValueError for a prompt
        the scorer refuses, EngineError when it fails. Its program is compiled first, in a worker
        thread (scorer.prepare), so the engine thread runs it without stalling the steps."""
        if not self.accepting or not self.alive():
            raise ShuttingDownError("the server is shutting down")
        if self.scorer is None:
            raise ValueError("this server cannot score prompts (no scorer for its engine)")
        await asyncio.to_thread(self.scorer.prepare, [len(prompt_ids)])
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.post("score", list(prompt_ids), top_n, loop, done)
        return await done

    def post(self, *command) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # Engine-thread side.

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self.engine.has_work():
                    self._wake.wait()
                commands = list(self._commands)
                self._commands.clear()
            for i, command in enumerate(commands):
                if command[0] == "stop":  # the scores posted before it are not run either
                    self._shut([c for c in commands[:i] if c[0] == "score"] + commands[i + 1:])
                    return
                if command[0] != "score":
                    self._apply(*command)
            self._score([command[1:] for command in commands if command[0] == "score"])
            new_tokens = self._step() if self.engine.has_work() else 0
            if self.metrics is not None:  # after aborts too: they free pages without a step
                self.metrics.observe_step(self.engine.stats(), new_tokens)
            if not self.accepting and not self._live:
                self.drained.set()

    def _apply(self, kind: str, *args) -> None:
        if kind == "add":
            request, prompt_ids, loop, added = args
            if not self.accepting:  # submitted just before a drain began: nothing joins after it
                loop.call_soon_threadsafe(_settle, added, ShuttingDownError("the server is shutting down"))
                return
            try:
                self.engine.add(request.id, prompt_ids, request.params)
            except Exception as e:  # noqa: BLE001 (handed to the request's handler, which maps it to a status)
                loop.call_soon_threadsafe(_settle, added, e)
                return
            self._live[request.id] = (loop, request)
            loop.call_soon_threadsafe(_settle, added, None)
        elif kind == "abort":
            request_id, *index = args
            if not index:
                self.engine.abort(request_id)
                self._live.pop(request_id, None)
                return
            loop, request = self._live.get(request_id, (None, None))
            if request is not None and index[0] not in request.ended_samples:
                self.engine.abort(request_id, index[0])
                self._sample_ended(request, index[0])
        elif kind == "drain":
            pass  # the loop sets `drained` when nothing is left
        elif kind == "abort_all":
            self._fail_all(EngineError("the server is shutting down and aborted this request after its grace period"))

    def _score(self, scores) -> None:
        """Every posted score in one scorer call (each future gets its own prompt's, with its own
        number of alternatives), or each the call's error."""
        if not scores:
            return
        try:
            scored = self.scorer([prompt for prompt, *_ in scores], max(top_n for _, top_n, *_ in scores))
        except Exception as e:  # noqa: BLE001 (handed to each request's handler)
            if not isinstance(e, ValueError):
                log.exception("prompt scoring failed")
                e = EngineError(f"scoring the prompt failed: {type(e).__name__}: {e}")
            for _, _, loop, done in scores:
                loop.call_soon_threadsafe(_settle, done, e)
            return
        for (_, top_n, loop, done), result in zip(scores, scored):
            result = result._replace(top=[None if t is None else t[:top_n] for t in result.top])
            loop.call_soon_threadsafe(_settle, done, None, result)

    def _step(self) -> int:
        """One engine step, its outputs sent to their requests; the number of new tokens."""
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 (the server stays up; the requests in the engine end)
            log.exception("engine step failed; aborting its %d requests", len(self._live))
            self._fail_all(EngineError(f"the engine failed: {type(e).__name__}: {e}"))
            return 0
        # One wake-up of each event loop per step, not one per token: every call_soon_threadsafe
        # writes to the loop's self-pipe, and the loop shares this process's cores with the step.
        deliveries = collections.defaultdict(list)
        for output in outputs:
            loop, request = self._live.get(output.request_id, (None, None))
            if request is None or output.index in request.ended_samples:  # aborted since the step began
                continue
            if output.finish_reason is not None:
                self._sample_ended(request, output.index)
            deliveries[loop].append((request, output))
        for loop, pairs in deliveries.items():
            loop.call_soon_threadsafe(_deliver, pairs)
        return len(outputs)

    def _sample_ended(self, request: EngineRequest, index: int) -> None:
        """Count a sample out (only this thread counts); the request leaves with its last."""
        request.ended_samples.add(index)
        if len(request.ended_samples) == len(request.queues):
            del self._live[request.id]

    def _shut(self, unapplied) -> None:
        self._fail_all(EngineError("the server stopped before this request finished"))
        self.drained.set()
        for kind, *args in unapplied:
            if kind in ("add", "score"):
                *_, loop, done = args
                loop.call_soon_threadsafe(_settle, done, ShuttingDownError("the server is shutting down"))

    def _fail_all(self, error: EngineError) -> None:
        for request_id, (loop, request) in list(self._live.items()):
            self.engine.abort(request_id)
            loop.call_soon_threadsafe(_fail, request, error)
        self._live.clear()


def _fail(request: EngineRequest, error: EngineError) -> None:
    for queue in request.queues:
        queue.put_nowait(error)


def _deliver(pairs) -> None:
    for request, output in pairs:
        request.queues[output.index].put_nowait(output)


def _settle(future: asyncio.Future, error: BaseException | None, result=None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
