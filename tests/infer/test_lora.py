"""A LoRA adapter served unmerged by the batching engine (lora.adapt: the base as loaded plus
alpha/r (x A) B in each adapted projection): its greedy tokens and log-probs are those of the merged
model, computed independently (numpy merge, full forward pass without a cache); on an int8 base,
those of the dequantized int8 base plus the adapter. `infer --lora` serves it so, `--merge-lora`
merges it as it loads, and a bad adapter directory is one line before any weight loads."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import checkpoint, lora
from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import RequestParams, MAX_LOGPROBS
from llama_jax.infer.weights import decode_params
from llama_jax.params import param_shardings
from llama_jax.infer.load import load_for_inference
from llama_jax.quantize import QuantizedArray, dequantize_params, quantize_params
from llama_jax.lora import LoraWeight
from llama_jax.sharding import make_mesh
from tests.infer.common import _forward
from tests.infer.test_cli import run_cli
from tests.train.test_lora import numpy_merge

SPEC = lora.LoraConfig(rank=4, alpha=8.0)  # all seven projections
PROMPT = [1, 17, 300, 42, 9, 250, 3, 77, 5, 120]
NEW = 6


def random_adapters(cfg, spec=SPEC, seed=1):
    """A ~ N(0, 1/fan_in) as lora.init_adapters draws it, and B ~ N(0, 0.05), not its zeros (which would
    serve the base); drawn with numpy, so no program is compiled for them."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        std = 0.05 if path[-1].key == "b" else 1 / np.sqrt(np.prod(s.shape[1:-1]))
        return jnp.asarray(rng.normal(0, std, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, lora.adapter_shapes(cfg, spec))


def engine_run(cfg, params):
    """(greedy tokens, [(top ids, top log-probs)] per step) of one request through the engine. One
    prompt token a step (a 1x1 chunk): two small programs, the step with and without the chunk."""
    engine = BatchingEngine(cfg, params, max_batch=1, max_seq_len=32, page_size=8, chunk_shapes=[(1, 1)])
    engine.add("0", PROMPT, RequestParams(NEW, temperature=0.0, logprobs=MAX_LOGPROBS))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    return [o.token_id for o in outputs], [tuple(zip(*o.top_logprobs)) for o in outputs]


def reference_logprobs(cfg, params, tokens):
    """log_softmax of one forward pass (no cache) over PROMPT + tokens: the distribution of each new token."""
    sequence = np.zeros((1, 16), np.int32)  # right padding: causal attention keeps it from the rows read
    sequence[0, :len(PROMPT) + len(tokens)] = PROMPT + tokens
    logits = _forward(jax.tree.map(jnp.asarray, params), jnp.asarray(sequence), cfg)[0]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(PROMPT) - 1:len(PROMPT) - 1 + len(tokens)]


def assert_engine_serves(cfg, params, tokens, tops, tol=1e-5):
    """The engine's greedy tokens and top log-probs are those of `params`' full forward pass."""
    want = reference_logprobs(cfg, params, tokens)
    assert tokens == [int(row.argmax()) for row in want]
    for (ids, values), row in zip(tops, want):
        assert list(ids) == list(np.argsort(-row)[:MAX_LOGPROBS])
        np.testing.assert_allclose(values, row[list(ids)], rtol=0, atol=tol)
    return want


def test_unmerged_adapter_decodes_as_the_merged_model(tiny):
    cfg, params = tiny
    adapters = random_adapters(cfg)  # B != 0: the init's B = 0 would serve the base
    merged = numpy_merge(params, adapters, SPEC)
    adapted = lora.adapt(params, adapters, SPEC)
    _, split = decode_params(cfg, adapted)  # the engine's per-layer layout keeps each layer's adapter beside W
    wq = split.layers[1]["attention"]["wq"]
    assert isinstance(wq, LoraWeight) and wq.a.shape == (cfg.dim, SPEC.rank)
    np.testing.assert_array_equal(wq.base, params["layers"]["attention"]["wq"][1])
    np.testing.assert_array_equal(wq.b, adapters["layers"]["attention"]["wq"]["b"][1])

    tokens, tops = engine_run(cfg, split)
    # The merged model's greedy tokens (each the argmax after the ones before) and log-probs.
    want = assert_engine_serves(cfg, merged, tokens, tops)
    base = reference_logprobs(cfg, params, tokens)
    assert np.abs(base - want).max() > 0.1  # the adapter changes the model


