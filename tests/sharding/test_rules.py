"""THE rules table: golden parameter specs per preset and mesh, the duplicate-axis check, fallbacks."""

import logging

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from llama_jax.config import LlamaConfig
from llama_jax.params import param_shardings
from llama_jax.sharding import RULES, axes, batch_split, logical_to_spec, make_mesh, rules


def abstract_mesh(dp, fsdp, tp, cp=1):
    return AbstractMesh((dp, fsdp, cp, tp), ("dp", "fsdp", "cp", "tp"))


def specs(cfg, mesh):
    return {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_leaves_with_path(param_shardings(cfg, mesh))}


def test_rules_table_names_each_logical_axis_once_and_covers_the_model():
    names = [name for name, _ in RULES]
    assert len(names) == len(set(names))
    every_logical_name = {v for k, v in vars(axes).items() if k.isupper()}
    assert set(names) == every_logical_name


L = "['layers']"


def golden(*, wq, wo, w1, w2, norm, layer_norm, embedding, output=None):
    """Every parameter's spec: wk and wv are split as wq, w3 as w1 (their dims are the same logical axes)."""
    table = {f"{L}['attention']['wq']": wq, f"{L}['attention']['wk']": wq, f"{L}['attention']['wv']": wq,
             f"{L}['attention']['wo']": wo, f"{L}['attention_norm']['scale']": layer_norm,
             f"{L}['ffn_norm']['scale']": layer_norm, f"{L}['feed_forward']['w1']": w1,
             f"{L}['feed_forward']['w3']": w1, f"{L}['feed_forward']['w2']": w2, "['norm']['scale']": norm,
             "['tok_embeddings']": embedding}
    return table if output is None else table | {"['output']": output}


# (preset, (dp, fsdp, tp)) -> the spec of every parameter. wq [layers, embed, heads*head_dim],
# wo [layers, heads, head_dim, embed], w1 [layers, embed, mlp], w2 [layers, mlp, embed], the embedding
# [vocab, embed], output [embed, vocab] (none when tied: 3.2 1B / 3B).
GOLDEN = {
    ("llama3.1-8b", (2, 4, 8)): golden(
        wq=P(None, "fsdp", "tp"), wo=P(None, "tp", None, "fsdp"), w1=P(None, "fsdp", "tp"), w2=P(None, "tp", "fsdp"),
        norm=P("fsdp"), layer_norm=P(None, "fsdp"), embedding=P("tp", "fsdp"), output=P("fsdp", "tp")),
    ("llama3.1-405b", (1, 32, 8)): golden(
        wq=P(None, "fsdp", "tp"), wo=P(None, "tp", None, "fsdp"), w1=P(None, "fsdp", "tp"), w2=P(None, "tp", "fsdp"),
        norm=P("fsdp"), layer_norm=P(None, "fsdp"), embedding=P("tp", "fsdp"), output=P("fsdp", "tp")),
    ("llama3.1-70b", (1, 64, 1)): golden(  # pure FSDP: the embed dim of everything
        wq=P(None, "fsdp"), wo=P(None, None, None, "fsdp"), w1=P(None, "fsdp"), w2=P(None, None, "fsdp"),
        norm=P("fsdp"), layer_norm=P(None, "fsdp"), embedding=P(None, "fsdp"), output=P("fsdp")),
    ("llama3.2-1b", (1, 8, 1)): golden(  # tied: the embedding is the output projection
        wq=P(None, "fsdp"), wo=P(None, None, None, "fsdp"), w1=P(None, "fsdp"), w2=P(None, None, "fsdp"),
        norm=P("fsdp"), layer_norm=P(None, "fsdp"), embedding=P(None, "fsdp")),
    ("llama3.2-3b", (1, 1, 8)): golden(  # 24 heads and 8 kv heads over tp8; norms replicated
        wq=P(None, None, "tp"), wo=P(None, "tp"), w1=P(None, None, "tp"), w2=P(None, "tp"), norm=P(),
        layer_norm=P(), embedding=P("tp")),
    ("tiny", (2, 1, 4)): golden(  # the tests' dp2,tp4: 4 heads split, 2 kv heads cannot be (replicated)
        wq=P(None, None, "tp"), wo=P(None, "tp"), w1=P(None, None, "tp"), w2=P(None, "tp"), norm=P(),
        layer_norm=P(), embedding=P("tp"), output=P(None, "tp"))
    | {f"{L}['attention']['wk']": P(), f"{L}['attention']['wv']": P()},
}


