"""Best-of-N (rejection sampling): K answers per prompt from a policy, scored by a reward model; the
best kept as an SFT record and the best and worst as a DPO pair. The loop Meta post-trained Llama 3
with (SFT, rejection sampling, DPO), each output file read by `python -m llama_jax.train` unchanged:

    out.jsonl        {"messages": [..., {"role": "assistant", "content": BEST}], "samples": [{"content", "score"}, ..],
                      "best_score": ...}                      (plain prompts: {"text": PROMPT + BEST, ...})
    out.pairs.jsonl  {"messages": [...], "chosen": {"role": "assistant", "content": BEST}, "rejected": {.. WORST}}
                                                              (plain prompts: {"prompt", "chosen", "rejected"})

The K answers of a prompt are one request with n = K in the batching engine: the prompt is prefilled
once and its pages shared by its samples; the reward model reads the prompt once too, its K answers
on its cached pages (shared_prefix.py). Sample i of prompt p draws with key stream p * K + i, so
a run is a function of the seed and the prompts file, and a rerun after an interruption (OUT.progress
records how far the files are complete) writes exactly what one run would have. A prompt whose best
score is under --min-score gets no SFT record; a pair whose margin is under --min-margin (or whose
best and worst answers are the same text) is left out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama_jax.infer.engine import BatchingEngine, prefill_shapes
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.tokens import PAGE_SIZE, bucket_length
from llama_jax.reward.model import sequence_ids
from llama_jax.reward.records import prompt_record, read_jsonl
from llama_jax.reward.shared_prefix import SharedPrefixScorer
from llama_jax.sharding import batch_split


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a best-of-n run does (a rerun resumes only with the same settings)."""

    num_samples: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8  # prompts sampled at once (each K rows of the engine)
    seed: int = 0
    min_score: float | None = None
    min_margin: float | None = None

    def __post_init__(self):
        if self.num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2 (a best and a worst), got {self.num_samples}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max-new-tokens and --batch-size must be >= 1")
        RequestParams(self.max_new_tokens, self.temperature, self.top_p)  # their ranges, one line each


@dataclasses.dataclass
class Summary:
    prompts: int = 0
    samples: int = 0
    kept: int = 0  # SFT records written
    pairs: int = 0
    best_scores: list = dataclasses.field(default_factory=list)
    scores: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        if not self.prompts:
            return "nothing to do: every prompt was already done"
        return (f"{self.prompts} prompts, {self.samples} samples ({self.samples / max(self.seconds, 1e-9):.1f} samples/s); "
                f"mean best score {np.mean(self.best_scores):.4g}, mean score {np.mean(self.scores):.4g}; "
                f"{self.kept} SFT records, {self.pairs} DPO pairs written")


def pairs_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".pairs" + (out.suffix or ".jsonl"))


def _policy_ids(tokenizer, prompt) -> list[int]:
    return tokenizer.encode_dialog(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt, bos=True, eos=False)


def _answer(prompt, text: str):
    return {"role": "assistant", "content": text} if isinstance(prompt, list) else text


class Progress:
    """OUT.progress: prompts done and the two files' sizes after them, written after every batch; a
    rerun truncates the files to those sizes (a batch cut short leaves nothing) and goes on."""

    def __init__(self, out: Path, settings: Settings, prompts_file: Path):
        self.path = out.with_name(out.name + ".progress")
        self.key = {**dataclasses.asdict(settings), "prompts": str(prompts_file.resolve())}
        self.done, self.sizes = 0, [0, 0]
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("key") != self.key:
                raise ValueError(f"{out} was written by a run with other settings or prompts ({self.path}): pass "
                                 f"another --out, or delete both to start again")
            self.done, self.sizes = saved["done"], saved["sizes"]
        else:
            for path in (out, pairs_path(out)):
                if path.exists() and path.stat().st_size:
                    raise ValueError(f"{path} exists and no {self.path} says which run wrote it: pass another --out, "
                                     f"or delete it")

    def save(self, done: int, sizes: list[int]) -> None:
        self.done, self.sizes = done, sizes
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"key": self.key, "done": done, "sizes": sizes}))
        partial.replace(self.path)


def read_prompts(path: str | os.PathLike) -> list[list | str]:
    """Every prompt of the file (reward.records.prompt_record), checked before any model loads."""
    prompts = [prompt_record(record, f"--prompts {path} line {number}") for number, record in read_jsonl(path, "--prompts")]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompts")
    return prompts


