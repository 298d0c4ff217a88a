"""Where documents come from: text, JSONL (text or chat), Parquet and Hugging Face `datasets`
directories (what `save_to_disk` writes: Arrow stream files + dataset_info.json + state.json,
read here with pyarrow alone, nothing downloaded).

    find_sources(paths) -> [Source]           files named; directories walked in sorted order
    documents(source, column, chunk_bytes)    the source's documents in order, each with its byte share

A document is a dict: {'text', 'bos', 'eos'} for a chunk of a text file, {'json', 'where'} for a
JSONL line (parsed where it is tokenized, in a worker), {'text'} or {'messages'} for a table row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATASET_STATE = "state.json"  # marks a directory written by datasets' save_to_disk
DATASET_DICT = "dataset_dict.json"  # ... and a DatasetDict's, one sub-directory per split

# The built-in corpus: Python's own standard library sources, present on every install, so the
# trainer runs out of the box with no download. Paths are relative to the stdlib directory; files a
# given Python lacks are skipped.
BUILTIN_CORPUS = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py",
    "enum.py", "fnmatch.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "heapq.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "optparse.py", "pprint.py",
    "queue.py", "random.py", "sched.py", "shlex.py", "shutil.py", "statistics.py", "string.py",
    "subprocess.py", "tempfile.py", "textwrap.py", "threading.py", "tokenize.py", "traceback.py",
    "typing.py", "warnings.py", "weakref.py",
)


def builtin_corpus_paths() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = [os.path.join(stdlib, rel) for rel in BUILTIN_CORPUS]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ValueError(f"no built-in corpus: none of the standard library files were found under {stdlib}")
    return paths


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # 'text' | 'jsonl' | 'parquet' | 'datasets'
    files: tuple[Path, ...]  # what is read, in order: the file itself, or a datasets directory's Arrow files

    def identity(self) -> dict[str, Any]:
        """Its path, size and one sha256 over its files' bytes: what a manifest records."""
        digest, size = hashlib.sha256(), 0
        for f in self.files:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 24):
                    digest.update(block)
                    size += len(block)
        return {"path": str(self.path), "kind": self.kind, "bytes": size, "sha256": digest.hexdigest()}


def _file_source(f: Path) -> Source:
    kind = "jsonl" if f.suffix in JSONL_SUFFIXES else "parquet" if f.suffix in PARQUET_SUFFIXES else "text"
    return Source(f, kind, (f,))


def _datasets_source(d: Path) -> Source:
    if (d / DATASET_DICT).is_file():
        splits = json.loads((d / DATASET_DICT).read_text()).get("splits", [])
        raise ValueError(f"{d} is a datasets DatasetDict with splits {', '.join(splits)}: pass one split's "
                         f"directory, e.g. {d / (splits[0] if splits else 'train')}")
    try:
        files = [d / entry["filename"] for entry in json.loads((d / DATASET_STATE).read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{d / DATASET_STATE}: not a datasets state file ({e!r})") from None
    for f in files:
        if not f.is_file():
            raise ValueError(f"{d}: its {DATASET_STATE} names {f.name}, which is missing")
    return Source(d, "datasets", tuple(files))


def _is_datasets_dir(d: Path) -> bool:
    return (d / DATASET_STATE).is_file() or (d / DATASET_DICT).is_file()


def _walk(d: Path) -> Iterator[Source]:
    for entry in sorted(d.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from ([_datasets_source(entry)] if _is_datasets_dir(entry) else _walk(entry))
        elif entry.is_file():
            yield _file_source(entry)


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, plus every non-hidden file under named directories, in sorted order (preference
    data, train/preferences.py, is read as plain files)."""
    return [f for s in find_sources(paths) for f in (s.files if s.kind != "datasets" else (s.path,))]


def find_sources(paths: Sequence[str | os.PathLike]) -> list[Source]:
    """Files named, plus every non-hidden file under named directories, in sorted order; a `datasets`
    directory (anywhere) is one source."""
    sources: list[Source] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [_datasets_source(p)] if _is_datasets_dir(p) else list(_walk(p))
            if not found:
                raise ValueError(f"data directory {p} holds no files")
            sources.extend(found)
        elif p.is_file():
            sources.append(_file_source(p))
        else:
            raise ValueError(f"data path {p} does not exist")
    return sources


# Documents -----------------------------------------------------------------------------------

def documents(source: Source, column: str = "text", text_chunk_bytes: int = 1 << 16) -> Iterator[tuple[dict, float]]:
    """(document, bytes of the source it accounts for, for progress), in the source's order."""
    if source.kind == "text":
        yield from _text_chunks(source.path, text_chunk_bytes)
    elif source.kind == "jsonl":
        yield from _jsonl_lines(source.path)
    else:
        yield from _table_rows(source, column)


def _text_chunks(path: Path, chunk_bytes: int):
    """A text file cut at newlines into chunks of about `chunk_bytes`: only the first starts with bos
    and only the last ends with eos (the file is one document, in pieces no longer than a few rows)."""
    data = path.read_bytes()
    start = 0
    while start < len(data):
        end = min(start + chunk_bytes, len(data))
        if end < len(data):
            newline = data.rfind(b"\n", start, end)
            end = newline + 1 if newline > start else end
        text = data[start:end].decode("utf-8", errors="replace")
        yield {"text": text, "bos": start == 0, "eos": end == len(data)}, end - start
        start = end


def _jsonl_lines(path: Path):
    start = 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                where = f"{path}, line starting at byte {start}"
                yield {"json": line.decode("utf-8", errors="replace"), "where": where}, len(line)
            start += len(line)


def _table_column(path: Path, names: Sequence[str], column: str) -> str:
    """The column a table's documents come from: `column` (text) or else 'messages' (chat)."""
    if column in names:
        return column
    if "messages" in names:
        return "messages"
    raise ValueError(f"{path}: no column {column!r} (it has {', '.join(names) or 'none'}); "
                     "name the text column with --column")


def _tables(source: Source):
    """(file, its column names, its record batches, its row count) for each of a table source's files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in source.files:
        try:
            if source.kind == "parquet":
                table = pq.ParquetFile(f)
                rows = table.metadata.num_rows
                yield f, table.schema_arrow.names, table.iter_batches(batch_size=1024), rows
            else:
                with pa.memory_map(str(f)) as mm:
                    try:
                        reader = pa.ipc.open_stream(mm)  # what datasets writes
                    except pa.ArrowInvalid:
                        reader = pa.ipc.open_file(mm)
                    table = reader.read_all()
                yield f, table.schema.names, iter(table.to_batches(max_chunksize=1024)), table.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{f}: cannot read it as {source.kind} ({' '.join(str(e).split())})") from None


def _table_rows(source: Source, column: str):
    for f, names, batches, rows in _tables(source):
        chosen = _table_column(f, names, column)
        key = "messages" if chosen == "messages" else "text"
        row_bytes = f.stat().st_size / max(rows, 1)  # for the progress bar only
        for batch in batches:
            for value in batch.column(chosen).to_pylist():
                if value is not None:
                    yield {key: value}, row_bytes
