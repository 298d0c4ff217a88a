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


class RandomWalk:
    """Tokens a grammar allows, chosen at random (closers and stop tokens often, else mostly tokens of
    at most 2 bytes, so strings stay short), until a stop token."""

    def __init__(self, tokenizer, ll: llguidance.LLTokenizer, stop_ids):
        self.tokenizer, self.ll, self.stop_ids = tokenizer, ll, list(stop_ids)
        encoded = (tokenizer.encode(c, bos=False, eos=False) for c in CLOSERS)
        self.closers = np.array(sorted({ids[0] for ids in encoded if len(ids) == 1}))
        sizes = np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)])
        self.short = np.flatnonzero(sizes <= 2)

    def __call__(self, grammar: str, rng: random.Random, *, first=(), max_tokens: int = 1000) -> list[int]:
        """`first`: tokens to take first, each while the grammar allows it (to reach a given branch)."""
        matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        out = []
        for step in range(max_tokens):
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
            stops = [s for s in self.stop_ids if bits[s]]
            closers = self.closers[bits[self.closers] == 1]
            if step < len(first) and bits[first[step]]:
                token = first[step]
            elif stops and rng.random() < 0.5:
                token = rng.choice(stops)
            elif len(closers) and rng.random() < 0.5:
                token = int(closers[rng.randrange(len(closers))])
            else:
                pool = self.short[bits[self.short] == 1] if rng.random() < 0.9 else np.array([])
                pool = pool if len(pool) else np.flatnonzero(bits[:self.tokenizer.vocab_size])
                assert len(pool), f"nothing allowed after {self.tokenizer.decode(out)!r}"
                token = int(pool[rng.randrange(len(pool))])
            out.append(int(token))
            if token in self.stop_ids:
                return out
            assert matcher.consume_token(int(token)), matcher.get_error()
        raise AssertionError(f"no stop token in {max_tokens} tokens: {self.tokenizer.decode(out)!r}")


def feed_tokens(syntax, tokenizer, ids, seed: int = 0):
    """The parser fed one token at a time, as a server streams: special tokens by name, text through an
    incremental UTF-8 decoder. Returns (turn, every event)."""
    specials = {i: name for name, i in tokenizer.special_tokens.items()}
    parser = ToolCallParser(syntax, CallIds(seed), end_tokens=[specials[i] for i in tokenizer.stop_tokens])
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
