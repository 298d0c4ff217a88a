"""Preference data for DPO and reward models: records -> tokenized (chosen, rejected) pairs -> packed,
checkpointable batches.

    JSONL records, one per line, either plain text (a base model's view: no chat format)
        {"prompt": "...", "chosen": "...", "rejected": "..."}
    or a chat, rendered through the tokenizer's own chat format (Llama 3's headers, or an HF model's template)
        {"messages": [{"role", "content"}, ...], "chosen": {assistant message}, "rejected": {assistant message}}
      -> two sequences per record, prompt + chosen and prompt + rejected, weight 1 on the response's
         targets only (its content and the token that ends it; the prompt is masked)
      -> packed whole pairs into rows: a pair's two sequences sit side by side in one row as
         segments 2k+1 (chosen) and 2k+2 (rejected), so a row holds pairs 0, 1, ... and every
         gradient-accumulation microbatch (a subset of rows) holds whole pairs

A reward model (`scored`) reads each sequence whole instead, its last token included (the end of
the response, which is the token scored), with weight 1 on that token only and no targets.

Every record is read, checked and tokenized when the run starts, so a bad one stops the run before
any step with one line naming it; a preference set is small next to a pre-training corpus. The
batches are a pure function of (seed, epoch, position in the epoch's permutation), so the iterator
state is a small JSON dict and resume is exact on any mesh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from llama_jax.data.sources import JSONL_SUFFIXES, expand_paths
from llama_jax.hf_tokenizer import HFTokenizer

PREFERENCE_BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "reference")


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    where: str  # "prefs.jsonl record 3 (line 4)", for error messages
    prompt: str | list  # plain-text prompt, or the chat's messages
    chosen: Any  # text, or an assistant message dict
    rejected: Any


# Reading -------------------------------------------------------------------------------------

def _check_response(value, chat: bool, name: str) -> str | None:
    """Why `value` is not a usable response, or None."""
    if chat:
        if not isinstance(value, dict):
            return f"'{name}' must be an assistant message {{\"role\": \"assistant\", \"content\": ...}}"
        if value.get("role", "assistant") != "assistant":
            return f"'{name}' must be an assistant message, got role {value.get('role')!r}"
        value = value.get("content")
    if not isinstance(value, str):
        return f"'{name}' must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"'{name}' is an empty response"
    return None


def _check_record(record) -> str | None:
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    for name in ("chosen", "rejected"):
        if name not in record:
            return f"no '{name}' field (a preference record has 'prompt' or 'messages', 'chosen' and 'rejected')"
    if ("prompt" in record) == ("messages" in record):
        return "a preference record needs exactly one of 'prompt' (plain text) or 'messages' (chat)"
    chat = "messages" in record
    if chat:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    elif not isinstance(record["prompt"], str):
        return f"'prompt' must be a string, got {type(record['prompt']).__name__}"
    for name in ("chosen", "rejected"):
        problem = _check_response(record[name], chat, name)
        if problem:
            return problem
    return None


def read_preferences(paths: Sequence[str | os.PathLike]) -> list[PreferenceRecord]:
    """Every record of the JSONL files (or directories of them), checked; ValueError naming the first
    bad one by file and record number (1-based, blank lines not counted)."""
    records = []
    for path in expand_paths(paths):
        if path.suffix not in JSONL_SUFFIXES:
            raise ValueError(f"{path}: preference data must be JSONL ({', '.join(JSONL_SUFFIXES)}), one record a line")
        number = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                number += 1
                where = f"{path} record {number} (line {line_number})"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from None
                problem = _check_record(record)
                if problem:
                    raise ValueError(f"{where}: {problem}")
                prompt = record["messages"] if "messages" in record else record["prompt"]
                records.append(PreferenceRecord(where, prompt, record["chosen"], record["rejected"]))
    if not records:
        raise ValueError(f"no preference records in {[str(p) for p in paths]}")
    return records


# Tokenizing ----------------------------------------------------------------------------------

def response_ids_and_weights(tokenizer, prompt, response) -> tuple[list[int], list[float]]:
    """The ids of prompt + response, weight 1 on the response's tokens (content and its end token).

    Plain text: bos, the prompt, the response, eos, each encoded alone (the boundary is a token
    boundary whatever the BPE). Chat: `encode_dialog(messages)` (bos, the turns, an open assistant
    header), then the response turn's content and eot, exactly what inference prompts and samples; an
    HF tokenizer renders its own template, and only the final assistant turn is weighted.
    """
    if isinstance(prompt, str):
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        response_ids = tokenizer.encode(response, bos=False, eos=True)
        return prompt_ids + response_ids, [0.0] * len(prompt_ids) + [1.0] * len(response_ids)
    message = {"role": "assistant", **response}
    if isinstance(tokenizer, HFTokenizer):
        ids, weights = tokenizer.encode_dialog_for_training([*prompt, message])
        if not any(weights):
            return ids, weights
        # Earlier assistant turns of the prompt are weighted too: keep only the last weighted run.
        last = max(i for i, w in enumerate(weights) if w)
        first = last
        while first > 0 and weights[first - 1]:
            first -= 1
        return ids, [1.0 if first <= i <= last else 0.0 for i in range(len(ids))]
    if not hasattr(tokenizer, "encode_message"):
        raise ValueError(f"chat records need a Llama 3 or a Hugging Face chat tokenizer, not "
                         f"{type(tokenizer).__name__}")
    prompt_ids = tokenizer.encode_dialog(prompt)
    body = tokenizer.encode_message(message)[len(tokenizer.encode_header("assistant")):]  # content + eot
    return prompt_ids + body, [0.0] * len(prompt_ids) + [1.0] * len(body)


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """One training sequence: inputs[t] predicts targets[t], weighted."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    @classmethod
    def from_ids(cls, ids: list[int], weights: list[float]) -> "Tokenized":
        ids_a = np.asarray(ids, np.int32)
        return cls(ids_a[:-1], ids_a[1:], np.asarray(weights[1:], np.float32))

    @classmethod
    def scored(cls, ids: list[int]) -> "Tokenized":
        """The whole sequence as inputs, weight 1 on its last token (a reward model's score), no targets."""
        weights = np.zeros(len(ids), np.float32)
        weights[-1] = 1.0
        return cls(np.asarray(ids, np.int32), np.zeros(len(ids), np.int32), weights)

    def __len__(self) -> int:
        return len(self.inputs)


