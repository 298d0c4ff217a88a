"""Sources -> documents: text, JSONL, directories, Parquet and datasets directories; their errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llama_jax.data.prepare import tokenize_document
from llama_jax.data.sources import builtin_corpus_paths, documents, find_sources
from llama_jax.data.tokens import parse_json_record
from tests.data.conftest import DIALOG


def all_documents(paths, **kw):
    return [d for s in find_sources(paths) for d, _ in documents(s, **kw)]


def write_datasets_dir(path, table: pa.Table, shards: int = 2):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files + state.json + dataset_info.json
    (with `datasets` itself when it is installed)."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        datasets.Dataset(table).save_to_disk(str(path), num_shards=shards)
        return path
    path.mkdir(parents=True)
    files = []
    step = -(-table.num_rows // shards)
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.ipc.new_stream(str(path / name), table.schema) as writer:
            writer.write_table(table.slice(i * step, step))
        files.append({"filename": name})
    (path / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "0", "_format_columns": None,
                                                 "_format_kwargs": {}, "_format_type": None,
                                                 "_output_all_columns": False, "_split": None}))
    (path / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return path


def test_documents_from_text_jsonl_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("plain text")
    (tmp_path / "d" / ".hidden").write_text("skipped")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n"
                                            + json.dumps({"messages": DIALOG, "id": 7}) + "\n")
    docs = all_documents([tmp_path / "d"])
    assert docs[0] == {"text": "plain text", "bos": True, "eos": True}
    assert [parse_json_record(d["json"], d["where"]) for d in docs[1:]] == [{"text": "one"}, {"messages": DIALOG}]


def test_long_text_files_are_cut_at_newlines(tmp_path, byte_tokenizer):
    from llama_jax.tokenizer import Llama3Tokenizer

    tok = Llama3Tokenizer(byte_tokenizer)
    text = "line one\nline two\nline three\nfour\n"
    (tmp_path / "a.txt").write_text(text)
    chunks = all_documents([tmp_path / "a.txt"], text_chunk_bytes=20)
    assert "".join(c["text"] for c in chunks) == text
    assert len(chunks) > 1 and all(c["text"].endswith("\n") for c in chunks)
    # The file is one document cut in pieces: bos opens only the first, eos closes only the last.
    ids = [tokenize_document(tok, c) for c in chunks]
    assert [c["bos"] for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert [c["eos"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert ids[0]["inputs"][0] == tok.bos_id and ids[1]["inputs"][0] != tok.bos_id
    assert ids[-1]["targets"][-1] == tok.eos_id and ids[0]["targets"][-1] != tok.eos_id


def test_tables_give_one_document_per_row(tmp_path):
    table = pa.table({"body": ["a", "b", None, "c"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert all_documents([tmp_path / "t.parquet"], column="body") == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    write_datasets_dir(tmp_path / "ds", table)
    assert all_documents([tmp_path], column="body")[:3] == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    # A 'messages' column is chat, when the text column is absent.
    chat = pa.table({"messages": [DIALOG]})
    pq.write_table(chat, tmp_path / "chat.parquet")
    assert all_documents([tmp_path / "chat.parquet"]) == [{"messages": DIALOG}]


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        find_sources([tmp_path / "missing.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    bad = all_documents([tmp_path / "bad.jsonl"])[1]
    with pytest.raises(ValueError, match="bad.jsonl, line starting at byte 15: not valid JSON"):
        tokenize_document(None, bad)
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="needs a 'text' or a 'messages' field"):
        tokenize_document(None, all_documents([tmp_path / "nofield.jsonl"])[0])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: no column 'text' \(it has body\); name the text column"):
        all_documents([tmp_path / "t.parquet"])
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(ValueError, match="DatasetDict with splits train, test: pass one split's directory"):
        find_sources([tmp_path / "dd"])


def test_builtin_corpus_is_python_source():
    paths = builtin_corpus_paths()
    assert len(paths) >= 30 and all(p.endswith(".py") for p in paths)
