"""What a request asks of the decoding engine and what it gets back, in plain Python (no jax): the
scheduler, the server's protocol and the CLIs share these without loading the model's code.

MAX_TOP_K and MAX_LOGPROBS are shapes of the compiled step (the candidates a row filters with top-k
and top-p, the alternatives it reports), so a request asking for more is refused here, once.

The penalties and biases follow OpenAI's and vLLM's definitions (applied in this order before the
sampling filters, sampling.py has the formulas): repetition_penalty over the prompt and the
generated tokens, presence_penalty and frequency_penalty over the generated tokens, logit_bias, then
min_tokens (the stop tokens banned until that many tokens were generated).
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


def check_penalties(presence_penalty: float, frequency_penalty: float, repetition_penalty: float,
                    logit_bias) -> tuple[tuple[int, float], ...]:
    """Raise a one-line ValueError for a penalty or bias out of its range; logit_bias (a {token id:
    bias} dict or (id, bias) pairs) as sorted (id, bias) pairs. Token ids are checked against the
    vocabulary where it is known (engine.add)."""
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2 <= value <= 2:  # also refuses NaN
            raise ValueError(f"{name} must be in [-2, 2], got {value}")
    if not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {repetition_penalty}")
    pairs = logit_bias.items() if isinstance(logit_bias, dict) else logit_bias
    checked = {}
    for token, bias in pairs:
        if isinstance(token, str) and token.lstrip("-").isdigit():  # JSON object keys are strings
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        if token in checked:
            raise ValueError(f"logit_bias names token {token} twice")
        checked[token] = float(bias)
    return tuple(sorted(checked.items()))


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
    presence_penalty: float = 0.0  # in [-2, 2]: minus this once for every token generated so far
    frequency_penalty: float = 0.0  # in [-2, 2]: minus this times the times a token was generated
    repetition_penalty: float = 1.0  # > 0, 1 = off: a prompt or generated token's logit / r if > 0, else * r
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs; a dict is accepted
    min_tokens: int = 0  # the stop tokens cannot be drawn before this many tokens (<= max_tokens)
    n: int = 1  # samples of the prompt, prefilled once (1 <= n <= the engine's max_batch)
    # A compiled grammar (llama_jax.grammar.CompiledGrammar: `.matcher()` per sample) its tokens must
    # follow, or None. Plain data here: the scheduler asks it for matchers and never imports it.
    grammar: object | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_sampling(self.temperature, self.top_p, self.top_k, max_top_k=MAX_TOP_K)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", check_penalties(self.presence_penalty, self.frequency_penalty,
                                                               self.repetition_penalty, self.logit_bias))
        if (isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int)
                or not 0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")

    @property
    def shapes_logits(self) -> bool:
        """Whether a penalty, a bias or min_tokens changes this request's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or (self.min_tokens and self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class TokenOutput:
    request_id: str
    token_id: int
    logprob: float | None  # when RequestParams.logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...] | None  # when RequestParams.logprobs > 0
    finish_reason: str | None  # None while running; "stop" (a stop token) or "length"
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the prefix cache
    index: int = 0  # which of the request's n samples this token continues (0 .. n-1)


class EngineFullError(RuntimeError):
    """The waiting queue is full."""


__all__ = ["RequestParams", "TokenOutput", "EngineFullError", "check_sampling", "check_penalties",
           "MAX_TOP_K", "MAX_LOGPROBS"]