def test_unmerged_adapter_on_an_int8_base(tiny):
    """The oracle is the int8 base dequantized plus s A @ B (numpy): the model a QLoRA run trained and
    `infer --quantize int8 --lora` serves. Quantizing the merged weights instead is another model (the
    update rounded to each channel's int8 grid), which this test shows apart."""
    cfg, params = tiny
    adapters = random_adapters(cfg)
    int8 = quantize_params(params, "int8")
    tokens, tops = engine_run(cfg, lora.adapt(int8, adapters, SPEC))
    want = assert_engine_serves(cfg, numpy_merge(dequantize_params(int8, jnp.float32), adapters, SPEC), tokens, tops)
    merged_then_int8 = dequantize_params(quantize_params(jax.tree.map(jnp.asarray, numpy_merge(
        params, adapters, SPEC)), "int8"), jnp.float32)
    assert np.abs(reference_logprobs(cfg, merged_then_int8, tokens) - want).max() > 1e-3


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")
def test_adapters_are_placed_like_their_weights_on_a_mesh(tiny):
    cfg, params = tiny
    mesh = make_mesh("fsdp2,tp4")
    adapted = lora.adapt(params, random_adapters(cfg), SPEC)
    shardings = param_shardings(cfg, mesh, adapted)
    wq, w2 = shardings["layers"]["attention"]["wq"], shardings["layers"]["feed_forward"]["w2"]
    assert (wq.base.spec, wq.a.spec, wq.b.spec) == (P(None, "fsdp", "tp"), P(None, "fsdp"), P(None, None, "tp"))
    assert (w2.base.spec, w2.a.spec, w2.b.spec) == (P(None, "tp", "fsdp"), P(None, "tp"), P(None, None, "fsdp"))
    placed = jax.device_put(adapted, shardings)["layers"]["attention"]["wq"]
    assert isinstance(placed, LoraWeight) and placed.b.sharding.spec == P(None, None, "tp")


# The CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, checkpoint_dir):
    cfg = checkpoint.load_config(checkpoint_dir)
    return lora.save_adapters(tmp_path_factory.mktemp("lora") / "adapters", SPEC, random_adapters(cfg),
                              base=checkpoint_dir, base_config=cfg)


def test_cli_loads_the_adapter_unmerged_or_merged(checkpoint_dir, adapter_dir, llama3_tiny):
    """What `infer --lora` hands the engine (its tokens: the tests above, and end to end from a LoRA
    run in tests/train/test_lora_run.py): the base as loaded (int8 with --quantize) with each layer's
    A and B beside W; with --merge-lora, W + s A @ B (then quantized)."""
    cfg, params = llama3_tiny
    _, adapters = lora.load_adapters(adapter_dir, cfg, base_config=cfg, base_path=checkpoint_dir)
    load = lambda **kwargs: load_for_inference(checkpoint_dir, lora=adapter_dir, **kwargs).params  # noqa: E731
    wq = load().layers[1]["attention"]["wq"]
    assert isinstance(wq, LoraWeight) and wq.scale == SPEC.scale
    np.testing.assert_array_equal(wq.base, params["layers"]["attention"]["wq"][1])
    np.testing.assert_array_equal(wq.a, adapters["layers"]["attention"]["wq"]["a"][1])
    merged = numpy_merge(params, adapters, SPEC)["layers"]["attention"]["wq"][1]
    np.testing.assert_allclose(load(merge_lora=True).layers[1]["attention"]["wq"], merged, rtol=1e-6, atol=1e-7)
    wq8 = load(quantize="int8").layers[1]["attention"]["wq"]  # QLoRA: the adapters beside the int8 weights
    assert isinstance(wq8, LoraWeight) and isinstance(wq8.base, QuantizedArray) and wq8.a.dtype == jnp.float32
    assert isinstance(load(quantize="int8", merge_lora=True).layers[1]["attention"]["wq"], QuantizedArray)


@pytest.mark.parametrize("case, lora_dir, extra, message", [
    ("missing dir", "{tmp}/nope", [], "error: {tmp}/nope: no such directory (a LoRA run writes its adapters to "
                                     "OUT/adapters)"),
    ("a checkpoint", "{ckpt}", [], "error: {ckpt} is not a LoRA adapter directory (expected adapter_config.json "
                                   "and params/ inside"),
    ("a run's directory", "{run}", [], "error: {run} is a LoRA run's directory: pass its adapters, {run}/adapters"),
    ("another base", "{adapters}", ["--checkpoint", "{other}"],
     "error: --lora {adapters} was trained on the base {ckpt} (config hash"),
    ("merge without lora", None, ["--merge-lora"], "error: --merge-lora needs --lora DIR"),
])
def test_bad_adapters_are_one_line_before_the_weights_load(capsys, monkeypatch, tmp_path, checkpoint_dir,
                                                           adapter_dir, case, lora_dir, extra, message):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapters")
    other = tmp_path / "other"  # the base with another config: another model
    shutil.copytree(checkpoint_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "norm_eps": 1e-6}))
    names = dict(tmp=tmp_path, ckpt=checkpoint_dir, run=run, adapters=adapter_dir, other=other)
    argv = ["--checkpoint", str(checkpoint_dir), "--prompt", "hi"] + (["--lora", lora_dir] if lora_dir else [])
    argv = [a.format(**names) for a in argv + extra]

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(checkpoint, "load", no_load)
    status, out, err = run_cli(capsys, *argv)
    assert (status, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(message.format(**names)), err
