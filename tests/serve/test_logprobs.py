"""Logprobs of tokens that hold part of a UTF-8 character: their own bytes, joining to the text,
and completion text offsets that index the returned text."""

import io

import pytest

from llama_jax.hf_tokenizer import HFTokenizer
from llama_jax.serve.logprobs import token_bytes
from llama_jax.tokenizer import Llama2Tokenizer
from tests.hf_chat_model import TRAINING_TEXTS, train_tokenizer
from tests.serve.common import MODEL, client, server

TEXT = "🦙 naïve 日本語 — ok"


def byte_level_hf(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_tokenizer().save(str(path))
    return HFTokenizer(path)


def sentencepiece_with_byte_fallback(tmp_path):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TRAINING_TEXTS * 20), model_writer=model,
                                             vocab_size=400, model_type="bpe", byte_fallback=True,
                                             character_coverage=0.98, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    return Llama2Tokenizer(tmp_path / "sp.model")


@pytest.mark.parametrize("make", ["llama3", byte_level_hf, sentencepiece_with_byte_fallback])
def test_token_bytes_join_to_the_text(tokenizer, tmp_path, make):
    tok = tokenizer if make == "llama3" else make(tmp_path)
    ids = tok.encode(TEXT, bos=False, eos=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some token ends inside a character
    joined = b"".join(token_bytes(tok)(i) for i in ids)
    # sentencepiece writes the space its dummy prefix adds; decoding drops it from a text's start.
    assert joined == (b" " if isinstance(tok, Llama2Tokenizer) else b"") + TEXT.encode()
    for special in tok.special_tokens.values():  # their names, as decoding writes them
        assert token_bytes(tok)(special) == tok.decode([special]).encode()


def expected_offsets(tokenizer, ids) -> list[int]:
    """The characters complete before each token: the text of the tokens before it, less a partial
    character at its end (which decodes to U+FFFD; TEXT holds none of its own)."""
    return [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def test_completion_text_offsets_index_the_returned_text(tokenizer):
    ids = tokenizer.encode(TEXT, bos=False, eos=False)
    with server(tokenizer, reply=TEXT) as (_, url):
        api = client(url)
        whole = api.completions.create(model=MODEL, prompt="x", logprobs=0).choices[0]
        chunks = list(api.completions.create(model=MODEL, prompt="x", logprobs=0, stream=True))
    assert whole.text == TEXT
    offsets = whole.logprobs.text_offset
    assert offsets == expected_offsets(tokenizer, ids)
    assert TEXT[offsets[0]] == "🦙" and TEXT[offsets[-1]:] == tokenizer.decode(ids[-1:])
    # Streamed, each chunk's offsets count the text of the chunks before it.
    streamed = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed == offsets and "".join(c.choices[0].text for c in chunks) == TEXT
    assert len({len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs}) > 1


def test_chat_logprob_bytes_are_the_tokens_own(tokenizer):
    with server(tokenizer, reply=TEXT) as (_, url):
        api = client(url)
        whole = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], logprobs=True,
                                            top_logprobs=1)
        chunks = list(api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}],
                                                  logprobs=True, stream=True))
    content = whole.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content) == TEXT.encode()
    assert any(t.token == "\ufffd" and t.bytes != list("\ufffd".encode()) for t in content)
    assert all(t.top_logprobs[0].bytes == t.bytes for t in content)  # the fake engine's top choice is the token
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert b"".join(bytes(t.bytes) for t in streamed) == TEXT.encode()
