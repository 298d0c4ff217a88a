"""A tokenizer as llguidance sees it: every token's bytes, which ids are special, and which ids end a
response. Built once per engine (about a second for Llama 3's 128,256 tokens) and shared by every
grammar compiled for it.

llguidance reads the vocabulary three ways, one per tokenizer kind of llama_jax:
- `Llama3Tokenizer` (tiktoken): `LLTokenizer.from_tiktoken` over the same ranks file, special names
  and split pattern, so its own tokenization (forced tokens) is Meta's;
- `HFTokenizer`: the tokenizer.json text itself, which llguidance's Rust side reads with `tokenizers`;
- `Llama2Tokenizer` (sentencepiece): a `TokenizerWrapper` over the pieces' bytes (`▁` is a space,
  `<0xAB>` pieces are one byte), control and unknown pieces marked special.

Special tokens are named in grammars by their names (`<|eot_id|>`, `<|python_tag|>`) or ids
(`<[128009]>`); a JSON string or a Lark terminal never matches one, so they cannot be sampled by
accident inside a constrained value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import llguidance

from llama_jax.hf_tokenizer import HFTokenizer
from llama_jax.tokenizer import LLAMA3_PAT_STR, Llama2Tokenizer, Llama3Tokenizer, read_tiktoken_ranks

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclasses.dataclass(frozen=True)
class GrammarVocabulary:
    """The llguidance tokenizer of one model. `vocab_size` is the model's logits width V, which may
    exceed the tokenizer's (padded embeddings): ids past the tokenizer's are never allowed.
    `stop_tokens` are the ids a grammar allows once it is complete (and only then)."""

    ll_tokenizer: llguidance.LLTokenizer
    vocab_size: int
    stop_tokens: tuple[int, ...]

    @property
    def mask_words(self) -> int:
        """W = ceil(V / 32): the uint32 words of one row of the engine's `allowed_LW`."""
        return (self.vocab_size + 31) // 32

    @property
    def ll_words(self) -> int:
        """The words llguidance writes (its vocabulary, rounded up to 32); the rest of a row stays 0."""
        return (self.ll_tokenizer.vocab_size + 31) // 32


def grammar_vocabulary(tokenizer, vocab_size: int | None = None,
                       stop_tokens: Sequence[int] | None = None) -> GrammarVocabulary:
    """The llguidance vocabulary of a llama_jax tokenizer (any of the three kinds).

    vocab_size: the model's V (default the tokenizer's); smaller than the tokenizer's is a ValueError.
    stop_tokens: default `tokenizer.stop_tokens` (Llama 3: end_of_text, eom, eot).
    """
    if not isinstance(tokenizer, (Llama3Tokenizer, HFTokenizer, Llama2Tokenizer)):
        raise ValueError(f"no grammar vocabulary for a {type(tokenizer).__name__}: expected Llama3Tokenizer, "
                         f"Llama2Tokenizer or HFTokenizer")
    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    stops = tuple(tokenizer.stop_tokens if stop_tokens is None else stop_tokens)
    if not stops:
        raise ValueError("stop_tokens is empty: a complete grammar needs a token that ends the response")
    bad = [t for t in stops if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"stop token {bad[0]} is outside the tokenizer's vocabulary [0, {tokenizer.vocab_size})")
    if isinstance(tokenizer, Llama3Tokenizer):
        ll = llguidance.LLTokenizer.from_tiktoken(
            encoder=read_tiktoken_ranks(tokenizer.path), special_tokens=dict(tokenizer.special_tokens),
            pattern=LLAMA3_PAT_STR, eos_token=list(stops), n_vocab=vocab_size)
    elif isinstance(tokenizer, HFTokenizer):
        ll = llguidance.LLTokenizer(Path(tokenizer.path).read_text(), n_vocab=vocab_size, eos_token=list(stops))
    else:  # n_vocab is not read from a TokenizerWrapper: GrammarMatcher.fill zeroes the padding
        ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceTokens(tokenizer)),
                                    eos_token=list(stops))
    return GrammarVocabulary(ll, vocab_size, stops)


class _SentencePieceTokens:
    """What `llguidance.TokenizerWrapper` reads: every id's bytes, the special ids, an encoder.

    The encoder is the model's without sentencepiece's dummy prefix: llguidance tokenizes pieces of
    the middle of a response (forced bytes), where `{` must stay `{`, not become `▁{`."""

    def __init__(self, tokenizer: Llama2Tokenizer):
        import sentencepiece  # only Llama 2 needs it
        from sentencepiece import sentencepiece_model_pb2  # protobuf comes with tensorboardX

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(tokenizer.path).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp = sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        self.tokens = [_piece_bytes(sp, i) for i in range(sp.vocab_size())]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes, then falls back to str
            raise TypeError("sentencepiece encodes str")
        return self._sp.encode(text)


def _piece_bytes(sp, token_id: int) -> bytes:
    piece = sp.id_to_piece(token_id)
    if sp.is_byte(token_id):
        return bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])
    if sp.is_control(token_id) or sp.is_unknown(token_id):
        return piece.encode()  # marked special by special_token_ids
    return piece.replace("\u2581", " ").encode()


__all__ = ["GrammarVocabulary", "grammar_vocabulary"]
