"""llguidance vocabularies from the other two tokenizer kinds (a tokenizer.json, a sentencepiece
model, both trained here) and from a model whose vocabulary is padded past its tokenizer's: the
same JSON guarantees, special tokens by name, and no padded id ever allowed."""

import json
import random

import numpy as np
import pytest

from llama_jax.grammar import GrammarCompiler, grammar_vocabulary
from llama_jax.hf_tokenizer import HFTokenizer
from llama_jax.tokenizer import Llama2Tokenizer
from tests.grammar.common import allowed_ids, random_walk, text_of
from tests.grammar.validator import errors

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -50, "maximum": 50},
                                           "s": {"type": "string", "maxLength": 6}},
          "required": ["n", "s"], "additionalProperties": False}


def check_json_walks(tokenizer, compiler, runs=20):
    rng = np.random.default_rng(0)
    grammar = compiler.json_schema(SCHEMA)
    for _ in range(runs):
        tokens, finished = random_walk(grammar.matcher(), rng, 200)
        assert finished
        assert errors(json.loads(text_of(tokenizer, tokens, compiler.vocabulary.stop_tokens)), SCHEMA) == []


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tests.hf_chat_model import train_tokenizer

    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    train_tokenizer().save(str(path))
    return HFTokenizer(path)


def test_hf_tokenizer_json(hf_tokenizer):
    vocabulary = grammar_vocabulary(hf_tokenizer, stop_tokens=[2])
    assert vocabulary.vocab_size == hf_tokenizer.vocab_size
    compiler = GrammarCompiler(vocabulary)
    check_json_walks(hf_tokenizer, compiler)
    matcher = compiler.lark('start: "Hi" <|im_end|>').matcher()  # ChatML's special tokens by name
    assert all(matcher.accept(t) for t in hf_tokenizer.encode("Hi", False, False))
    assert matcher.accept(2) and matcher.is_finished()


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    import sentencepiece

    rng = random.Random(0)
    words = ['{"n": 12, "s": "ab"}', "hello", "world", "[1, 2]", "-7", "the", "model", "answer"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randrange(2, 8))) for _ in range(300)]
    prefix = tmp_path_factory.mktemp("sp") / "llama2"
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=300,
                                             model_type="bpe", byte_fallback=True, minloglevel=2)
    return Llama2Tokenizer(str(prefix) + ".model")


def test_sentencepiece(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    vocabulary = grammar_vocabulary(tokenizer)
    compiler = GrammarCompiler(vocabulary)
    rng = np.random.default_rng(0)
    grammar = compiler.json_schema(SCHEMA)
    for _ in range(20):
        tokens, finished = random_walk(grammar.matcher(), rng, 200)
        assert finished and tokenizer.eos_id not in tokens[:-1]
        # llguidance reads a leading ▁ as the space it is; sentencepiece's decode drops a first one.
        text = vocabulary.ll_tokenizer.decode_str([t for t in tokens if t != tokenizer.eos_id])
        assert errors(json.loads(text), SCHEMA) == []
    matcher = compiler.lark('start: "x" </s>').matcher()
    assert matcher.accept(tokenizer.encode("x", False, False)[-1]) and matcher.accept(tokenizer.eos_id)


def test_padded_model_vocabulary_never_allows_padding(grammar_tokenizers, sentencepiece_tokenizer):
    for tokenizer in (grammar_tokenizers["bytes"], sentencepiece_tokenizer):
        vocabulary = grammar_vocabulary(tokenizer, vocab_size=tokenizer.vocab_size + 77)
        assert vocabulary.mask_words == (tokenizer.vocab_size + 77 + 31) // 32
        matcher = GrammarCompiler(vocabulary).json_object().matcher()
        assert matcher.accept(tokenizer.encode("{", False, False)[-1])
        row = np.full(vocabulary.mask_words, 0xFFFFFFFF, np.uint32)
        matcher.fill(row)
        allowed = allowed_ids(row, vocabulary.vocab_size)
        assert 0 < len(allowed) and allowed.max() < tokenizer.vocab_size


def test_bad_vocabulary_arguments(grammar_tokenizers):
    tokenizer = grammar_tokenizers["bytes"]
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the tokenizer's 512"):
        grammar_vocabulary(tokenizer, vocab_size=100)
    with pytest.raises(ValueError, match=r"stop token 600 is outside the tokenizer's vocabulary \[0, 512\)"):
        grammar_vocabulary(tokenizer, stop_tokens=[600])
    with pytest.raises(ValueError, match="no grammar vocabulary for a str"):
        grammar_vocabulary("tokenizer.model")
