"""--objective reward: the packed, sharded, accumulated Bradley-Terry loss equals the formula on scores of
whole unpacked sequences; runs from a causal LM start at log 2 (zero head), full or LoRA, and save a
reward model; a checkpoint of the wrong kind is one line before anything is written."""

import json
import math

import jax
import numpy as np
import pytest

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.params import param_shardings, sharded_param_shapes
from llama_jax.reward import model as rm
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Llama3Tokenizer, write_byte_tokenizer
from llama_jax.train.__main__ import main
from llama_jax.train.loop import TrainConfig, train
from llama_jax.train.optim import OptimConfig, make_optimizer
from llama_jax.train.preferences import PreferencePairs, pack_pairs, read_preferences
from llama_jax.train.reward import RewardModeling
from llama_jax.train.step import init_state, make_train_step, put_batch
from tests.reference import random_params
from tests.train.conftest import losses
from tests.train.faults import sigterm_at
from tests.train.test_dpo import some_records, write_jsonl

CFG = LlamaConfig.preset("tiny")  # float32, V=512: the byte tokenizer's 256 bytes + 256 specials
SEQ_LEN = 96


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Llama3Tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def test_packed_sharded_loss_equals_bradley_terry_on_whole_sequences(tmp_path, tokenizer):
    records = read_preferences([write_jsonl(tmp_path / "p.jsonl", some_records())])
    pairs = PreferencePairs(records, tokenizer, SEQ_LEN, scored=True)
    params = rm.from_causal_lm(CFG, random_params(CFG, 0))
    params["score"] = jax.numpy.asarray(np.random.default_rng(0).standard_normal(CFG.dim), jax.numpy.float32)
    # Each sequence alone, as the reward model scores it: prompt, response and the token that ends it.
    whole = [rm.sequence_ids(tokenizer, r.prompt, getattr(r, name)) for r in records for name in ("chosen", "rejected")]
    assert [list(s.inputs) for pair in pairs.pairs for s in pair] == whole
    want = rm.score_sequences(CFG, params, whole, batch_size=len(whole)).reshape(-1, 2)

    mesh = make_mesh("fsdp2,cp2,tp2")  # rows over fsdp, each row's tokens over cp (load-balanced), heads over tp
    B = 8
    batch, placed = pack_pairs(pairs, range(len(pairs)), B)
    del batch["reference"]
    assert len(placed) == len(pairs) and len({row for _, row, _ in placed}) < len(pairs)  # rows hold several
    optimizer = make_optimizer(OptimConfig())
    trained = sharded_param_shapes(CFG, mesh, rm.HEAD)
    step = make_train_step(CFG, optimizer, mesh, batch_shape=(B, SEQ_LEN), grad_accum=2, objective=RewardModeling(),
                           trained=trained)
    state = init_state(CFG, optimizer, mesh, params=jax.device_put(params, param_shardings(CFG, mesh, head=rm.HEAD)),
                       trained=trained)
    _, metrics = step(state, put_batch(batch, mesh))
    margin = want[:, 0].astype(np.float64) - want[:, 1]
    assert np.abs(margin).max() > 1 and 0 < np.mean(margin > 0) < 1  # the loss is not just log 2
    expected = {"loss": np.mean(np.logaddexp(0.0, -margin)), "accuracy": np.mean(margin > 0),
                "margin": np.mean(margin), "chosen_score": np.mean(want[:, 0]), "rejected_score": np.mean(want[:, 1]),
                "pairs": len(pairs), "tokens": sum(len(s) for s in whole)}
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_cli_lora_reward_model_from_a_converted_hf_chat_model(tmp_path, capsys, hf_chat_model):
    """--objective reward --lora-rank: adapters on the frozen base, the score head trained whole beside
    them (at zero the adapters alone get no gradient); chat records in the model's own template; the
    run starts at log 2 and OUT/model is the merged reward model."""
    from llama_jax.convert.hf import convert_hf
    from llama_jax.tokenizer import load_tokenizer

    ckpt = convert_hf(hf_chat_model, tmp_path / "ckpt")
    records = [{"messages": [{"role": "user", "content": f"Hello, world! {i}"}],
                "chosen": {"role": "assistant", "content": "I am fine, thank you."},
                "rejected": {"role": "assistant", "content": "The quick brown fox."}} for i in range(8)]
    data = write_jsonl(tmp_path / "p.jsonl", records)
    out = tmp_path / "run"
    assert main(["--objective", "reward", "--init-from", str(ckpt), "--lora-rank", "4", "--data", data, "--seq-len",
                 "128", "--batch-size", "8", "--steps", "3", "--lr", "1e-2", "--warmup-steps", "0", "--mesh",
                 "dp2,fsdp2,tp2", "--log-every", "1", "--no-progress", "--out", str(out)]) == 0
    assert f"model -> {out / 'model'}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a zero head scores every sequence 0
    assert rows[0]["margin"] == 0 and rows[0]["accuracy"] == 0
    assert {"loss", "accuracy", "margin", "chosen_score", "rejected_score", "pairs", "tokens"} <= set(rows[-1])
    assert rows[-1]["loss"] < math.log(2) and rows[-1]["margin"] > 0
    assert list(out.glob("events.out.tfevents.*"))  # TensorBoard, as every run
    assert not (out / "adapters").exists()  # without the score head they would score nothing
    cfg, params = rm.load(out / "model")
    assert checkpoint.load_config(out / "model") == checkpoint.load_config(ckpt) and "output" not in params
    tokenizer = load_tokenizer(checkpoint.tokenizer_path(out / "model"))
    ids = [rm.sequence_ids(tokenizer, records[0]["messages"], records[0][k]) for k in ("chosen", "rejected")]
    chosen, rejected = rm.score_sequences(cfg, params, ids, batch_size=2)
    assert chosen > rejected


def test_sigterm_and_resume_continue_exactly(tmp_path, tokenizer):
    """A resumed run restores the reward model's state (score in place of output) and its batches."""
    cfg = LlamaConfig.preset("tiny", bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    lm = checkpoint.save(tmp_path / "lm", cfg, random_params(cfg, 2), write_byte_tokenizer(tmp_path / "t.model"))
    run = dict(init_from=str(lm), data=(write_jsonl(tmp_path / "p.jsonl", some_records()),), objective="reward",
               seq_len=SEQ_LEN, batch_size=8, steps=4, lr=1e-2, warmup_steps=0, mesh="fsdp8", log_every=1,
               progress=False)
    train(TrainConfig(out=str(tmp_path / "whole"), **run))
    assert train(TrainConfig(out=str(tmp_path / "cut"), **run), sigterm_at(2))["steps"] == 2
    assert train(TrainConfig(out=str(tmp_path / "cut"), **run))["resumed_from"] == 2
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)


def test_a_reward_checkpoint_where_a_causal_lm_is_needed_is_one_line(tmp_path):
    reward = checkpoint.save(tmp_path / "rm", CFG, rm.from_causal_lm(CFG, random_params(CFG)))
    data = write_jsonl(tmp_path / "p.jsonl", some_records())
    out = tmp_path / "run"
    for objective in ("lm", "dpo"):
        with pytest.raises(ValueError) as e:
            train(TrainConfig(out=str(out), init_from=str(reward), data=(data,), objective=objective, seq_len=64,
                              batch_size=8, steps=1, progress=False))
        assert str(e.value).startswith(f"{reward} is a reward model (a score head, no next-token output)")
        assert not out.exists()  # refused before the run directory is made
