"""What a request asks of the decoding engine and what it gets back, in plain Python (no jax): the
scheduler, the server's protocol and the CLIs share these without loading the model's code.

MAX_TOP_K and MAX_LOGPROBS are shapes of the compiled step (the candidates a row filters with top-k
and top-p, the alternatives it reports), so a request asking for more is refused here, once.
"""

from __future__ import annotations

import dataclasses

MAX_TOP_K = 256  # the candidates a row's top-k / top-p filter keeps at most (sampling.sample_rows)
MAX_LOGPROBS = 20  # the most likely alternatives reported per token at most


def check_sampling(temperature: float, top_p: float, top_k: int, *, max_top_k: int | None = None) -> None:
    """Raise a one-line ValueError for a setting no sampler accepts (every sampling setting is checked here)."""
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0 or (max_top_k is not None
                                                                              and top_k > max_top_k):
        bound = "an integer >= 0" if max_top_k is None else f"an integer in [0, {max_top_k}]"
        raise ValueError(f"top_k must be {bound}, got {top_k!r}")


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """Per-request settings, carried as data in the batch (no recompiles)."""

    max_tokens: int  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; at most MAX_TOP_K
    seed: int | None = None  # None: the engine picks one; same seed + same prompt -> same tokens
    stop_token_ids: tuple[int, ...] = ()  # ends the request (finish_reason "stop"), reported as its last token
    logprobs: int | None = None  # None: none; 0: the chosen token's; n > 0: also the top n (n <= MAX_LOGPROBS)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_sampling(self.temperature, self.top_p, self.top_k, max_top_k=MAX_TOP_K)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class TokenOutput:
    request_id: str
    token_id: int
    logprob: float | None  # when RequestParams.logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...] | None  # when RequestParams.logprobs > 0
    finish_reason: str | None  # None while running; "stop" (a stop token) or "length"
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the prefix cache


class EngineFullError(RuntimeError):
    """The waiting queue is full."""


__all__ = ["RequestParams", "TokenOutput", "EngineFullError", "check_sampling", "MAX_TOP_K", "MAX_LOGPROBS"]