class PreferencePairs:
    """The tokenized records: `pairs[i]` is record i's (chosen, rejected) pair of sequences, for DPO's
    next-token log-probs, or `scored` whole for a reward model (Tokenized.scored)."""

    def __init__(self, records: Sequence[PreferenceRecord], tokenizer, seq_len: int, scored: bool = False):
        self.seq_len = seq_len
        self.pairs: list[tuple[Tokenized, Tokenized]] = []
        digest = hashlib.sha256()
        for record in records:
            pair = []
            for name in ("chosen", "rejected"):
                try:
                    ids, weights = response_ids_and_weights(tokenizer, record.prompt, getattr(record, name))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{record.where}: {name}: {e}") from None
                if not any(weights[1:]):
                    raise ValueError(f"{record.where}: '{name}' renders to no response tokens")
                seq = Tokenized.scored(ids) if scored else Tokenized.from_ids(ids, weights)
                pair.append(seq)
                digest.update(seq.inputs.tobytes() + seq.targets[-1:].tobytes() + seq.weights.tobytes())
            if len(pair[0]) + len(pair[1]) > seq_len:
                raise ValueError(f"{record.where}: prompt + chosen and prompt + rejected are {len(pair[0])} + "
                                 f"{len(pair[1])} tokens, more than one row of --seq-len {seq_len} holds (a pair "
                                 f"shares a row); raise --seq-len or shorten the record")
            self.pairs.append((pair[0], pair[1]))
        # Names the tokenized data, so stored reference log-probs are never applied to other data.
        self.fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.pairs)


# Packing -------------------------------------------------------------------------------------

