"""Tiny corpora and a byte-level tokenizer for the data tests."""

import json

import numpy as np
import pytest

from llama_jax.tokenizer import write_byte_tokenizer

SEQ = 32  # tokens per row of the prepared corpus
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def texts(n=60, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcdefgh \n"), rng.integers(3, 40))) for _ in range(n)]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory) -> str:
    return write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """Plain-text and chat records in one JSONL file."""
    records = [{"text": t} for t in texts()] + [{"messages": DIALOG}] * 3 + [{"text": t} for t in texts(20, 1)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", records)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus, byte_tokenizer):
    """`corpus` prepared through the CLI, with one worker."""
    from llama_jax.data.__main__ import main

    out = tmp_path_factory.mktemp("prepared") / "data"
    assert main(["prepare", "--data", corpus, "--tokenizer", byte_tokenizer, "--seq-len", str(SEQ), "--out", str(out),
                 "--workers", "1", "--no-progress"]) == 0
    return out
