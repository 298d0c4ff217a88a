"""The matcher as the engine drives it, over the real Llama 3 vocabulary: stop tokens exactly when
the grammar is complete, special tokens never inside a value, bounded whitespace, rollback, the
error state, and the batch fill against row-by-row fills."""

import json

import numpy as np
import pytest

from llama_jax.grammar import JSON_WHITESPACE, fill_rows
from tests.grammar.common import allowed_ids, random_walk

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
          "required": ["a"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llama3(compilers):
    return compilers("llama3")


def mask_of(matcher):
    row = np.zeros(matcher.vocabulary.mask_words, np.uint32)
    matcher.fill(row)
    return set(allowed_ids(row, matcher.vocabulary.vocab_size).tolist())


def test_stop_tokens_only_when_complete(llama3):
    tokenizer, compiler = llama3
    stops = set(compiler.vocabulary.stop_tokens)
    assert stops == {tokenizer.eos_id, tokenizer.eom_id, tokenizer.eot_id}
    matcher = compiler.json_schema(SCHEMA).matcher()
    for token in tokenizer.encode('{"a": 12, "b": "x"', False, False):
        assert not mask_of(matcher) & stops and not matcher.is_finished()
        assert matcher.accept(token)
    assert matcher.accept(tokenizer.encode("}", False, False)[0])
    assert matcher.is_finished() and matcher.is_accepting() and mask_of(matcher) == stops

    number = compiler.json_schema({"type": "integer"}).matcher()  # complete, yet may go on
    assert all(number.accept(t) for t in tokenizer.encode("12", False, False))
    allowed = mask_of(number)
    assert stops <= allowed and tokenizer.encode("3", False, False)[0] in allowed and not number.is_finished()
    assert number.accept(tokenizer.eot_id) and number.is_finished()


def test_special_tokens_never_inside_a_string(llama3):
    tokenizer, compiler = llama3
    matcher = compiler.json_schema(SCHEMA).matcher()
    assert all(matcher.accept(t) for t in tokenizer.encode('{"a": 1, "b": "', False, False))
    allowed = mask_of(matcher)
    assert len(allowed) > 100_000 and max(allowed) < 128_000  # 128000.. are the 256 special tokens
    assert not matcher.accept(tokenizer.python_tag_id)


def test_json_whitespace_is_bounded(llama3):
    tokenizer, compiler = llama3
    value = {"a": 1, "b": "x"}
    for text in (json.dumps(value), json.dumps(value, separators=(",", ":")), json.dumps(value, indent=4),
                 '{\n\t"a": 1\n}'):
        matcher = compiler.json_schema(SCHEMA).matcher()
        assert all(matcher.accept(t) for t in tokenizer.encode(text, False, False)) and matcher.is_finished(), text

    def nested(levels):
        return {"x": nested(levels - 1)} if levels else {"y": 1}

    for levels, fits in ((4, True), (5, False)):  # the deepest lines are indented 4 * (levels + 1) spaces
        matcher = compiler.json_object().matcher()
        tokens = tokenizer.encode(json.dumps(nested(levels), indent=4), False, False)
        assert all(matcher.accept(t) for t in tokens) == fits
    for text in ('{' + " " * 21 + '"a": 1}', '{\n\n"a": 1}', '{"a":\n \n 1}', '{\r\n"a": 1}'):
        matcher = compiler.json_schema(SCHEMA).matcher()
        assert not all(matcher.accept(t) for t in tokenizer.encode(text, False, False)), text
    assert JSON_WHITESPACE == r"\n?[ \t]{0,20}"  # what the cases above are written for


def test_rollback_restores_the_mask(llama3):
    tokenizer, compiler = llama3
    matcher = compiler.json_schema(SCHEMA).matcher()
    tokens = tokenizer.encode('{"a": 12, "b": "xy"}', False, False)
    masks = []
    for token in tokens:
        masks.append(mask_of(matcher))
        assert matcher.accept(token)
    matcher.rollback(3)
    assert matcher.accepted == len(tokens) - 3 and mask_of(matcher) == masks[-3] and not matcher.is_finished()
    with pytest.raises(ValueError, match="rollback of 99 tokens: only"):
        matcher.rollback(99)
    assert matcher.valid_prefix(tokens[-3:] + tokens[:1]) == 3  # a draft: 3 tokens fit, the 4th not
    matcher.reset()
    assert matcher.accepted == 0 and mask_of(matcher) == masks[0]


def test_refused_token_leaves_only_stop_tokens(llama3):
    tokenizer, compiler = llama3
    matcher = compiler.json_schema(SCHEMA).matcher()
    assert matcher.error is None
    assert not matcher.accept(tokenizer.encode("[", False, False)[0])
    assert "doesn't satisfy the grammar" in matcher.error and not matcher.is_finished()
    assert mask_of(matcher) == set(compiler.vocabulary.stop_tokens)


def test_fill_rows_matches_row_by_row(llama3):
    tokenizer, compiler = llama3
    grammars = [compiler.json_schema(SCHEMA), compiler.json_object(), compiler.regex(r"[0-9]{2,4}")]
    matchers = [g.matcher() for g in grammars]
    rng = np.random.default_rng(3)
    for matcher in matchers:
        random_walk(matcher, rng, 5)
    words = compiler.vocabulary.mask_words
    batch = np.full((5, words), 0xFFFFFFFF, np.uint32)
    fill_rows([(matchers[0], 4), (matchers[1], 0), (matchers[2], 2)], batch)
    for matcher, i in zip(matchers, (4, 0, 2)):
        row = np.zeros(words, np.uint32)
        matcher.fill(row)
        np.testing.assert_array_equal(batch[i], row)
    assert (batch[[1, 3]] == 0xFFFFFFFF).all()
    with pytest.raises(ValueError, match=f"allowed_LW must be a contiguous uint32 array of shape \\(L, {words}\\)"):
        fill_rows([(matchers[0], 0)], np.zeros((2, words), np.int32))
    with pytest.raises(ValueError, match=f"bitmask row must be a contiguous uint32 array of shape \\({words},\\)"):
        matchers[0].fill(batch[:, 0])


def test_engine_mask_reads_our_rows(llama3):
    """sampling.apply_token_mask (the engine's step) leaves finite exactly the ids a filled row allows."""
    from llama_jax.infer.sampling import apply_token_mask

    tokenizer, compiler = llama3
    matcher = compiler.json_schema(SCHEMA).matcher()
    assert all(matcher.accept(t) for t in tokenizer.encode('{"a": 1', False, False))
    vocabulary = compiler.vocabulary
    allowed_LW = np.full((2, vocabulary.mask_words), 0xFFFFFFFF, np.uint32)  # row 1: no grammar
    fill_rows([(matcher, 0)], allowed_LW)
    logits_LV = np.random.default_rng(0).normal(size=(2, vocabulary.vocab_size)).astype(np.float32)
    masked = np.asarray(apply_token_mask(logits_LV, allowed_LW))
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(masked[0])), allowed_ids(allowed_LW[0], vocabulary.vocab_size))
    np.testing.assert_array_equal(masked[1], logits_LV[1])
    assert 1000 < np.isfinite(masked[0]).sum() < 2000  # the 1,110 number tokens, whitespace, "," and "}"
