"""prepare(): sources -> documents -> token ids (in worker processes) -> packed rows -> shards.

Workers only tokenize; this process packs and writes in document order, so the shards are
byte-identical whatever the number of workers. The work goes to a temporary directory beside DATA
that is renamed to DATA at the end: a DATA directory is always complete. A DATA that already
exists is reused when its manifest says it was made from the same inputs (sources' sha256, the
tokenizer's, seq_len, the column), and refused otherwise.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_jax.data import store
from llama_jax.data.pack import Packer, concatenate
from llama_jax.data.sources import Source, builtin_corpus_paths, documents, find_sources
from llama_jax.data.tokens import parse_json_record, tokenize_record, tokenizer_identity

CHUNK_BYTES = 1 << 20  # documents go to a worker in lists of about this much text
AUTO_WORKERS_BYTES = 64 << 20  # below this, spawning workers costs more than it saves


def text_chunk_bytes(seq_len: int) -> int:
    """A long text file is tokenized in pieces of about 1-4 rows, whatever the tokenizer."""
    return 4 * seq_len


# Tokenizing, in workers ------------------------------------------------------------------------

_tokenizer = None


def _load_worker_tokenizer(path: str) -> None:
    from llama_jax.tokenizer import load_tokenizer

    global _tokenizer
    _tokenizer = load_tokenizer(path)


def tokenize_document(tokenizer, document: dict[str, Any]):
    record = parse_json_record(document["json"], document["where"]) if "json" in document else document
    try:
        return tokenize_record(tokenizer, record)
    except ValueError as e:
        where = document.get("where")
        raise ValueError(f"{where}: {e}" if where else str(e)) from None


def _tokenize_chunk(chunk: list[dict[str, Any]]) -> dict:
    return concatenate([tokenize_document(_tokenizer, d) for d in chunk])


def _chunks(sources: Sequence[Source], column: str, text_bytes: int,
            chunk_bytes: int) -> Iterator[tuple[list[dict], float]]:
    chunk, size = [], 0.0
    for source in sources:
        for document, nbytes in documents(source, column, text_bytes):
            chunk.append(document)
            size += nbytes
            if size >= chunk_bytes:
                yield chunk, size
                chunk, size = [], 0.0
    if chunk:
        yield chunk, size


def _tokenized(chunks, tokenizer_path: str, workers: int):
    """(token stream, bytes) per chunk, in order: here for one worker, else over `workers` processes with
    a bounded number of chunks in flight (memory stays flat however large the input)."""
    if workers == 1:
        _load_worker_tokenizer(tokenizer_path)
        for chunk, size in chunks:
            yield _tokenize_chunk(chunk), size
        return
    # spawn, not fork: a caller (the trainer, the tests) may hold jax's threads
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_load_worker_tokenizer,
                                                initargs=(tokenizer_path,)) as pool:
        pending = collections.deque()
        try:
            for chunk, size in chunks:
                pending.append((pool.submit(_tokenize_chunk, chunk), size))
                if len(pending) >= 2 * workers:
                    future, done_size = pending.popleft()
                    yield future.result(), done_size
            while pending:
                future, done_size = pending.popleft()
                yield future.result(), done_size
        finally:
            for future, _ in pending:
                future.cancel()


# The manifest's inputs -------------------------------------------------------------------------

def _inputs(sources: Sequence[Source], tokenizer_path: str, seq_len: int, column: str) -> dict[str, Any]:
    return {"format": store.FORMAT, "seq_len": seq_len, "column": column,
            "tokenizer": {"path": str(tokenizer_path), **tokenizer_identity(tokenizer_path)},
            "sources": [s.identity() for s in sources]}


def _differences(manifest: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    found = []
    if manifest.get("seq_len") != wanted["seq_len"]:
        found.append(f"seq_len {manifest.get('seq_len')}, not {wanted['seq_len']}")
    if manifest.get("tokenizer", {}).get("sha256") != wanted["tokenizer"]["sha256"]:
        found.append(f"tokenizer {manifest.get('tokenizer', {}).get('path')}, not {wanted['tokenizer']['path']}")
    content = lambda sources: [(s["kind"], s["bytes"], s["sha256"]) for s in sources]  # noqa: E731 - paths may move
    if content(manifest.get("sources", [])) != content(wanted["sources"]):
        found.append("other source files")
    elif manifest.get("column") != wanted["column"] and any(s["kind"] in ("parquet", "datasets")
                                                             for s in wanted["sources"]):
        found.append(f"column {manifest.get('column')!r}, not {wanted['column']!r}")
    return found


def _reuse(out: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    manifest = store.read_manifest(out)
    differences = _differences(manifest, wanted)
    if differences:
        raise ValueError(f"{out} holds data prepared from other inputs ({'; '.join(differences)}): "
                         "remove it or choose another directory")
    store.PreparedData(out)  # every shard there, with its size
    return manifest


# prepare ---------------------------------------------------------------------------------------

def prepare(paths: Sequence[str | os.PathLike], tokenizer_path: str | os.PathLike, seq_len: int,
            out: str | os.PathLike, *, workers: int | None = None, column: str = "text",
            progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Prepare (or reuse) the dataset at `out`; returns its manifest. `paths` empty: the built-in
    corpus. `workers` None: one when the sources are small, else one per CPU. `chunk_bytes`: how much
    text a worker gets at a time (it changes nothing in the output)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    out = Path(out)
    sources = find_sources(paths or builtin_corpus_paths())
    wanted = _inputs(sources, str(tokenizer_path), seq_len, column)
    if out.exists():
        return _reuse(out, wanted)
    total = sum(s["bytes"] for s in wanted["sources"])
    if workers is None:
        workers = 1 if total < AUTO_WORKERS_BYTES else os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write(tmp, sources, wanted, workers, progress, total, chunk_bytes)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.exists():
                raise
            shutil.rmtree(tmp)  # another process prepared it meanwhile: the same rows, if the same inputs
            return _reuse(out, wanted)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(tmp: Path, sources, wanted: dict[str, Any], workers: int, progress: bool, total: int,
           chunk_bytes: int) -> dict[str, Any]:
    from tqdm import tqdm

    seq_len = wanted["seq_len"]
    packer, writer = Packer(seq_len), store.ShardWriter(tmp, seq_len)
    chunks = _chunks(sources, wanted["column"], text_chunk_bytes(seq_len), chunk_bytes)
    with tqdm(total=total, desc=f"prepare ({workers} worker{'s' * (workers > 1)})", unit="B", unit_scale=True,
              disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for stream, size in _tokenized(chunks, wanted["tokenizer"]["path"], workers):
            rows = packer.add(stream)
            if rows is not None:
                writer.write(rows)
            bar.update(size)
        last = packer.finish()
        if last is not None:
            writer.write(last)
    shards = writer.close()
    if not shards:
        raise ValueError(f"no documents in {', '.join(s['path'] for s in wanted['sources'])}")
    manifest = {**wanted, "rows": sum(s["rows"] for s in shards), "tokens": writer.tokens,
                "loss_tokens": writer.loss_tokens, "shards": shards}
    (tmp / store.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