def best_of_n(policy, reward, prompts_file: str | os.PathLike, out: str | os.PathLike, settings: Settings = Settings(),
              *, mesh=None, reward_batch_size: int = 16, progress: bool = True, prompts=None) -> Summary:
    """policy: a load_for_inference model; reward: (cfg, params, tokenizer) of a reward model
    (reward.model.load). Appends to `out` and pairs_path(out), resuming where OUT.progress says.
    prompts: the file's, when the caller read them already (read_prompts)."""
    prompts_file, out = Path(prompts_file), Path(out)
    prompts = read_prompts(prompts_file) if prompts is None else prompts
    cfg, tokenizer, K = policy.cfg, policy.tokenizer, settings.num_samples
    ids = [_policy_ids(tokenizer, p) for p in prompts]
    for i, prompt_ids in enumerate(ids):
        if len(prompt_ids) + settings.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"--prompts {prompts_file}: prompt {i + 1} has {len(prompt_ids)} tokens; with "
                             f"--max-new-tokens {settings.max_new_tokens} that is more than the policy's context of "
                             f"{cfg.max_seq_len}")
    state = Progress(out, settings, prompts_file)
    files = [out, pairs_path(out)]
    for path, size in zip(files, state.sizes):
        with open(path, "a+b") as f:
            f.truncate(size)
    summary = Summary()
    todo = range(state.done, len(prompts))
    if not todo:
        return summary
    multiple = batch_split(mesh)
    rows = -(-settings.batch_size * K // multiple) * multiple
    context = bucket_length(max(len(ids[i]) for i in todo) + settings.max_new_tokens, cfg.max_seq_len)
    engine = BatchingEngine(cfg, policy.params, mesh=mesh, max_batch=rows, max_seq_len=context, page_size=PAGE_SIZE,
                            chunk_shapes=prefill_shapes(min(256, rows * 64), smallest=32, multiple=multiple,
                                                        max_rows=rows),
                            max_waiting=settings.batch_size)
    request = RequestParams(settings.max_new_tokens, settings.temperature, settings.top_p, seed=settings.seed, n=K,
                            stop_token_ids=tuple(tokenizer.stop_tokens))
    scorers = {}
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="best-of-n", unit="prompt", disable=None if progress else True) as bar:
        for first in range(todo.start, len(prompts), settings.batch_size):
            batch = range(first, min(first + settings.batch_size, len(prompts)))
            answers = _sample(engine, tokenizer, {p: ids[p] for p in batch}, request, K)
            lines = _score_and_write(reward, prompts, answers, settings, summary, reward_batch_size, mesh, scorers)
            for path, text in zip(files, lines):
                with open(path, "a", encoding="utf-8") as f:
                    f.write(text)
            state.save(batch.stop, [path.stat().st_size for path in files])
            summary.prompts += len(batch)
            summary.samples += len(batch) * K
            bar.update(len(batch))
    summary.seconds = time.perf_counter() - start
    return summary


def _sample(engine, tokenizer, batch: dict[int, list[int]], request: RequestParams, K: int) -> dict[int, list[str]]:
    """Each prompt's K answers (text, without the stop token), prompt p's sample i with stream p * K + i."""
    for p, prompt_ids in batch.items():
        engine.add(str(p), prompt_ids, request, stream=p * K)
    tokens = {p: [[] for _ in range(K)] for p in batch}
    stops = set(request.stop_token_ids)
    while engine.has_work():
        for out in engine.step():
            if out.token_id not in stops:
                tokens[int(out.request_id)][out.index].append(out.token_id)
    return {p: [tokenizer.decode(t) for t in samples] for p, samples in tokens.items()}


def _score_and_write(reward, prompts, answers: dict[int, list[str]], settings: Settings, summary: Summary,
                     batch_size: int, mesh, scorers: dict) -> tuple[str, str]:
    """The batch's SFT lines and pair lines, after scoring every answer (a prompt's answers share its
    pages in the reward model's cache: shared_prefix.SharedPrefixScorer, kept in `scorers`)."""
    rm_cfg, rm_params, rm_tokenizer = reward
    keys = [(p, i) for p in answers for i in range(len(answers[p]))]
    sequences = [sequence_ids(rm_tokenizer, prompts[p], _answer(prompts[p], answers[p][i])) for p, i in keys]
    too_long = next(((p, i) for (p, i), s in zip(keys, sequences) if len(s) > rm_cfg.max_seq_len), None)
    if too_long is not None:
        raise ValueError(f"prompt {too_long[0] + 1}'s answer {too_long[1]} is longer than the reward model's context "
                         f"of {rm_cfg.max_seq_len} tokens: lower --max-new-tokens")
    needed = bucket_length(max(map(len, sequences)) + 1, rm_cfg.max_seq_len)
    if scorers.get("scorer") is None or scorers["scorer"].max_seq_len < needed:
        scorers["scorer"] = SharedPrefixScorer(rm_cfg, rm_params, mesh=mesh, max_seq_len=needed, max_batch=batch_size)
    grouped = scorers["scorer"]([[s for (p, _), s in zip(keys, sequences) if p == q] for q in answers])
    scores = {(q, i): score for q, group in zip(answers, grouped) for i, score in enumerate(group)}
    sft, pairs = [], []
    for p, texts in answers.items():
        prompt, ranked = prompts[p], sorted(range(len(texts)), key=lambda i: -scores[(p, i)])
        best, worst = ranked[0], ranked[-1]
        samples = [{"content": texts[i], "score": scores[(p, i)]} for i in range(len(texts))]
        summary.best_scores.append(scores[(p, best)])
        summary.scores += [s["score"] for s in samples]
        if settings.min_score is None or scores[(p, best)] >= settings.min_score:
            record = ({"messages": [*prompt, _answer(prompt, texts[best])]} if isinstance(prompt, list)
                      else {"text": prompt + texts[best]})
            sft.append(json.dumps({**record, "samples": samples, "best_score": scores[(p, best)]}, ensure_ascii=False))
            summary.kept += 1
        margin = scores[(p, best)] - scores[(p, worst)]
        if texts[best] != texts[worst] and (settings.min_margin is None or margin >= settings.min_margin):
            pair = {"chosen": _answer(prompt, texts[best]), "rejected": _answer(prompt, texts[worst])}
            pair = {"messages": prompt, **pair} if isinstance(prompt, list) else {"prompt": prompt, **pair}
            pairs.append(json.dumps(pair, ensure_ascii=False))
            summary.pairs += 1
    return "".join(line + "\n" for line in sft), "".join(line + "\n" for line in pairs)


__all__ = ["Settings", "Summary", "best_of_n", "read_prompts", "pairs_path"]
