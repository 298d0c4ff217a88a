"""The reward model: the causal LM's network with a score vector in place of the output projection,
read at each row's last token; the Bradley-Terry loss; a checkpoint of one kind refused where the
other is needed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.params import param_logical_axes, param_shapes, param_shardings
from llama_jax.reward import model as rm
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Llama3Tokenizer, write_byte_tokenizer
from tests.reference import random_params

CFG = LlamaConfig.preset("tiny")  # float32, untied, D=64, V=512
TIED = LlamaConfig.preset("tiny-3.2")
LENGTHS = [5, 17, 1, 32]


def reward_params(cfg, seed=0):
    """Random O(1) weights (tests/reference.py) with a random score head."""
    params = rm.from_causal_lm(cfg, random_params(cfg, seed))
    params["score"] = jnp.asarray(np.random.default_rng(seed).standard_normal(cfg.dim), jnp.float32)
    return params


def sequences(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in LENGTHS]


def test_bradley_terry_loss_against_numpy():
    rng = np.random.default_rng(0)
    chosen = np.concatenate([rng.normal(0, 3, 200), [60.0, -60.0, 0.0]]).astype(np.float32)
    rejected = np.concatenate([rng.normal(0, 3, 200), [-60.0, 60.0, 0.0]]).astype(np.float32)
    margin = chosen.astype(np.float64) - rejected
    want = -np.log(1.0 / (1.0 + np.exp(-margin)))  # -log sigmoid, in float64 (exp(60) is no overflow there)
    got = np.asarray(rm.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[-3] == pytest.approx(0.0, abs=1e-7) and got[-2] == pytest.approx(120.0) and got[-1] == pytest.approx(
        np.log(2))


@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied", "tied"])
def test_the_tree_is_the_causal_lms_less_output_plus_a_score_vector(cfg):
    lm, reward = param_shapes(cfg), param_shapes(cfg, rm.HEAD)
    assert set(reward) == (set(lm) - {"output"}) | {"score"}
    assert jax.tree.map(lambda s: s.shape, {k: v for k, v in reward.items() if k != "score"}) == jax.tree.map(
        lambda s: s.shape, {k: v for k, v in lm.items() if k != "output"})
    assert reward["score"].shape == (cfg.dim,)
    assert param_logical_axes(cfg, rm.HEAD)["score"] == P("embed")  # split like every embed dim: fsdp
    assert param_shardings(cfg, make_mesh("fsdp4,tp2"), head=rm.HEAD)["score"].spec == P("fsdp")
    assert rm.num_params(cfg) == sum(x.size for x in jax.tree.leaves(rm.from_causal_lm(cfg, random_params(cfg))))


def test_a_score_is_the_final_normed_state_dotted_with_the_score_vector():
    """With the score vector set to embedding row v of a tied model, the reward model's score at every
    position is the causal LM's logit of token v there: the same network, the same final norm."""
    params = random_params(TIED, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TIED.vocab_size, (2, 12)))
    logits = Llama(TIED).apply({"params": params}, tokens)
    v = 77
    reward = {**params, "score": params["tok_embeddings"][v]}
    scores = Llama(TIED, head=rm.HEAD).apply({"params": reward}, tokens)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(logits[..., v]), rtol=1e-5, atol=1e-5)
    lengths = jnp.asarray([12, 4])
    np.testing.assert_allclose(np.asarray(rm.scores(TIED, reward, tokens, lengths)),
                               np.asarray(logits[[0, 1], [11, 3], v]), rtol=1e-5, atol=1e-5)


def test_from_causal_lm_keeps_the_lms_arrays_and_zeroes_the_head():
    lm = random_params(CFG, 0)
    reward = rm.from_causal_lm(CFG, lm)
    assert "output" not in reward and reward["tok_embeddings"] is lm["tok_embeddings"]
    assert np.asarray(reward["score"]).tolist() == [0.0] * CFG.dim
    tokens = jnp.asarray(sequences()[3])[None]
    assert np.abs(np.asarray(Llama(CFG, head=rm.HEAD).apply({"params": reward}, tokens))).max() == 0.0