@pytest.mark.parametrize("preset, mesh", GOLDEN)
def test_golden_specs(preset, mesh):
    assert specs(LlamaConfig.preset(preset), abstract_mesh(*mesh)) == GOLDEN[preset, mesh]


def test_golden_specs_pure_data_parallel_replicates_everything():
    assert set(specs(LlamaConfig.preset("llama3.2-1b"), abstract_mesh(8, 1, 1)).values()) == {P()}


def test_context_parallel_splits_params_like_fsdp_and_activations_along_the_sequence():
    # Params: embed over fsdp x cp (ZeRO-3 over the cp group too); the rest as without cp.
    got = specs(LlamaConfig.preset("llama3.1-8b"), abstract_mesh(1, 2, 1, cp=4))
    assert got[f"{L}['attention']['wq']"] == P(None, ("fsdp", "cp"))
    assert got[f"{L}['feed_forward']['w2']"] == P(None, None, ("fsdp", "cp"))
    assert got["['tok_embeddings']"] == P(None, ("fsdp", "cp"))
    assert specs(LlamaConfig.preset("llama3.1-8b"), abstract_mesh(2, 1, 1, cp=4))["['output']"] == P("cp")
    # Batches and block-boundary activations: rows over dp x fsdp, tokens over cp.
    mesh = abstract_mesh(2, 1, 2, cp=2)
    assert logical_to_spec((axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH), (8, 64), mesh) == P("dp", "cp")
    assert logical_to_spec((axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_VOCAB), (8, 64, 512),
                           mesh) == P("dp", "cp", "tp")


def test_dims_a_mesh_axis_does_not_divide_are_replicated_over_it():
    # 2 kv heads cannot be split 8 ways: every tp rank keeps both (GQA's usual fallback); 8 query heads split.
    cfg = LlamaConfig.preset("tiny", n_heads=8, n_kv_heads=2)
    got = specs(cfg, abstract_mesh(1, 1, 8))
    assert got[f"{L}['attention']['wk']"] == P()
    assert got[f"{L}['attention']['wq']"] == P(None, None, "tp")


def test_a_replicated_dim_is_reported_once_per_logical_and_mesh_axis(caplog, monkeypatch):
    monkeypatch.setattr(rules, "_reported_replications", set())  # earlier tests in this process reported it
    cfg = LlamaConfig.preset("tiny")  # 2 kv heads in wk and wv
    mesh = make_mesh("dp2,tp4")
    with caplog.at_level(logging.INFO, logger=rules.__name__):
        shardings = param_shardings(cfg, mesh)  # wk and wv: two arrays, one notice
        param_shardings(cfg, mesh)
    notices = [r.getMessage() for r in caplog.records if "not divisible" in r.getMessage()]
    assert notices == ["kv_heads (size 2) is not divisible over mesh axis tp=4: replicated over it in every array"]
    assert shardings["layers"]["attention"]["wv"].spec == P()


def test_two_dims_on_one_mesh_axis_raise():
    with pytest.raises(ValueError, match="'heads' and 'mlp' both map to mesh axis 'tp'"):
        logical_to_spec((axes.HEADS, axes.MLP))
    with pytest.raises(ValueError, match="both map to mesh axis 'fsdp'"):
        logical_to_spec((axes.ACTIVATION_BATCH, axes.EMBED))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'bogus'"):
        logical_to_spec(("bogus",))
    with pytest.raises(ValueError, match="do not match the array's rank"):
        logical_to_spec((axes.EMBED,), shape=(4, 4))


def test_batch_specs():
    mesh = abstract_mesh(2, 4, 1)
    assert logical_to_spec((axes.ACTIVATION_BATCH, axes.ACTIVATION_LENGTH), (64, 128), mesh) == P(("dp", "fsdp"))


def test_batch_split_is_the_ways_the_rules_split_batch_rows():
    assert batch_split(None) == 1
    assert batch_split(make_mesh("dp2,fsdp2,tp2")) == 4
    assert batch_split(make_mesh("cp2,tp4")) == 1  # cp splits each row's tokens, tp nothing of the batch
