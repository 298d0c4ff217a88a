"""DPO: the packed, sharded, accumulated loss equals the formula on per-sequence log-probs of plain
unpacked forwards; a run starts at log 2 and learns a toy preference set; it resumes exactly; bad
records are one line naming the record."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.params import init_params as init_single
from llama_jax.sharding import make_mesh
from llama_jax.params import param_shardings
from llama_jax.tokenizer import Llama3Tokenizer
from llama_jax.tokenizer import write_byte_tokenizer
from llama_jax.train.dpo import DPO, prepare_reference, reference_table
from llama_jax.train.loop import TrainConfig, train
from llama_jax.train.optim import OptimConfig, make_optimizer
from llama_jax.train.preferences import PreferenceBatches, PreferenceDataConfig, PreferencePairs, pack_pairs, \
    read_preferences
from llama_jax.train.step import init_state, make_train_step, put_batch
from tests.train.conftest import losses
from tests.train.faults import sigterm_at

CFG = LlamaConfig.preset("tiny")  # float32, V=512: the byte tokenizer's 256 bytes + 256 specials
SEQ_LEN = 96


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Llama3Tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def some_records():
    """Plain and chat pairs of many lengths, so rows hold 1-3 pairs and some padding."""
    rng = np.random.default_rng(0)
    words = ["sun", "rain", "wind", "snow", "cloud", "storm", "fog"]

    def text(n):
        return " ".join(rng.choice(words, n))

    # Never the same text twice in a pair: a tie's reward accuracy would be decided by rounding.
    records = [{"prompt": text(rng.integers(0, 4)), "chosen": text(rng.integers(1, 4)),
                "rejected": "not " + text(rng.integers(1, 3))} for _ in range(7)]
    records += [{"messages": [{"role": "user", "content": text(1)}], "chosen": {"role": "assistant", "content": "ok"},
                 "rejected": {"role": "assistant", "content": text(2)}}]
    return records


def unpacked_logprobs(params, pairs):
    """[num_pairs, 2]: each sequence's sum of log p(target) over its weighted targets, from a plain
    forward of the sequence alone (one per row, padded at the end, which a causal model never sees)."""
    seqs = [s for pair in pairs.pairs for s in pair]
    inputs = np.zeros((len(seqs), pairs.seq_len), np.int32)
    for row, s in zip(inputs, seqs):
        row[:len(s)] = s.inputs
    logits = jax.jit(lambda p, x: Llama(CFG).apply({"params": p}, x))(params, inputs)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    sums = [np.sum(lp[np.arange(len(s)), s.targets] * s.weights) for lp, s in zip(logp, seqs)]
    return np.asarray(sums).reshape(len(pairs), 2)


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory, tokenizer):
    """some_records' pairs, a policy and a reference model, and their unpacked forwards' log-probs."""
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "p.jsonl", some_records())
    pairs = PreferencePairs(read_preferences([path]), tokenizer, SEQ_LEN)
    policy, reference = init_single(CFG, 0), init_single(CFG, 1)
    return pairs, policy, reference, unpacked_logprobs(policy, pairs), unpacked_logprobs(reference, pairs)


@pytest.mark.parametrize("mesh_spec", ["dp2,fsdp2,tp2", "fsdp2,cp4"])
def test_packed_sharded_loss_equals_the_formula_on_unpacked_sequences(unpacked, mesh_spec):
    pairs, policy, reference, want_policy, want_reference = unpacked
    mesh = make_mesh(mesh_spec)  # cp: each row's tokens split over 4 devices, in load-balanced order
    B = 8  # a multiple of dp x fsdp x grad_accum
    shardings = param_shardings(CFG, mesh)
    # The reference pass, packed and sharded, gives the unpacked forwards' sums.
    got_reference = reference_table(CFG, jax.device_put(reference, shardings), pairs, mesh, B)
    np.testing.assert_allclose(got_reference, want_reference, rtol=1e-5, atol=1e-5)

    # One step's metrics on a packed batch of all pairs (two microbatches), the reference as stored.
    batch, placed = pack_pairs(pairs, range(len(pairs)), B, want_reference.astype(np.float32))
    assert len(placed) == len(pairs) and len({row for _, row, _ in placed}) < len(pairs)  # rows hold several
    beta = 2.0
    optimizer = make_optimizer(OptimConfig())
    step = make_train_step(CFG, optimizer, mesh, batch_shape=(B, SEQ_LEN), grad_accum=2, objective=DPO(beta))
    _, metrics = step(init_state(CFG, optimizer, mesh, params=jax.device_put(policy, shardings)),
                      put_batch(batch, mesh))
    logratio = want_policy - want_reference
    h = logratio[:, 0] - logratio[:, 1]
    assert np.abs(beta * h).max() > 1  # rewards far from 0: the loss is not just log 2
    want = {"loss": np.mean(np.logaddexp(0.0, -beta * h)), "reward_margin": np.mean(beta * h),
            "reward_accuracy": np.mean(h > 0), "chosen_reward": np.mean(beta * logratio[:, 0]),
            "rejected_reward": np.mean(beta * logratio[:, 1]), "pairs": len(pairs),
            "tokens": sum(s.weights.sum() for pair in pairs.pairs for s in pair)}
    for name, value in want.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-5), name


def toy_preferences(n=48):
    """The chosen answer states the prompt's colour, the rejected one another colour."""
    colours = ["red", "green", "blue", "black"]
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        right, wrong = rng.choice(len(colours), 2, replace=False)
        records.append({"prompt": f"{colours[right]}? ", "chosen": colours[right], "rejected": colours[wrong]})
    return records


