"""Training data: documents, chat loss weights, packing, determinism and exact iterator resume."""

import json

import numpy as np
import pytest

from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path
from llama_jax.train.data import (
    BatchIterator, DataConfig, Documents, builtin_corpus_paths, chat_ids_and_weights, tokenize_record,
    write_byte_tokenizer,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Llama3Tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama3():
    return Llama3Tokenizer(default_tokenizer_path())


DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_byte_tokenizer_is_a_512_token_llama3_tokenizer(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eot_id) == (512, 256, 257, 265)
    text = "héllo, wörld ✓"
    assert tok.encode(text, bos=False, eos=False) == list(text.encode())
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == "<|begin_of_text|>" + text + "<|end_of_text|>"


def test_documents_from_text_jsonl_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("plain text")
    (tmp_path / "d" / ".hidden").write_text("skipped")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n"
                                            + json.dumps({"messages": DIALOG, "id": 7}) + "\n")
    docs = Documents([tmp_path / "d"])
    assert [docs[i] for i in range(len(docs))] == [{"text": "plain text", "bos": True, "eos": True}, {"text": "one"},
                                                   {"messages": DIALOG}]


def test_long_text_files_are_cut_at_newlines(tmp_path, tok):
    text = "line one\nline two\nline three\nfour\n"
    (tmp_path / "a.txt").write_text(text)
    docs = Documents([tmp_path / "a.txt"], text_chunk_bytes=20)
    chunks = [docs[i] for i in range(len(docs))]
    assert "".join(c["text"] for c in chunks) == text
    assert len(chunks) > 1 and all(c["text"].endswith("\n") for c in chunks)
    # The file is one document cut in pieces: bos opens only the first, eos closes only the last.
    ids = [tokenize_record(tok, c) for c in chunks]
    assert [c["bos"] for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert [c["eos"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert ids[0]["inputs"][0] == tok.bos_id and ids[1]["inputs"][0] != tok.bos_id
    assert ids[-1]["targets"][-1] == tok.eos_id and ids[0]["targets"][-1] != tok.eos_id


def test_document_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Documents([tmp_path / "missing.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl, line starting at byte 15: not valid JSON"):
        Documents([tmp_path / "bad.jsonl"])[1]
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="needs a 'text' or a 'messages' field"):
        Documents([tmp_path / "nofield.jsonl"])[0]


def test_builtin_corpus_is_python_source():
    paths = builtin_corpus_paths()
    assert len(paths) >= 30 and all(p.endswith(".py") for p in paths)


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


def _write_docs(tmp_path, n=40):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": "".join(rng.choice(list("abcdefgh"), rng.integers(3, 30)))}) for _ in range(n)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return (str(tmp_path / "docs.jsonl"),)


def test_packed_batches_keep_documents_apart(tmp_path, tok):
    batch = next(BatchIterator(DataConfig(_write_docs(tmp_path), seq_len=32, batch_size=4), tok))
    assert set(batch) == {"inputs", "targets", "weights", "positions", "segment_ids"}
    assert all(v.shape == (4, 32) for v in batch.values())
    for row in range(4):
        seg, pos, inp, tgt = (batch[k][row] for k in ("segment_ids", "positions", "inputs", "targets"))
        assert seg.max() >= 2  # several documents share the row
        for s in set(seg.tolist()) - {0}:
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart per document
            np.testing.assert_array_equal(inp[idx][1:], tgt[idx][:-1])  # targets: the same document, shifted
        assert (batch["weights"][row][seg == 0] == 0).all()


@pytest.mark.parametrize("window", [0, 3, 256])
def test_iterator_is_deterministic_and_resumes_exactly(tmp_path, tok, window):
    cfg = DataConfig(_write_docs(tmp_path), seq_len=16, batch_size=2, seed=3, shuffle_window=window)
    first = BatchIterator(cfg, tok)
    batches = [next(first) for _ in range(30)]  # a few epochs: reshuffled each time
    again = BatchIterator(cfg, tok)
    for b in batches:
        assert all((b[k] == v).all() for k, v in next(again).items())

    for k in (0, 1, 5, 6, 13):  # the start, mid-window and window edges (window 3 rows = 1.5 batches)
        it = BatchIterator(cfg, tok)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
        resumed = BatchIterator(cfg, tok)
        resumed.restore(state)
        for i, b in enumerate(batches[k:k + 8]):
            assert all((b[key] == v).all() for key, v in next(resumed).items()), (k, i)

    other_seed = next(BatchIterator(DataConfig(cfg.paths, 16, 2, seed=4, shuffle_window=window), tok))
    assert not (other_seed["inputs"] == batches[0]["inputs"]).all()
    with pytest.raises(ValueError, match="resume with the same --seq-len, --batch-size and --seed"):
        BatchIterator(DataConfig(cfg.paths, 16, 4, seed=3, shuffle_window=window), tok).restore(state)
