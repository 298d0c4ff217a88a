"""Logprobs in OpenAI's shapes, with each token's own bytes and text offsets into the returned text.

A byte-level token may hold part of a UTF-8 character: alone it decodes to U+FFFD, so its `token`
string is that, but its `bytes` are its own, and the `bytes` of a response's tokens join to the
UTF-8 of its text. A completion's `text_offset` of a token is the index (in characters, Python's
code points) into the choice's whole text of the first character the token completes; a token
ending inside a character has that character's offset. Tokens a stop string cut from the text are
listed with offsets at its end or past it.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Callable, Sequence

from llama_jax.hf_tokenizer import HFTokenizer
from llama_jax.serve import protocol as p
from llama_jax.tokenizer import Llama2Tokenizer, Llama3Tokenizer


class TextOffsets:
    """Text offsets of tokens given their bytes in order, counted from `start` (the characters
    before them: an echoed prompt's, or the stream's earlier chunks')."""

    def __init__(self, start: int = 0):
        self.chars = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, token_bytes: bytes) -> int:
        offset = self.chars
        self.chars += len(self._utf8.decode(token_bytes))
        return offset


class Logprobs:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes_of = token_bytes(tokenizer)

    def text_of(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat(self, tokens) -> p.ChatLogprobs:
        """`tokens`: TokenOutputs, with top_logprobs where asked for."""
        def top(token_id: int, logprob: float) -> p.TopLogprob:
            return p.TopLogprob(token=self.text_of(token_id), logprob=logprob, bytes=list(self.bytes_of(token_id)))

        return p.ChatLogprobs(content=[
            p.TokenLogprob(**top(t.token_id, t.logprob).model_dump(),
                           top_logprobs=[top(i, lp) for i, lp in t.top_logprobs or ()])
            for t in tokens])

    def completion(self, tokens, offsets: TextOffsets) -> p.CompletionLogprobs:
        """`offsets`: the choice's, carried from chunk to chunk of a stream."""
        return p.CompletionLogprobs(
            tokens=[self.text_of(t.token_id) for t in tokens], token_logprobs=[t.logprob for t in tokens],
            text_offset=[offsets.next(self.bytes_of(t.token_id)) for t in tokens],
            top_logprobs=[{self.text_of(i): lp for i, lp in t.top_logprobs or ()} for t in tokens])


    def prompt(self, token_ids: Sequence[int], scored, offsets: TextOffsets, printed_from: int = 0
               ) -> p.CompletionLogprobs:
        """An echoed prompt's tokens with their scores (`scored`: infer/score.PromptLogprobs; the
        first token's are None). The tokens before `printed_from` are not in the echoed text (the
        BOS token a text prompt is encoded with): their offset is where the text starts."""
        offset = [offsets.chars if i < printed_from else offsets.next(self.bytes_of(t))
                  for i, t in enumerate(token_ids)]
        return p.CompletionLogprobs(
            tokens=[self.text_of(t) for t in token_ids], token_logprobs=list(scored.logprobs), text_offset=offset,
            top_logprobs=[None if top is None else {self.text_of(i): lp for i, lp in top} for top in scored.top])


def joined(first: p.CompletionLogprobs, then: p.CompletionLogprobs) -> p.CompletionLogprobs:
    """One choice's logprobs: an echoed prompt's, then its generated tokens'."""
    return p.CompletionLogprobs(**{name: getattr(first, name) + getattr(then, name)
                                   for name in p.CompletionLogprobs.model_fields})


@functools.lru_cache(maxsize=8)
def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """token id -> the bytes it stands for, from the tokenizer's own vocabulary.

    Llama 3's (tiktoken) and HF byte-level BPE vocabularies hold bytes; sentencepiece's byte
    fallback pieces are <0xNN>; any other token is its decoded text (a special token's name)."""
    if isinstance(tokenizer, Llama3Tokenizer):
        return tokenizer.token_bytes  # its loaded vocabulary, not the file read again
    decoded = lambda i: tokenizer.decode([i]).encode()  # noqa: E731
    if isinstance(tokenizer, HFTokenizer):
        table = _hf_byte_level(tokenizer.path)
    elif isinstance(tokenizer, Llama2Tokenizer):
        table = _sentencepiece_bytes(tokenizer.path)
    else:
        table = {}
    return lambda i: table[i] if i in table else decoded(i)


def _hf_byte_level(path) -> dict[int, bytes]:
    """A byte-level BPE's tokens spell each byte as one printable character (GPT-2's table)."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(path))
    if not isinstance(tok.decoder, tokenizers.decoders.ByteLevel):
        return {}
    byte_of = {c: b for b, c in enumerate(_gpt2_byte_chars())}
    added = tok.get_added_tokens_decoder()
    return {i: bytes(byte_of[c] for c in token) for token, i in tok.get_vocab(with_added_tokens=False).items()
            if i not in added and all(c in byte_of for c in token)}


@functools.cache
def _gpt2_byte_chars() -> Sequence[str]:
    """Character of byte b at [b]: printable Latin-1 bytes as themselves, the rest from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def _sentencepiece_bytes(path) -> dict[int, bytes]:
    """Byte-fallback pieces are <0xNN>; a text piece spells spaces as U+2581 (a text's first token
    keeps that space here, where decoding drops it)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    table = {}
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            table[i] = bytes([int(piece[3:5], 16)])
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            table[i] = piece.replace("\u2581", " ").encode()
    return table
