"""A reward model learns a synthetic preference from scratch: the chosen answer repeats the prompt's
character, the rejected one is another character. 94 characters make 8742 (prompt, chosen, rejected)
combinations, so 8192 training records cannot be memorised into the held-out ones: 150 steps must
learn to compare the answer with the prompt. The run starts at log 2 (a zero head)."""

import json
import math

import numpy as np
import pytest

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.params import init_params
from llama_jax.reward import model as rm
from llama_jax.tokenizer import load_tokenizer, write_byte_tokenizer
from llama_jax.train.loop import TrainConfig, train
from tests.train.test_dpo import write_jsonl

CHARACTERS = [chr(c) for c in range(33, 127) if chr(c) != "?"]


def copy_records(rng, n):
    records = []
    for _ in range(n):
        right, wrong = rng.choice(CHARACTERS, 2, replace=False)
        records.append({"prompt": f"{right}?", "chosen": str(right), "rejected": str(wrong)})
    return records


def test_a_reward_model_learns_a_toy_preference_that_holds_on_unseen_pairs(tmp_path):
    rng = np.random.default_rng(0)
    training = copy_records(rng, 8192)
    seen = {json.dumps(r) for r in training}
    held_out = [r for r in copy_records(rng, 600) if json.dumps(r) not in seen][:200]
    assert len(held_out) == 200

    # --init-from a causal LM (here: random weights, as `--config tiny` would start from) with a zero head.
    tokenizer_path = write_byte_tokenizer(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tokenizer_path)
    cfg = LlamaConfig.preset("tiny", bos_id=tok.bos_id, eos_id=tok.eos_id)
    lm = checkpoint.save(tmp_path / "lm", cfg, init_params(cfg, 0), tokenizer_path)
    out = tmp_path / "run"
    summary = train(TrainConfig(out=str(out), init_from=str(lm), data=(write_jsonl(tmp_path / "p.jsonl", training),),
                                objective="reward", seq_len=64, batch_size=16, steps=150, lr=1e-2, warmup_steps=10,
                                weight_decay=0.0, mesh="fsdp8", log_every=10, progress=False))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[-1]["accuracy"] > 0.9

    cfg, params = rm.load(summary["model"])
    ids = [rm.sequence_ids(tok, r["prompt"], r[k]) for r in held_out for k in ("chosen", "rejected")]
    scores = rm.score_sequences(cfg, params, ids, batch_size=len(ids)).reshape(-1, 2)
    accuracy = np.mean(scores[:, 0] > scores[:, 1])
    print(f"held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.95