TOY = dict(config="tiny", seq_len=SEQ_LEN, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, progress=False,
           mesh="fsdp8", objective="dpo", dpo_beta=0.1, save_every=100)
TOY_STEPS = 20


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    data = write_jsonl(tmp / "prefs.jsonl", toy_preferences())
    out = tmp / "run"
    summary = train(TrainConfig(out=str(out), data=(data,), steps=TOY_STEPS, **TOY))
    assert summary["status"] == "completed"
    return data, out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_starts_at_log_2_and_learns_a_toy_preference_set(toy_run):
    _, out, rows = toy_run
    assert rows[0]["step"] == 0 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # Step 1 still has the initial weights (warmup starts from lr 0), step 2 the first update.
    assert rows[-1]["reward_margin"] > 1 > rows[2]["reward_margin"] > 0
    assert all(r["reward_accuracy"] > 0.9 for r in rows[-5:]) and rows[-1]["loss"] < 0.5 * math.log(2)
    assert np.load(out / "reference_logprobs.npz")["logprobs"].shape == (48, 2)


def test_sigterm_and_resume_continue_exactly(tmp_path, toy_run):
    data, _, rows = toy_run
    config = TrainConfig(out=str(tmp_path), data=(data,), steps=TOY_STEPS, **TOY)
    assert train(config, sigterm_at(3))["steps"] == 3
    resumed = train(config)  # reads the reference log-probs back from the run directory
    assert resumed["resumed_from"] == 3 and resumed["status"] == "completed"
    got = losses(tmp_path)
    assert [got[s] for s in range(TOY_STEPS)] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_dpo_from_a_converted_hf_chat_checkpoint(tmp_path, hf_chat_model):
    from llama_jax import checkpoint
    from llama_jax.convert.hf import convert_hf

    ckpt = convert_hf(hf_chat_model, tmp_path / "ckpt")
    records = [{"messages": [{"role": "user", "content": f"Hello, world! {i}"}],
                "chosen": {"role": "assistant", "content": "I am fine, thank you."},
                "rejected": {"role": "assistant", "content": "The quick brown fox."}} for i in range(12)]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    out = tmp_path / "run"
    summary = train(TrainConfig(out=str(out), init_from=str(ckpt), data=(data,), seq_len=256, batch_size=8, steps=3,
                                lr=1e-3, warmup_steps=0, mesh="fsdp8", objective="dpo", log_every=1, progress=False))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["pairs"] >= 12  # epochs wrap
    assert rows[-1]["reward_margin"] > 0 and rows[-1]["loss"] < math.log(2)
    cfg, _ = checkpoint.load(summary["model"])  # OUT/model: a checkpoint infer and convert read
    assert cfg.num_params() == checkpoint.load_config(ckpt).num_params()
    assert checkpoint.tokenizer_path(summary["model"]).name == "tokenizer.json"


def test_dpo_with_lora_takes_the_base_without_adapters_as_its_reference(tmp_path, hf_chat_model):
    """--lora-rank with --objective dpo: adapters are trained, and the reference log-probs are the
    frozen base's (B starts at zero, so policy == reference and the loss is log 2 at step 0)."""
    from llama_jax.convert.hf import convert_hf

    ckpt = convert_hf(hf_chat_model, tmp_path / "ckpt")
    records = [{"prompt": f"Question {i}:", "chosen": " yes, indeed.", "rejected": " no way at all."}
               for i in range(8)]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    out = tmp_path / "run"
    # fsdp4,tp2: the adapters' collectives inside the layer scan (all-gathers over fsdp, all-reduces
    # over tp) once deadlocked here when XLA:CPU's thread pool was as small as the device count
    # (llama_jax/sharding/mesh.py says why; use_cpu_devices, which conftest calls, deepens it).
    summary = train(TrainConfig(out=str(out), init_from=str(ckpt), data=(data,), seq_len=128, batch_size=8, steps=4,
                                lr=1e-2, warmup_steps=0, mesh="fsdp4,tp2", objective="dpo", lora_rank=4,
                                log_every=1, progress=False))
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["reward_margin"] > 0 and rows[-1]["loss"] < math.log(2)
    assert (out / "adapters").is_dir() and (out / "reference_logprobs.npz").is_file()