def pack_pairs(pairs: PreferencePairs, indices: Iterable[int], batch_size: int,
               reference: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]:
    """One [batch_size, seq_len] batch of whole pairs, taken in order from `indices` until the rows are
    full or `indices` ends, and where each went: (pair, row, k) for segments 2k+1 (chosen) and 2k+2
    (rejected) of that row; len(placed) pairs of `indices` were used.

    Rows fill greedily: a pair that does not fit in the current row starts the next one. `reference`
    [num_pairs, 2] (chosen, rejected) reference log-prob sums go on each sequence's first token of
    batch["reference"], zeros elsewhere: a segment sum recovers them whatever order the tokens are put in.
    """
    T = pairs.seq_len
    batch = {k: np.zeros((batch_size, T), np.float32 if k in ("weights", "reference") else np.int32)
             for k in PREFERENCE_BATCH_KEYS}
    placed = []
    row, used, k = 0, 0, 0
    for i in indices:
        chosen, rejected = pairs.pairs[i]
        if used + len(chosen) + len(rejected) > T:  # PreferencePairs checked that every pair fits a row
            row, used, k = row + 1, 0, 0
            if row == batch_size:
                break
        for which, seq in enumerate((chosen, rejected)):
            span = slice(used, used + len(seq))
            batch["inputs"][row, span] = seq.inputs
            batch["targets"][row, span] = seq.targets
            batch["weights"][row, span] = seq.weights
            batch["positions"][row, span] = np.arange(len(seq))
            batch["segment_ids"][row, span] = 2 * k + 1 + which
            if reference is not None:
                batch["reference"][row, used] = reference[i, which]
            used += len(seq)
        placed.append((i, row, k))
        k += 1
    return batch, placed


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
    paths: tuple[str, ...]
    seq_len: int = 256
    batch_size: int = 16  # global rows per step
    seed: int = 0
    scored: bool = False  # whole sequences for a reward model (no "reference"), else DPO's


_STATE_KEYS = ("seq_len", "batch_size", "seed")


class PreferenceBatches:
    """Global batches of [batch_size, seq_len] arrays (PREFERENCE_BATCH_KEYS) of whole shuffled pairs,
    reshuffled every epoch, with a JSON-able state: (epoch, pairs of it used).

    batch["reference"] needs `reference` ([num_pairs, 2] log-prob sums under the reference model)
    set first: see dpo.prepare_reference. A reward model's batches (cfg.scored) have no "reference".
    """

    def __init__(self, cfg: PreferenceDataConfig, tokenizer, records: Sequence[PreferenceRecord] | None = None):
        self.cfg = cfg
        self.pairs = PreferencePairs(records if records is not None else read_preferences(cfg.paths), tokenizer,
                                     cfg.seq_len, cfg.scored)
        self.reference: np.ndarray | None = None
        self._epoch, self._pos = 0, 0
        self._order_cache: tuple[int, np.ndarray | None] = (-1, None)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng((self.cfg.seed, epoch)).permutation(len(self.pairs)))
        return self._order_cache[1]

    def _upcoming(self) -> Iterator[int]:
        """Pair indices from the current position on, across epochs; the position does not move."""
        epoch, pos = self._epoch, self._pos
        while True:
            order = self._order(epoch)
            yield from (int(i) for i in order[pos:])
            epoch, pos = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.reference is None and not self.cfg.scored:
            raise RuntimeError("PreferenceBatches.reference is not set: compute the reference log-probs first")
        batch, placed = pack_pairs(self.pairs, self._upcoming(), self.cfg.batch_size, self.reference)
        self._epoch, self._pos = divmod(self._epoch * len(self.pairs) + self._pos + len(placed), len(self.pairs))
        if self.cfg.scored:
            del batch["reference"]
        return batch

    def state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "pos": self._pos, "fingerprint": self.pairs.fingerprint,
                **{k: getattr(self.cfg, k) for k in _STATE_KEYS}}

    def restore(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in (*_STATE_KEYS, "fingerprint")}
        now = {**{k: getattr(self.cfg, k) for k in _STATE_KEYS}, "fingerprint": self.pairs.fingerprint}
        if saved != now:
            raise ValueError(f"the checkpoint's preference data iterator was made with {saved}, this run has {now}; "
                             "resume with the same --data, --seq-len, --batch-size and --seed")
        self._epoch, self._pos = state["epoch"], state["pos"]
