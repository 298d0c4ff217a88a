"""Training data with grain: documents -> token ids -> packed, shuffled, checkpointable global batches.

    files (text, JSONL with `text` or chat `messages`, or directories of them)
      -> Documents (random access by index)                   grain MapDataset: shuffle per epoch, repeat
      -> tokenize: inputs, targets (inputs shifted by one), weights
      -> pack into rows of seq_len (ConcatThenSplit)          segment ids + per-document positions
      -> shuffle rows in windows, stack the *global* batch    each process then takes its own rows

Every process builds the same pipeline and reads the same global batches, so the iterator state is
one small JSON dict that does not depend on the mesh or the number of processes: a run resumes
exactly on a different data-parallel size. Loss weights are 1 on every target of plain text and,
for chat, 1 only on assistant content and the eot that ends it (the model learns to answer and to
stop, never to write the user's turns or the headers a chat prompt already supplies).

grain is imported inside the functions: serving machines do not need it.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.hf_tokenizer import HFTokenizer

JSONL_SUFFIXES = (".jsonl", ".json")

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


def write_byte_tokenizer(path: str | os.PathLike) -> str:
    """A Llama 3-format tokenizer file with the 256 bytes as its only base tokens.

    Read by `Llama3Tokenizer`, it gives 256 byte ids plus Meta's 256 special tokens (bos 256, eos 257,
    eot 265, ...): a 512-token vocabulary, small enough that a tiny model trains on CPU in minutes,
    with the real chat format and stop tokens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# Documents -----------------------------------------------------------------------------------

def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, plus every non-hidden file under named directories, in sorted order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"data directory {p} holds no files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"data path {p} does not exist")
    return files


class Documents:
    """Random access to documents: one per JSONL line, or a chunk of a text file.

    A text file is cut at newlines into chunks of about `text_chunk_bytes`, so a corpus of a few
    long files still shuffles well; only the first chunk starts with bos and only the last ends
    with eos. Only byte offsets are kept in memory; a document is read when asked for.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], text_chunk_bytes: int = 1 << 16):
        self.files = expand_paths(paths)
        self._spans: list[tuple[int, int, int]] = []  # (file index, start byte, end byte)
        self._sizes: list[int] = []
        for i, f in enumerate(self.files):
            data = f.read_bytes()
            self._sizes.append(len(data))
            if f.suffix in JSONL_SUFFIXES:
                start = 0
                for line in data.splitlines(keepends=True):
                    if line.strip():
                        self._spans.append((i, start, start + len(line)))
                    start += len(line)
            else:
                start = 0
                while start < len(data):
                    end = min(start + text_chunk_bytes, len(data))
                    if end < len(data):
                        newline = data.rfind(b"\n", start, end)
                        end = newline + 1 if newline > start else end
                    self._spans.append((i, start, end))
                    start = end
        if not self._spans:
            raise ValueError(f"no documents in {[str(f) for f in self.files]}")

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, start, end = self._spans[index]
        f = self.files[i]
        with open(f, "rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start).decode("utf-8", errors="replace")
        if f.suffix not in JSONL_SUFFIXES:
            return {"text": raw, "bos": start == 0, "eos": end == self._sizes[i]}
        where = f"{f}, line starting at byte {start}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or ("text" not in record and "messages" not in record):
            raise ValueError(f"{where}: a record needs a 'text' or a 'messages' field")
        return {k: record[k] for k in ("text", "messages") if k in record}


# Tokenizing ----------------------------------------------------------------------------------

def chat_ids_and_weights(tokenizer, messages) -> tuple[list[int], list[float]]:
    """bos + each message as header, content, eot; weight 1 on assistant content and its end token.

    Built from the tokenizer's own pieces (`encode_header`, `encode_message`), so the ids are exactly
    those `encode_dialog` gives a prompt. Another model's tokenizer renders its own chat template.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of {{role, content}} dicts, got {messages!r}")
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_dialog_for_training(messages)
    ids, weights = [tokenizer.bos_id], [0.0]
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        header = tokenizer.encode_header(role)
        body = tokenizer.encode_message(message)[len(header):]  # content + eot (or eom)
        ids += header + body
        weights += [0.0] * len(header) + [1.0 if role == "assistant" else 0.0] * len(body)
    return ids, weights