def test_batches_hold_whole_pairs_and_resume_exactly(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "p.jsonl", some_records())
    make = lambda: PreferenceBatches(PreferenceDataConfig((data,), SEQ_LEN, 2, seed=3), tokenizer)  # noqa: E731
    batches = make()
    batches.reference = np.zeros((len(batches.pairs), 2), np.float32)
    first = [next(batches) for _ in range(5)]  # several epochs of 8 pairs
    for batch in first:
        seg = batch["segment_ids"]
        for row in seg:
            ids = set(row[row > 0].tolist())
            assert ids == set(range(1, max(ids) + 1)) and max(ids) % 2 == 0  # chosen and rejected of each pair
    resumed = make()
    resumed.reference = batches.reference
    state = json.loads(json.dumps(batches.state()))
    again = [next(batches) for _ in range(3)]
    resumed.restore(state)
    for want in again:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_a_resumed_run_reads_its_own_reference_log_probs_or_says_why_not(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "p.jsonl", some_records())
    batches = PreferenceBatches(PreferenceDataConfig((data,), SEQ_LEN, 2), tokenizer)
    resume = dict(out=tmp_path, cfg=CFG, params_ref=None, mesh=None, resumed=True)
    with pytest.raises(ValueError, match="reference_logprobs.npz is missing: a resumed DPO run reads"):
        prepare_reference(batches, **resume)
    table = np.arange(2 * len(batches.pairs), dtype=np.float32).reshape(-1, 2)
    np.savez(tmp_path / "reference_logprobs.npz", logprobs=table, fingerprint=np.asarray("0123456789abcdef"))
    with pytest.raises(ValueError, match="other preference data than --data gives now"):
        prepare_reference(batches, **resume)
    np.savez(tmp_path / "reference_logprobs.npz", logprobs=table, fingerprint=np.asarray(batches.pairs.fingerprint))
    prepare_reference(batches, **resume)
    np.testing.assert_array_equal(batches.reference, table)


def test_chat_records_render_through_the_chat_format(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    record = {"messages": messages, "chosen": {"role": "assistant", "content": "hello"},
              "rejected": {"role": "assistant", "content": "go away"}}
    pairs = PreferencePairs(read_preferences([write_jsonl(tmp_path / "c.jsonl", [record])]), tokenizer, 128)
    chosen, _ = pairs.pairs[0]
    ids = [*chosen.inputs, chosen.targets[-1]]
    prompt = tokenizer.encode_dialog(messages)
    assert ids == prompt + tokenizer.encode("hello", bos=False, eos=False) + [tokenizer.eot_id]
    assert chosen.weights.tolist() == [0.0] * (len(prompt) - 1) + [1.0] * (len(ids) - len(prompt))


def test_hf_chat_records_weight_only_the_final_turn(tmp_path, hf_chat_model):
    from llama_jax.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(hf_chat_model / "tokenizer.json")
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "How are you?"}]
    record = {"messages": messages, "chosen": {"role": "assistant", "content": "fine, thank you"},
              "rejected": {"role": "assistant", "content": "no"}}
    pairs = PreferencePairs(read_preferences([write_jsonl(tmp_path / "c.jsonl", [record])]), tok, 128)
    chosen, _ = pairs.pairs[0]
    weighted = [t for t, w in zip(chosen.targets, chosen.weights) if w]
    assert tok.decode(weighted).startswith("fine, thank you<|im_end|>")
    assert tok.decode([*chosen.inputs, chosen.targets[-1]]).startswith(tok.render_chat(messages))


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p", "rejected": "b"}, "no 'chosen' field"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "'chosen' is an empty response"),
    ('{"prompt": "p", "chosen": ', "not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": {"content": "b"}},
     "'chosen' must be an assistant message"),
    ({"chosen": "a", "rejected": "b"}, "exactly one of 'prompt'"),
])
def test_a_bad_record_is_one_line_naming_it(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, "", bad, GOOD])  # a blank line is not a record
    with pytest.raises(ValueError) as e:
        read_preferences([path])
    assert str(e.value).startswith(f"{path} record 2 (line 3): ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_pair_longer_than_a_row_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "p" * 60, "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"record 2 \(line 2\): prompt \+ chosen and prompt \+ rejected are "
                                         r"62 \+ 62 tokens, more than one row of --seq-len 96"):
        PreferencePairs(read_preferences([path]), tokenizer, SEQ_LEN)


def test_cli_bad_record_exits_with_one_line_and_leaves_no_run_directory(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "p", "chosen": "", "rejected": "b"}])
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "llama_jax.train", "--objective", "dpo", "--data", data,
                             "--config", "tiny", "--seq-len", "32", "--batch-size", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {data} record 2 (line 2): 'chosen' is an empty response"]
    assert not out.exists()
