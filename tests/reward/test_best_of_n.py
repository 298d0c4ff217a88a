"""`python -m llama_jax.reward best-of-n` and `score` on tiny checkpoints (random weights, the byte
tokenizer): the best of each prompt's K answers is the highest-scored one, the scores are what
`reward score` gives the same conversations, a run interrupted and rerun writes what one run writes,
and the SFT records and DPO pairs train one step each with `llama_jax.train` unchanged."""

import json

import jax
import numpy as np
import pytest

from llama_jax import LlamaConfig, save
from llama_jax.reward import __main__ as cli
from llama_jax.reward import best_of_n as bon
from llama_jax.reward.model import from_causal_lm
from llama_jax.tokenizer import write_byte_tokenizer
from llama_jax.train.loop import TrainConfig, train
from tests.infer.common import random_params

CFG = LlamaConfig.preset("tiny", bos_id=256, eos_id=257, max_seq_len=512)  # the byte tokenizer's bos / eos
PROMPTS = [{"messages": [{"role": "user", "content": "Name a colour."}]},
           {"prompt": "Once upon a time"},
           {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]},
           {"prompt": "The sky is"},
           {"messages": [{"role": "user", "content": "Hello!"}]}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bon")
    tokenizer = write_byte_tokenizer(tmp / "bytes.model")
    policy = save(tmp / "policy", CFG, random_params(CFG, 0), tokenizer_path=tokenizer)
    rm = from_causal_lm(CFG, random_params(CFG, 1))
    rm["score"] = jax.numpy.asarray(np.random.default_rng(2).normal(0, 1, CFG.dim), rm["score"].dtype)
    reward = save(tmp / "rm", CFG, rm, tokenizer_path=tokenizer)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return policy, reward, prompts


def run(*argv):
    return cli.main([str(a) for a in argv])


def best_of_n(models, out, *extra, max_new_tokens=10):
    policy, reward, prompts = models
    return run("best-of-n", "--policy", policy, "--reward-model", reward, "--prompts", prompts, "--num-samples", 4,
               "--max-new-tokens", max_new_tokens, "--batch-size", 2, "--temperature", 1.0, "--out", out,
               "--no-progress", *extra)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_best_is_the_highest_scored_and_scores_agree_with_reward_score(models, tmp_path):
    out = tmp_path / "best.jsonl"
    assert best_of_n(models, out) == 0
    sft, pairs = read(out), read(bon.pairs_path(out))
    assert len(sft) == len(PROMPTS) and 1 <= len(pairs) <= len(PROMPTS)
    for prompt, record in zip(PROMPTS, sft):
        scores = [s["score"] for s in record["samples"]]
        assert len(scores) == 4 and len({s["content"] for s in record["samples"]}) > 1  # K different answers
        best = record["samples"][int(np.argmax(scores))]["content"]
        assert record["best_score"] == max(scores)
        if "messages" in prompt:
            assert record["messages"] == prompt["messages"] + [{"role": "assistant", "content": best}]
        else:
            assert record["text"] == prompt["prompt"] + best
    for pair in pairs:
        record = next(r for p, r in zip(PROMPTS, sft) if pair.get("messages", pair.get("prompt")) in
                      (p.get("messages"), p.get("prompt")))
        ranked = sorted(record["samples"], key=lambda s: s["score"])
        content = (lambda m: m["content"]) if "messages" in pair else (lambda m: m)
        assert content(pair["chosen"]) == ranked[-1]["content"] and content(pair["rejected"]) == ranked[0]["content"]
    # `reward score` on the chat records (the best answer as the last message) gives their best_score.
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in sft if "messages" in r))
    assert run("score", "--checkpoint", models[1], "--data", chats, "--out", tmp_path / "scores.jsonl",
               "--no-progress") == 0
    np.testing.assert_allclose([r["score"] for r in read(tmp_path / "scores.jsonl")],
                               [r["best_score"] for r in sft if "messages" in r], rtol=1e-5, atol=1e-5)


def test_an_interrupted_run_resumes_to_the_same_files(models, tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    assert best_of_n(models, whole) == 0
    real, calls = bon._score_and_write, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bon, "_score_and_write", interrupted)
    assert best_of_n(models, cut) == 130
    assert len(read(cut)) == 2  # the first batch of 2 prompts, nothing of the second
    monkeypatch.setattr(bon, "_score_and_write", real)
    assert best_of_n(models, cut) == 0
    assert cut.read_text() == whole.read_text()
    assert bon.pairs_path(cut).read_text() == bon.pairs_path(whole).read_text()
    assert best_of_n(models, cut, "--seed", 1) == 1  # other settings: refused, nothing touched
    assert cut.read_text() == whole.read_text()


def test_the_outputs_train_with_sft_and_dpo_unchanged(models, tmp_path):
    policy, _, _ = models
    out = tmp_path / "best.jsonl"
    # A random policy draws reserved special tokens, whose names its answers spell out (tens of byte
    # tokens each): a few tokens an answer keep a DPO pair within a row.
    assert best_of_n(models, out, max_new_tokens=4) == 0
    common = dict(init_from=str(policy), seq_len=512, batch_size=8, steps=1, lr=1e-4, warmup_steps=0, mesh="fsdp8",
                  log_every=1, progress=False)
    sft = train(TrainConfig(out=str(tmp_path / "sft"), data=(str(out),), **common))
    dpo = train(TrainConfig(out=str(tmp_path / "dpo"), data=(str(bon.pairs_path(out)),), objective="dpo", **common))
    assert sft["status"] == dpo["status"] == "completed"


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "line 1: the last message is the assistant's"),
    ({"prompt": ""}, "line 1: expected"),
    ("[1, 2]", "line 1 is not a JSON object"),
])
def test_a_bad_prompt_is_one_line_naming_it(models, tmp_path, capsys, record, message):
    policy, reward, _ = models
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text((record if isinstance(record, str) else json.dumps(record)) + "\n")
    status = run("best-of-n", "--policy", policy, "--reward-model", reward, "--prompts", prompts, "--out",
                 tmp_path / "o.jsonl", "--no-progress")
    err = capsys.readouterr().err
    assert status == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_causal_lm_is_not_a_reward_model(models, tmp_path, capsys):
    policy, _, prompts = models
    status = run("best-of-n", "--policy", policy, "--reward-model", policy, "--prompts", prompts, "--out",
                 tmp_path / "o.jsonl", "--no-progress")
    err = capsys.readouterr().err
    assert status == 1 and "is a causal language model, not a reward model" in err and err.count("\n") == 1


def test_min_score_and_min_margin_leave_records_out(models, tmp_path, capsys):
    out = tmp_path / "all.jsonl"
    assert best_of_n(models, out) == 0
    sft = read(out)
    best = sorted(r["best_score"] for r in sft)
    cut = tmp_path / "cut.jsonl"
    assert best_of_n(models, cut, "--min-score", best[2], "--min-margin", 1e9) == 0
    assert [r["best_score"] for r in read(cut)] == [s for s in (r["best_score"] for r in sft) if s >= best[2]]
    assert read(bon.pairs_path(cut)) == []
    assert "3 SFT records, 0 DPO pairs written" in capsys.readouterr().err


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "x"}]}, "line 2: the last message must be the assistant's answer"),
    ({"text": 3}, "line 2: expected"),
])
def test_a_bad_record_to_score_is_one_line_before_the_model_loads(tmp_path, capsys, record, message):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    status = run("score", "--checkpoint", tmp_path / "nowhere", "--data", data, "--out", tmp_path / "s.jsonl")
    err = capsys.readouterr().err
    assert status == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s.jsonl").exists()
