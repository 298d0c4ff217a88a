"""Text in, text out: prompts through the tokenizer and the engine, streamed back as complete text.

    result = generate(cfg, params, tokenizer, ["The capital of France is"], max_new_tokens=32,
                      temperature=0)
    result.texts[0], result.token_ids[0], result.finish_reasons[0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

from llama_jax.config import LlamaConfig
from llama_jax.infer import tokens as token_generation
from llama_jax.infer.weights import decode_params
from llama_jax.infer.sampling import SamplingParams

# A token that ends inside a multi-byte UTF-8 character decodes to this replacement character.
_INCOMPLETE = "\ufffd"


class TextStream:
    """Incremental detokenizer: push token ids, get back only text whose characters are complete.

    The ids since the last emitted piece are decoded together; while they end in a partial UTF-8
    character (decoded as U+FFFD) nothing is emitted. They are decoded after the ids of the piece
    before, and only the text they add is emitted: a sentencepiece-style decoder drops the space
    a token starts with at the start of a text ("▁world" alone is "world"). Concatenated pieces plus
    `flush()` equal `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pending: list[int] = []
        self._before: list[int] = []  # the ids of the last emitted piece

    def _added_text(self) -> str:
        before = self.tokenizer.decode(self._before) if self._before else ""
        text = self.tokenizer.decode(self._before + self._pending)
        return text[len(before):] if text.startswith(before) else self.tokenizer.decode(self._pending)

    def push(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._added_text()
        if text.endswith(_INCOMPLETE):
            return ""
        self._before, self._pending = self._pending, []
        return text

    def flush(self) -> str:
        """The held-back rest (a character the stream ended inside decodes as U+FFFD)."""
        text = self._added_text() if self._pending else ""
        self._before, self._pending = [], []
        return text


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]  # the generated ids, without the stop token
    finish_reason: str  # "stop": a stop token came; "length": the token limit or the context end


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Text is encoded with bos (a plain completion); a sequence of ids (a dialog) passes as is."""
    return [tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompts]


def check_tokenizer(cfg: LlamaConfig, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} token ids but the model's vocabulary has "
                         f"{cfg.vocab_size}: they do not belong together")


def iter_completions(cfg: LlamaConfig, params, tokenizer, prompts: Sequence[str | Sequence[int]], *,
                     max_new_tokens: int = 256, temperature: float = 0.6, top_p: float = 0.9, top_k: int = 0,
                     seed: int = 0, batch_size: int | None = None, mesh=None, truncate: bool = False,
                     on_text: Callable[[int, str], None] | None = None, n: int = 1,
                     **penalties) -> Iterator[tuple[int, Completion]]:
    """(index, Completion) as each completion finishes; `on_text(index, piece)` streams the text. The
    index of prompt p's sample i (of n) is p * n + i. penalties: SamplingParams' presence_penalty,
    frequency_penalty, repetition_penalty, logit_bias, min_tokens."""
    check_tokenizer(cfg, tokenizer)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, n=n, **penalties)
    cfg, params = decode_params(cfg, params, mesh)
    events = token_generation.stream_tokens(cfg, params, encode_prompts(tokenizer, prompts), max_new_tokens=max_new_tokens,
                                  sampling=sampling, stop_ids=tokenizer.stop_tokens, seed=seed,
                                  batch_size=batch_size, mesh=mesh, truncate=truncate)
    yield from _completions(events, tokenizer, on_text, n)


def _completions(events, tokenizer, on_text, n: int = 1) -> Iterator[tuple[int, Completion]]:
    """TokenEvents -> (prompt index * n + sample, Completion) as each finishes, streaming text to on_text."""
    running: dict[int, tuple[list[int], TextStream]] = {}  # completion index -> (its new ids, its text stream)
    for event in events:
        index = event.index * n + event.sample
        ids, stream = running.setdefault(index, ([], TextStream(tokenizer)))
        if event.finish_reason is None:
            ids.append(event.token)
            piece = stream.push(event.token) if on_text is not None else ""
        else:
            piece = stream.flush() if on_text is not None else ""
        if piece:
            on_text(index, piece)
        if event.finish_reason is not None:
            del running[index]
            # The streamed pieces concatenate to this same text (TextStream's invariant).
            yield index, Completion(tokenizer.decode(ids), ids, event.finish_reason)


def generate(cfg: LlamaConfig, params, tokenizer, prompts: Sequence[str | Sequence[int]], *,
             max_new_tokens: int = 256, temperature: float = 0.6, top_p: float = 0.9, top_k: int = 0,
             seed: int = 0, batch_size: int | None = None, mesh=None, truncate: bool = False,
             on_text: Callable[[int, str], None] | None = None, n: int = 1, **penalties) -> GenerationResult:
    """Complete every prompt (text, encoded with bos; or a list of token ids, e.g. a dialog).

    temperature 0 is greedy; otherwise top-k (0: off) then top-p sampling, reproducible for a seed
    and independent of batch_size. Generation stops at the tokenizer's stop tokens, after
    `max_new_tokens`, or at the end of the model's context. n: completions per prompt (the prompt
    prefilled once), prompt p's sample i at index p * n + i of the result's lists. penalties:
    SamplingParams' presence_penalty, frequency_penalty, repetition_penalty, logit_bias, min_tokens.

    Computes in cfg.dtype with the params as given: from `llama_jax.load`, float32 on a CPU backend
    unless a dtype was named there (config.compute_dtype, the infer CLI's rule too).
    """
    done = dict(iter_completions(cfg, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 batch_size=batch_size, mesh=mesh, truncate=truncate, on_text=on_text, n=n,
                                 **penalties))
    ordered = [done[i] for i in range(len(prompts) * n)]
    return GenerationResult([c.text for c in ordered], [c.token_ids for c in ordered],
                            [c.finish_reason for c in ordered])


def reply(conversation: token_generation.Conversation, tokenizer, prompt_ids: Sequence[int], *, max_new_tokens: int = 256,
          temperature: float = 0.6, top_p: float = 0.9, top_k: int = 0, seed: int = 0,
          on_text: Callable[[int, str], None] | None = None, **penalties) -> Completion:
    """Complete `prompt_ids` (a whole dialog) in a Conversation: only the tokens after what its cache
    already holds from earlier turns are prefilled. Same tokens as `generate` on the same ids.
    penalties: as generate's."""
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, **penalties)
    events = conversation.stream(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                 stop_ids=tokenizer.stop_tokens, seed=seed)
    (_, completion), = _completions(events, tokenizer, on_text)
    return completion


class Chat:
    """A Llama 3 dialog: its messages so far, and the prompt ids of the next assistant turn."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = [] if not system else [{"role": "system", "content": system}]

    def user_turn(self, text: str) -> list[int]:
        """Add the user's message; the ids to generate the assistant's answer from."""
        self.messages.append({"role": "user", "content": text})
        return self.tokenizer.encode_dialog(self.messages)

    def assistant_turn(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


__all__ = ["generate", "iter_completions", "reply", "GenerationResult", "Completion", "TextStream", "Chat",
           "encode_prompts", "check_tokenizer"]