def tokenize_record(tokenizer, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Next-token training example: inputs[t] predicts targets[t] = ids[t + 1], weighted."""
    if "messages" in record:
        ids, weights = chat_ids_and_weights(tokenizer, record["messages"])
    else:
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, got {type(text).__name__}")
        ids = tokenizer.encode(text, bos=record.get("bos", True), eos=record.get("eos", True))
        weights = [1.0] * len(ids)
    ids_a = np.asarray(ids, np.int32)
    return {"inputs": ids_a[:-1], "targets": ids_a[1:], "weights": np.asarray(weights[1:], np.float32)}


# The pipeline --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()  # empty: the built-in corpus
    seq_len: int = 256
    batch_size: int = 16  # global: rows per step over all processes
    seed: int = 0
    shuffle_window: int = 256  # packed rows shuffled together, so a batch mixes many documents

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1 or self.shuffle_window < 0:
            raise ValueError(f"need seq_len >= 2, batch_size >= 1, shuffle_window >= 0; got {self}")

    @property
    def text_chunk_bytes(self) -> int:
        return 4 * self.seq_len  # about 1-4 rows of text per chunk, whatever the tokenizer


BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


def make_rows(cfg: DataConfig, tokenizer):
    """The grain IterDataset of packed rows: dicts of [seq_len] numpy arrays.

    inputs/targets int32, weights float32 (0 on padding and unweighted targets), positions (restart
    at 0 in each document) and segment_ids (1, 2, ... per document in a row, 0 for padding) int32.
    """
    import grain
    from grain.experimental import ConcatThenSplitIterDataset

    docs = Documents(cfg.paths or builtin_corpus_paths(), cfg.text_chunk_bytes)
    records = grain.MapDataset.source(docs).shuffle(seed=cfg.seed).repeat()  # reshuffled every epoch
    examples = records.map(lambda r: tokenize_record(tokenizer, r)).to_iter_dataset()
    T = cfg.seq_len
    packed = ConcatThenSplitIterDataset(examples, length_struct={"inputs": T, "targets": T, "weights": T})
    return packed.map(_rename_packed)


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"inputs": row["inputs"], "targets": row["targets"], "weights": row["weights"],
            "positions": row["inputs_positions"].astype(np.int32, copy=False),
            "segment_ids": row["inputs_segment_ids"].astype(np.int32, copy=False)}


def _lists_to_tuples(state):
    """Undo JSON's tuple -> list: grain's packer compares its slices to a tuple sentinel, so a state
    read back from JSON with lists would restore the wrong rows."""
    if isinstance(state, dict):
        return {k: _lists_to_tuples(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return tuple(_lists_to_tuples(v) for v in state)
    return state


_STATE_KEYS = ("seq_len", "batch_size", "seed", "shuffle_window")


class BatchIterator:
    """Global batches of [batch_size, seq_len] arrays (keys BATCH_KEYS) with a JSON-able state.

    Packed rows are shuffled in windows of `shuffle_window` rows (consecutive rows come from the
    same document), then stacked. The state is the row iterator's state where the current window
    began, the window's index (which seeds its permutation) and the position in it: restoring
    refills that window and skips what was used, so `restore(state())` continues exactly.
    """

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg = cfg
        self._rows = iter(make_rows(cfg, tokenizer))
        self._window_start = self._rows.get_state()
        self._window_index = 0
        self._window: list[dict[str, np.ndarray]] = []
        self._pos = 0

    def _fill(self) -> None:
        size = max(self.cfg.shuffle_window, 1)
        rows = [next(self._rows) for _ in range(size)]
        order = np.random.default_rng((self.cfg.seed, self._window_index)).permutation(size)
        self._window = [rows[i] for i in order]

    def _next_row(self) -> dict[str, np.ndarray]:
        if self._pos == len(self._window):
            if self._window:
                self._window_index += 1
            self._window_start = self._rows.get_state()
            self._fill()
            self._pos = 0
        row = self._window[self._pos]
        self._pos += 1
        return row

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row() for _ in range(self.cfg.batch_size)]
        return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}

    def state(self) -> dict[str, Any]:
        return {"rows": copy.deepcopy(self._window_start), "window_index": self._window_index,
                "pos": self._pos, **{k: getattr(self.cfg, k) for k in _STATE_KEYS}}

    def restore(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in _STATE_KEYS}
        now = {k: getattr(self.cfg, k) for k in saved}
        if saved != now:
            raise ValueError(f"the checkpoint's data iterator was made with {saved}, this run asks for {now}; "
                             "resume with the same --seq-len, --batch-size and --seed")
        rows_state = _lists_to_tuples(state["rows"])
        self._rows.set_state(rows_state)
        self._window_start, self._window_index = rows_state, state["window_index"]
        self._fill()
        self._pos = state["pos"]
