"""Documents -> examples: the byte tokenizer, next-token targets, chat loss weights, tokenizer identity."""

import numpy as np
import pytest

from llama_jax.data.tokens import chat_ids_and_weights, tokenize_record, tokenizer_identity
from llama_jax.tokenizer import write_byte_tokenizer
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path
from tests.data.conftest import DIALOG


@pytest.fixture(scope="module")
def tok(byte_tokenizer):
    return Llama3Tokenizer(byte_tokenizer)


@pytest.fixture(scope="module")
def llama3():
    return Llama3Tokenizer(default_tokenizer_path())


def test_byte_tokenizer_is_a_512_token_llama3_tokenizer(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eot_id) == (512, 256, 257, 265)
    text = "héllo, wörld ✓"
    assert tok.encode(text, bos=False, eos=False) == list(text.encode())
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == "<|begin_of_text|>" + text + "<|end_of_text|>"


@pytest.mark.parametrize("tokenizer", ["tok", "llama3"])
def test_chat_loss_weights_only_assistant_turns(request, tokenizer):
    tok = request.getfixturevalue(tokenizer)
    ids, weights = chat_ids_and_weights(tok, DIALOG)
    # The ids are exactly the prompt encode_dialog builds for the same turns.
    assert ids == tok.encode_dialog(DIALOG)[: len(ids)]
    assert len(ids) == len(tok.encode_dialog(DIALOG)) - len(tok.encode_header("assistant"))
    trained = [i for i, w in zip(ids, weights) if w]
    assert tok.decode(trained) == "Paris.<|eot_id|>Rome.<|eot_id|>"
    example = tokenize_record(tok, {"messages": DIALOG})
    np.testing.assert_array_equal(example["targets"], ids[1:])
    np.testing.assert_array_equal(example["weights"], weights[1:])
    assert tok.decode(example["targets"][example["weights"] > 0].tolist()) == "Paris.<|eot_id|>Rome.<|eot_id|>"


def test_text_targets_are_the_next_token(tok):
    ex = tokenize_record(tok, {"text": "abc"})
    np.testing.assert_array_equal(ex["inputs"], [256, 97, 98, 99])
    np.testing.assert_array_equal(ex["targets"], [97, 98, 99, 257])
    np.testing.assert_array_equal(ex["weights"], [1, 1, 1, 1])


def test_tokenizer_identity_is_the_files_content(tmp_path, byte_tokenizer):
    same = tokenizer_identity(write_byte_tokenizer(tmp_path / "elsewhere.model"))
    assert same["sha256"] == tokenizer_identity(byte_tokenizer)["sha256"]
    assert (same["vocab_size"], same["bos_id"], same["eos_id"]) == (512, 256, 257)
    assert tokenizer_identity(default_tokenizer_path())["sha256"] != same["sha256"]
