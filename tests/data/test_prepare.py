"""prepare: packed rows that reproduce the tokenized documents, byte-identical whatever the number of
workers and whatever the input format; an existing DATA reused or refused; bad input leaves nothing."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llama_jax.data import PreparedData, prepare
from llama_jax.data.__main__ import main
from llama_jax.data.prepare import tokenize_document
from llama_jax.data.sources import documents, find_sources
from llama_jax.tokenizer import write_byte_tokenizer
from llama_jax.tokenizer import Llama3Tokenizer
from tests.data.conftest import SEQ, texts, write_jsonl
from tests.data.test_sources import write_datasets_dir


def shard_bytes(path) -> list[bytes]:
    manifest = json.loads((path / "manifest.json").read_text())
    return [(path / s["file"]).read_bytes() for s in manifest["shards"]]


def all_rows(path) -> dict[str, np.ndarray]:
    data = PreparedData(path)
    return data.read(range(data.rows))


def test_rows_are_the_documents_packed_in_order(prepared, corpus, byte_tokenizer):
    tok = Llama3Tokenizer(byte_tokenizer)
    examples = [tokenize_document(tok, d) for s in find_sources([corpus]) for d, _ in documents(s)]
    rows = all_rows(prepared)
    real = rows["segment_ids"] > 0
    # Concatenated, the rows' tokens are the documents' examples: nothing dropped, reordered or reweighted
    # (chat examples keep their assistant-only weights, as chat_ids_and_weights gives them).
    for key in ("inputs", "targets", "weights"):
        np.testing.assert_array_equal(rows[key][real], np.concatenate([e[key] for e in examples]), err_msg=key)
    assert real[:-1].all() and not real[-1].all()  # only the last row is padded ...
    assert (rows["weights"][~real] == 0).all() and (rows["inputs"][~real] == 0).all()  # ... with zeros
    assert (rows["segment_ids"].max(axis=1) >= 2).mean() > 0.8  # most rows hold several documents
    for r in range(len(real)):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        for s in set(seg.tolist()) - {0}:
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))  # restart per segment
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["rows"] == len(real) and manifest["seq_len"] == SEQ
    assert manifest["tokens"] == sum(len(e["inputs"]) for e in examples)
    assert manifest["loss_tokens"] == sum(int((e["weights"] > 0).sum()) for e in examples) < manifest["tokens"]
    assert manifest["tokenizer"]["vocab_size"] == 512 and manifest["sources"][0]["kind"] == "jsonl"


def test_prepare_is_deterministic_whatever_the_workers(prepared, corpus, byte_tokenizer, tmp_path):
    # Small chunks, so each of the 4 workers tokenizes several.
    manifest = prepare([corpus], byte_tokenizer, SEQ, tmp_path / "data", workers=4, chunk_bytes=300, progress=False)
    assert shard_bytes(tmp_path / "data") == shard_bytes(prepared)
    assert manifest == json.loads((prepared / "manifest.json").read_text())


def test_parquet_and_datasets_give_the_rows_of_the_same_jsonl(tmp_path, byte_tokenizer):
    docs = texts(40, seed=3)
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in docs])
    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table.slice(0, 25), tmp_path / "a.parquet")
    pq.write_table(table.slice(25), tmp_path / "b.parquet")
    write_datasets_dir(tmp_path / "ds", table, shards=3)
    want = shard_bytes(_prepared(jsonl, byte_tokenizer, tmp_path / "from_jsonl"))
    assert shard_bytes(_prepared([tmp_path / "a.parquet", tmp_path / "b.parquet"], byte_tokenizer,
                                 tmp_path / "from_parquet", column="body")) == want
    assert shard_bytes(_prepared(tmp_path / "ds", byte_tokenizer, tmp_path / "from_datasets", column="body")) == want


def _prepared(paths, tokenizer, out, **kw):
    prepare(paths if isinstance(paths, list) else [paths], tokenizer, SEQ, out, progress=False, **kw)
    return out


def test_existing_data_is_reused_when_it_matches_and_refused_when_not(prepared, corpus, byte_tokenizer, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    # The same inputs, even from another path and tokenizer file with the same bytes: reused, untouched.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(open(corpus, "rb").read())
    prepare([copy], write_byte_tokenizer(tmp_path / "tok.model"), SEQ, prepared, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before
    with pytest.raises(ValueError, match=r"holds data prepared from other inputs \(seq_len 32, not 16\)"):
        prepare([corpus], byte_tokenizer, 16, prepared, progress=False)
    from llama_jax.tokenizer import default_tokenizer_path
    with pytest.raises(ValueError, match=r"other inputs \(tokenizer .*tokenizer.model, not .*llama3"):
        prepare([corpus], default_tokenizer_path(), SEQ, prepared, progress=False)
    copy.write_text('{"text": "changed"}\n')
    with pytest.raises(ValueError, match=r"other inputs \(other source files\)"):
        prepare([copy], byte_tokenizer, SEQ, prepared, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_fails_in_one_line_and_leaves_no_data(tmp_path, byte_tokenizer, capsys, workers):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": t} for t in texts(30)])
    with open(bad, "a") as f:
        f.write("{oops\n")
    out = tmp_path / "out" / "data"
    rc = main(["prepare", "--data", bad, "--tokenizer", byte_tokenizer, "--seq-len", "16", "--out", str(out),
               "--workers", str(workers), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "bad.jsonl, line starting at byte" in err[0] and "not valid JSON" in err[0]
    assert list((tmp_path / "out").iterdir()) == []  # neither DATA nor its temporary directory


def test_parquet_without_the_column_fails_in_one_line(tmp_path, byte_tokenizer, capsys):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    rc = main(["prepare", "--data", str(tmp_path / "t.parquet"), "--tokenizer", byte_tokenizer, "--seq-len", "16",
               "--out", str(tmp_path / "data"), "--column", "content", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {tmp_path / 't.parquet'}: no column 'content' (it has body); "
                               "name the text column with --column"]
    assert not (tmp_path / "data").exists()


def test_the_bytes_tokenizer_of_train_s_default_model_prepares_data(tmp_path, corpus, prepared, monkeypatch, capsys):
    """`--tokenizer bytes`, as train takes it: the same rows as the byte tokenizer's file gives, and a
    tokenizer nobody names is refused in one line. (tests/train/test_train_data.py trains on such data.)"""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "data"
    assert main(["prepare", "--data", corpus, "--tokenizer", "bytes", "--seq-len", str(SEQ), "--out", str(out),
                 "--no-progress"]) == 0
    assert shard_bytes(out) == shard_bytes(prepared)
    rc = main(["prepare", "--data", corpus, "--tokenizer", "byte", "--seq-len", str(SEQ), "--out", str(out / "x"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --tokenizer: no such file or directory: byte (expected 'bytes', 'llama3', a "
                               "tokenizer.model / tokenizer.json file, or a checkpoint directory)"]
