"""A random "model" for grammar tests: each step samples uniformly among the tokens the matcher's
bitmask allows, so every branch of a grammar gets exercised and nothing but the mask keeps the
output valid."""

from __future__ import annotations

import numpy as np


def allowed_ids(row_W: np.ndarray, vocab_size: int) -> np.ndarray:
    """The ids whose bit is set in a bitmask row (bit t % 32 of word t // 32), as the engine reads it."""
    return np.flatnonzero(np.unpackbits(row_W.view(np.uint8), bitorder="little")[:vocab_size])


def sample_allowed(row_W: np.ndarray, rng: np.random.Generator) -> int:
    """A uniformly random id among those row_W allows, without listing all of them (Llama 3 allows
    ~10^5 inside a string): the k-th set bit, found through per-word bit counts."""
    counts = np.bitwise_count(row_W)
    cumulative = np.cumsum(counts, dtype=np.int64)
    k = int(rng.integers(cumulative[-1]))
    word = int(np.searchsorted(cumulative, k, side="right"))
    before = int(cumulative[word]) - int(counts[word])
    return word * 32 + int(allowed_ids(row_W[word:word + 1], 32)[k - before])


def random_walk(matcher, rng: np.random.Generator, max_tokens: int, prefix=()) -> tuple[list[int], bool]:
    """Tokens sampled under the grammar (after forcing `prefix`), until the matcher is finished or a
    stop token is sampled, or max_tokens. Returns (tokens, finished)."""
    vocabulary = matcher.vocabulary
    row = np.zeros(vocabulary.mask_words, np.uint32)
    tokens = []
    for token in prefix:
        assert matcher.accept(token), matcher.error
        tokens.append(token)
    while len(tokens) < max_tokens and not matcher.is_finished():
        matcher.fill(row)
        token = sample_allowed(row, rng)
        assert matcher.accept(token), matcher.error
        tokens.append(token)
    return tokens, matcher.is_finished()


def text_of(tokenizer, tokens, stop_tokens) -> str:
    """The response text: the tokens before a final stop token."""
    if tokens and tokens[-1] in stop_tokens:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)