def test_scores_read_each_row_at_its_own_last_token_whatever_the_padding():
    params = reward_params(CFG)
    seqs = sequences()
    alone = [float(rm.scores(CFG, params, np.asarray([s]), np.asarray([len(s)]))[0]) for s in seqs]
    padded = np.full((len(seqs), 40), 3, np.int32)  # any padding id: never read
    for row, s in zip(padded, seqs):
        row[:len(s)] = s
    batched = np.asarray(rm.scores(CFG, params, padded, np.asarray(LENGTHS)))
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(batched, 3))) == len(seqs)  # distinct: a wrong position would show
    # Bucketed by length, several rows a call, back in input order.
    np.testing.assert_allclose(rm.score_sequences(CFG, params, seqs, batch_size=2), alone, rtol=1e-5, atol=1e-5)


def test_scores_on_a_mesh_equal_one_device():
    params = reward_params(CFG)
    seqs = sequences(1)
    want = rm.score_sequences(CFG, params, seqs, batch_size=4)
    mesh = make_mesh("dp2,fsdp2,tp2")
    sharded = jax.device_put(params, param_shardings(CFG, mesh, head=rm.HEAD))
    got = rm.score_sequences(CFG, sharded, seqs, batch_size=4, mesh=mesh)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"batch size 2 must be a multiple of the mesh's dp x fsdp \(4\)"):
        rm.score_sequences(CFG, sharded, seqs, batch_size=2, mesh=mesh)


@pytest.mark.parametrize("lengths, message", [([0, 3], r"lengths must be 1\.\.8"), ([3, 9], r"lengths must be 1\.\.8")])
def test_bad_lengths_are_one_line(lengths, message):
    with pytest.raises(ValueError, match=message):
        rm.scores(CFG, reward_params(CFG), np.zeros((2, 8), np.int32), np.asarray(lengths))
    with pytest.raises(ValueError, match="sequence 1 has 0 tokens"):
        rm.score_sequences(CFG, reward_params(CFG), [[1, 2], []])


def test_sequence_ids_are_what_training_scores(tmp_path):
    tok = Llama3Tokenizer(write_byte_tokenizer(tmp_path / "tokenizer.model"))
    assert rm.sequence_ids(tok, "2+2=", "4") == [tok.bos_id, *b"2+2=", *b"4", tok.eos_id]
    messages = [{"role": "user", "content": "hi"}]
    ids = rm.sequence_ids(tok, messages, {"role": "assistant", "content": "hello"})
    assert ids == tok.encode_dialog(messages) + list(b"hello") + [tok.eot_id]  # the turn's end is scored


def test_a_checkpoint_of_the_other_kind_is_one_line(tmp_path):
    lm_dir = checkpoint.save(tmp_path / "lm", CFG, random_params(CFG))
    rm_dir = checkpoint.save(tmp_path / "rm", CFG, reward_params(CFG))
    assert (checkpoint.stored_head(lm_dir), checkpoint.stored_head(rm_dir)) == ("lm", "score")
    cfg, params = rm.load(rm_dir)
    assert cfg == dataclasses.replace(CFG) and set(params) == set(param_shapes(CFG, rm.HEAD))
    with pytest.raises(ValueError) as e:
        checkpoint.load(rm_dir)  # what infer, serve, convert and train's --init-from call
    assert str(e.value) == (f"{rm_dir} is a reward model (a score head, no next-token output): it scores sequences "
                            f"and cannot stand in for a causal language model; pass it where a reward model is "
                            f"expected")
    with pytest.raises(ValueError) as e:
        rm.load(lm_dir)
    assert str(e.value).startswith(f"{lm_dir} is a causal language model, not a reward model (it has no score head): "
                                   f"train one from it with `python -m llama_jax.train --objective reward")
    assert "\n" not in str(e.value)
