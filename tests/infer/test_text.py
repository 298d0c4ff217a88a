"""The text API over the real Llama 3 tokenizer: streaming only complete characters, chat prompts
as Meta builds them, and `generate` results."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from llama_jax.infer import Chat, TextStream, generate
from tests.infer.common import greedy_reference


def stream_pieces(tokenizer, ids):
    stream = TextStream(tokenizer)
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_stream_emits_only_complete_characters(tokenizer):
    text = "Grüße 👋🏽 aus 東京 — ✓ done"
    ids = tokenizer.encode(text, bos=False, eos=False)
    # The text really has characters split across tokens, else this tests nothing.
    assert any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # something was held back until its character completed


def test_stream_pieces_concatenate_to_decode_of_any_ids(tokenizer):
    # Byte tokens (ranks 0..255) make broken and stray UTF-8; the rest are ordinary tokens.
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = np.where(rng.random(60) < 0.5, rng.integers(0, 256, 60), rng.integers(256, 128000, 60)).tolist()
        assert "".join(stream_pieces(tokenizer, ids)) == tokenizer.decode(ids)


def test_chat_turns_give_meta_chat_format_ids(tokenizer):
    chat_format = pytest.importorskip("llama_models.llama3.chat_format")
    datatypes = pytest.importorskip("llama_models.datatypes")
    meta_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")

    meta = chat_format.ChatFormat(meta_tokenizer.Tokenizer(Path(tokenizer.path)))
    expected = lambda messages: meta.encode_dialog_prompt(  # noqa: E731
        [datatypes.RawMessage(role=m["role"], content=m["content"]) for m in messages]).tokens
    chat = Chat(tokenizer, system="Answer in one word.")
    first = chat.user_turn("Capital of France?")
    chat.assistant_turn("Paris")
    second = chat.user_turn("And of Japan?")
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Japan?"}]
    assert first == expected(messages[:2]) == tokenizer.encode_dialog(messages[:2])
    assert second == expected(messages) == tokenizer.encode_dialog(messages)
    assert Chat(tokenizer).user_turn("hi") == expected([{"role": "user", "content": "hi"}])


PROMPTS = ["The capital of France is", "Hello"]


def test_generate_greedy_texts_and_ids(llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    streamed = {}
    result = generate(cfg, params, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0,
                      on_text=lambda i, piece: streamed.setdefault(i, []).append(piece))
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        expected = greedy_reference(cfg, params, prompt_ids, 8, stop_ids=tokenizer.stop_tokens)
        assert result.token_ids[i] == expected
        assert result.texts[i] == tokenizer.decode(expected) == "".join(streamed.get(i, []))
        assert result.finish_reasons[i] == ("length" if len(expected) == 8 else "stop")
    # Token-id prompts (a dialog) are taken as they are.
    ids = tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    assert generate(cfg, params, tokenizer, [ids], max_new_tokens=8, temperature=0.0).token_ids == result.token_ids[:1]


@dataclasses.dataclass
class StopAt:
    """The real tokenizer with one more stop token."""
    inner: object
    extra: int

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def stop_tokens(self):
        return (*self.inner.stop_tokens, self.extra)


def test_generate_stops_at_the_tokenizers_stop_tokens(llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    full = generate(cfg, params, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0).token_ids[0]
    k = next(k for k in range(1, 8) if full[k] not in full[:k])
    result = generate(cfg, params, StopAt(tokenizer, full[k]), PROMPTS, max_new_tokens=8, temperature=0.0)
    assert result.token_ids[0] == full[:k] and result.finish_reasons[0] == "stop"
    assert result.texts[0] == tokenizer.decode(full[:k])


def test_generate_sampling_reproducible_with_a_seed(llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    kw = dict(max_new_tokens=6, temperature=0.8, top_p=0.95, top_k=50, seed=7)
    a = generate(cfg, params, tokenizer, PROMPTS, **kw)
    assert generate(cfg, params, tokenizer, PROMPTS, **kw) == a
    assert generate(cfg, params, tokenizer, PROMPTS, **(kw | dict(seed=8))) != a


def test_tokenizer_must_fit_the_model(tiny, tokenizer):
    cfg, params = tiny  # vocabulary 512
    with pytest.raises(ValueError, match="tokenizer has 128256 token ids but the model's vocabulary has 512"):
        generate(cfg, params, tokenizer, ["hi"], max_new_tokens=1)


def test_stream_keeps_the_space_a_sentencepiece_token_starts_with(tmp_path):
    """A Metaspace decoder (Llama 2, TinyLlama) drops a token's leading "▁" at the start of a text:
    each piece is decoded after the piece before it, so the spaces stay."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from llama_jax.hf_tokenizer import HFTokenizer

    spm = Tokenizer(models.BPE(byte_fallback=True))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.train_from_iterator(["hello world, the quick brown fox"] * 10, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[f"<0x{b:02X}>" for b in range(256)], show_progress=False))
    spm.save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json")
    text = "hello world, the quick brown fox"
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.decode(ids[1:]) != text[len(tokenizer.decode(ids[:1])):]  # decoding apart loses a space
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_stream_of_a_byte_level_hf_tokenizer_concatenates_to_decode(hf_chat_model):
    """Any ids, the special tokens among them: the pieces of a GPT-2-style byte-level tokenizer
    (whose tokens split characters) add up to the decoded text."""
    from llama_jax.hf_tokenizer import HFTokenizer

    tokenizer = HFTokenizer(hf_chat_model / "tokenizer.json")
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tokenizer.vocab_size, 60).tolist()
        assert "".join(stream_pieces(tokenizer, ids)) == tokenizer.decode(ids)
    text = "naïve café 日本語 🙂<|im_end|>"
    pieces = stream_pieces(tokenizer, tokenizer.encode(text, bos=False, eos=False))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
