"""Prompt-lookup proposals: the incremental index proposes exactly what a scan of the whole sequence
finds, after every token; the tokens after the latest earlier occurrence of the longest suffix."""

import random

import pytest

from llama_jax.infer.ngram import NgramIndex, propose_ngram


def test_the_tokens_after_the_latest_occurrence_of_the_longest_suffix():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 5, 6, 1, 5, 6]
    # (5, 6) last occurred at 5..7, followed by 1, 5, 6; (9, 5, 6) never recurred.
    assert propose_ngram(tokens, 3) == [1, 5, 6]
    assert NgramIndex(tokens).propose(3) == [1, 5, 6]
    assert NgramIndex(tokens).propose(1) == [1]
    assert NgramIndex([1, 2, 3]).propose(4) == []  # nothing recurs
    assert NgramIndex([4, 4, 4]).propose(2) == [4, 4]  # overlapping: the copy runs on into itself
    assert NgramIndex([7, 1, 2, 1, 2]).propose(5) == [1, 2, 1, 2, 1]  # period 2, proposed 5 ahead
    assert NgramIndex(tokens, min_n=3).propose(2) == []  # no 3-gram recurs


@pytest.mark.parametrize("max_n, min_n, vocab", [(4, 1, 3), (3, 2, 2), (1, 1, 5), (5, 1, 8)])
def test_the_index_equals_a_scan_after_every_token(max_n, min_n, vocab):
    rng = random.Random(max_n * 100 + vocab)
    for _ in range(20):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        index = NgramIndex(max_n=max_n, min_n=min_n)
        for i, token in enumerate(tokens):
            index.append(token)
            for k in (1, 3, 6):
                assert index.propose(k) == propose_ngram(tokens[:i + 1], k, max_n=max_n, min_n=min_n), (tokens[:i + 1], k)


def test_bad_sizes_are_one_line():
    with pytest.raises(ValueError, match="1 <= min_n <= max_n"):
        NgramIndex(max_n=2, min_n=3)
    assert NgramIndex([1, 1]).propose(0) == []
