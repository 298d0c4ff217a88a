"""Prompt-lookup proposals for speculative decoding (issue #26), in plain Python: the tokens that
followed the latest earlier occurrence of the sequence's last n tokens, n from `max_n` down to
`min_n`. Text that repeats its prompt (editing, extraction, rewriting code) is guessed well by this,
with no second model.

    index = NgramIndex(prompt, max_n=4)
    index.propose(k=4)          # up to 4 guessed next tokens ([] when no n-gram recurs)
    index.append(token)         # each accepted token, O(max_n)

The index keeps, per n-gram, where its latest occurrence ended, updated as tokens are appended, so a
proposal costs O(max_n + k) however long the sequence is (a scan would cost the sequence's length at
every step, for every row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class NgramIndex:
    def __init__(self, tokens: Iterable[int] = (), *, max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._end: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self._earlier: dict[int, int] = {}  # n -> where the current last n tokens occurred before, if they did
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.tokens.append(int(token))
        end = len(self.tokens)
        self._earlier = {}
        for n in range(self.min_n, min(self.max_n, end) + 1):
            gram = tuple(self.tokens[end - n:end])
            before = self._end.get(gram)
            if before is not None:
                self._earlier[n] = before
            self._end[gram] = end

    def propose(self, k: int) -> list[int]:
        """k tokens that followed the latest earlier occurrence of the longest recurring suffix (n from
        max_n down to min_n), continued periodically past the end (_copy); [] when none of them
        occurred before."""
        if k < 1:
            return []
        for n in range(min(self.max_n, len(self.tokens)), self.min_n - 1, -1):
            end = self._earlier.get(n)
            if end is not None:
                return _copy(self.tokens, end, k)
        return []


def propose_ngram(tokens: Sequence[int], k: int, *, max_n: int = 4, min_n: int = 1) -> list[int]:
    """The proposal for a whole sequence at once (what NgramIndex.propose gives after it): a scan,
    for a one-off call and as the index's reference."""
    tokens = list(tokens)
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first, the suffix itself excluded
            if tokens[start:start + n] == suffix:
                return _copy(tokens, start + n, k)
    return []


def _copy(tokens: list[int], start: int, k: int) -> list[int]:
    """k tokens copied from `start` on, the copy running on into itself past the end (as LZ77's
    overlapping copies do): text that repeats with a period p, whose latest earlier match ends p
    tokens before the end, is proposed k tokens ahead, not p."""
    out = tokens[start:start + k]
    period = len(tokens) - start
    while len(out) < k:
        out.append(out[len(out) - period])
    return out


__all__ = ["NgramIndex", "propose_ngram"]
