"""param_shardings of trees that are not plain arrays: a quantized base and LoRA-adapted weights are
split like the weights they stand for."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import lora
from llama_jax.config import LlamaConfig
from llama_jax.params import init_params, param_shapes, param_shardings
from llama_jax.quantize import QuantizedArray, quantize_params
from llama_jax.sharding import make_mesh

CFG = LlamaConfig.preset("tiny", n_heads=8, n_kv_heads=2)  # D=64, F=192, V=512

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")


def test_default_tree_is_the_config_shapes():
    mesh = make_mesh("fsdp2,tp4")
    assert param_shardings(CFG, mesh) == param_shardings(CFG, mesh, param_shapes(CFG))
    assert param_shardings(CFG, mesh)["layers"]["attention"]["wq"].spec == P(None, "fsdp", "tp")


def test_quantized_values_split_like_the_weight_and_scales_replicate_their_size_1_dims():
    mesh = make_mesh("fsdp2,tp4")
    q = quantize_params(init_params(CFG, 0), "int8")
    shardings = param_shardings(CFG, mesh, q)
    w1 = shardings["layers"]["feed_forward"]["w1"]  # [L, D, F]; scale [L, 1, F]
    assert isinstance(w1, QuantizedArray)
    assert (w1.values.spec, w1.scale.spec) == (P(None, "fsdp", "tp"), P(None, None, "tp"))
    placed = jax.device_put(q, shardings)["layers"]["feed_forward"]["w1"]
    assert placed.scale.sharding.spec == P(None, None, "tp")


def test_lora_a_splits_like_the_weight_inputs_and_b_like_its_outputs():
    mesh = make_mesh("fsdp2,tp4")
    spec = lora.LoraConfig(rank=4)
    params = init_params(CFG, 0)
    adapted = lora.adapt(params, lora.init_adapters(CFG, spec, 1), spec)
    shardings = param_shardings(CFG, mesh, adapted)
    wq, w2 = shardings["layers"]["attention"]["wq"], shardings["layers"]["feed_forward"]["w2"]
    assert (wq.base.spec, wq.a.spec, wq.b.spec) == (P(None, "fsdp", "tp"), P(None, "fsdp"), P(None, None, "tp"))
    assert (w2.base.spec, w2.a.spec, w2.b.spec) == (P(None, "tp", "fsdp"), P(None, "tp"), P(None, None, "fsdp"))
