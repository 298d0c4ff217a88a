"""Token ids against a vocabulary: the one check of the model's inputs, a request's prompt and a
tokenizer's decode. numpy only, so a tokenizer or the server imports it without jax."""

from __future__ import annotations

import numpy as np


def check_token_ids(ids, vocab_size: int, what: str = "token id") -> None:
    """ValueError naming the first id outside [0, vocab_size). `ids`: a flat sequence, or an array."""
    if hasattr(ids, "shape"):  # numpy / jax arrays, of any shape: one vectorised pass
        values = np.asarray(ids)
        bad = values[(values < 0) | (values >= vocab_size)].flat[:1].tolist()
    else:  # Python ints, however large (a request's)
        bad = [i for i in ids if not 0 <= i < vocab_size][:1]
    if bad:
        raise ValueError(f"{what} {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
