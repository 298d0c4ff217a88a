"""Shared pieces of the tool-calling tests: Llama 3's vocabulary as an llguidance tokenizer, and a
random walk through what a grammar allows (fixed seeds), fed token by token to the parser."""

from __future__ import annotations

import codecs
import random

import llguidance
import numpy as np

from llama_jax.tools.definitions import CallIds
from llama_jax.tools.parser import ToolCallParser

# Characters that close strings, objects, lists and calls: the walk picks them often so outputs end.
CLOSERS = ['"', "'", "}", "]", ")", ",", ", ", '"}', "}}", '")', "0", "1", "7", " ", "\n", "True", "a", "x"]


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, the special ids, an encoder."""

    def __init__(self, tokenizer, eos: int):
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        self._tokenizer = tokenizer

    def __call__(self, text):
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return self._tokenizer.encode(text, bos=False, eos=False)


def lltokenizer(tokenizer, stop_ids) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over our tokenizer's token bytes; the turn may end with any of stop_ids."""
    wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, stop_ids[0]))
    return llguidance.LLTokenizer(wrapper, eos_token=list(stop_ids))


def random_walk(ll: llguidance.LLTokenizer, grammar: str, tokenizer, rng: random.Random, *, stop_ids,
                first=None, max_tokens: int = 600) -> list[int]:
    """Tokens a grammar allows, chosen at random (closers and stop tokens often), until a stop token."""
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    closers = {i for i in (tokenizer.encode(c, bos=False, eos=False) for c in CLOSERS) if len(i) == 1 for i in i}
    short = np.array([i for i in range(tokenizer.vocab_size) if len(tokenizer.token_bytes(i)) <= 2])
    out = []
    for step in range(max_tokens):
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[:tokenizer.vocab_size])
        assert len(allowed), f"nothing allowed after {tokenizer.decode(out)!r}"
        stops = [s for s in stop_ids if bits[s]]
        good_closers = [c for c in closers if bits[c]]
        short_allowed = short[bits[short] == 1]
        if step == 0 and first is not None and bits[first]:
            token = first
        elif stops and rng.random() < 0.3:
            token = rng.choice(stops)
        elif good_closers and rng.random() < 0.5:
            token = rng.choice(good_closers)
        elif len(short_allowed) and rng.random() < 0.9:
            token = int(rng.choice(short_allowed))
        else:
            token = int(rng.choice(allowed))
        out.append(int(token))
        if token in stop_ids:
            return out
        assert matcher.consume_token(int(token)), matcher.get_error()
    raise AssertionError(f"no stop token in {max_tokens} tokens: {tokenizer.decode(out)!r}")


def feed_tokens(syntax, tokenizer, ids, seed: int = 0):
    """The parser fed one token at a time, as a server streams: special tokens by name, text through an
    incremental UTF-8 decoder. Returns (turn, every event)."""
    specials = {i: name for name, i in tokenizer.special_tokens.items()}
    parser = ToolCallParser(syntax, CallIds(seed))
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    events = []
    for token in ids:
        if token in specials:
            events += parser.feed(decoder.decode(b"", final=True))
            events += parser.feed_special(specials[token])
        else:
            events += parser.feed(decoder.decode(tokenizer.token_bytes(token)))
    events += parser.feed(decoder.decode(b"", final=True))
    turn = parser.finish()
    return turn, events + turn.events
