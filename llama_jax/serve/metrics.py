"""Prometheus metrics of the server, on a registry of its own (so two apps in one process, as in
tests, never share counters). Names follow vLLM's where one exists, with our prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "llama_jax"
# Seconds; CPU decode steps take tens of ms, accelerator steps a few, a queued prefill seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests in the engine's batch", registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests queued for a batch slot", registry=r)
        self.kv_pages_used = Gauge(f"{PREFIX}_kv_pages_used", "KV cache pages in use", registry=r)
        self.kv_pages_total = Gauge(f"{PREFIX}_kv_pages_total", "KV cache pages in all", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated (rate(): tokens/s)",
                                         registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.time_to_first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                             "From a request's arrival to its first token", registry=r,
                                             buckets=LATENCY_BUCKETS)
        # vLLM's spec_decode_num_draft_tokens / _num_accepted_tokens: accepted / draft is the acceptance rate.
        self.spec_draft_tokens = Counter(f"{PREFIX}_spec_decode_num_draft_tokens",
                                         "Tokens proposed by speculative decoding", registry=r)
        self.spec_accepted_tokens = Counter(f"{PREFIX}_spec_decode_num_accepted_tokens",
                                            "Proposed tokens the model accepted", registry=r)
        self._counted = {"proposed_tokens": 0, "accepted_tokens": 0}  # the engine's counts already added
        self.time_per_output_token = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                                               "Between consecutive tokens of a request", registry=r,
                                               buckets=LATENCY_BUCKETS)

    def observe_step(self, stats: dict, new_tokens: int) -> None:
        """After each engine step (engine thread; prometheus_client is thread-safe)."""
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.kv_pages_used.set(stats.get("pages_used", 0))
        self.kv_pages_total.set(stats.get("pages_total", 0))
        self.generation_tokens.inc(new_tokens)
        for name, counter in (("proposed_tokens", self.spec_draft_tokens), ("accepted_tokens", self.spec_accepted_tokens)):
            total = stats.get(name, 0)
            counter.inc(max(0, total - self._counted[name]))
            self._counted[name] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
