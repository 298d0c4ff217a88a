"""LoRA and QLoRA runs end to end, from a converted Hugging Face checkpoint: step 0 is the base model,
the loss falls on a small chat set, checkpoints hold adapters only, resume is exact, OUT/model is the
merged model and decodes as `infer --lora OUT/adapters` serves the adapters unmerged, bad flags are one line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import checkpoint, lora
from llama_jax.model import Llama
from llama_jax.train.loop import TrainConfig, train
from tests.train.conftest import losses, saved_steps
from tests.train.faults import sigterm_at

STEPS = 6
RUN = dict(seq_len=32, batch_size=8, steps=STEPS, lr=1e-2, warmup_steps=0, save_every=2, keep=10, log_every=1,
           progress=False, mesh="fsdp8", lora_rank=8, lora_targets=("wq", "wv", "w1", "w2", "w3"))


@pytest.fixture(scope="module")
def converted(hf_chat_model, tmp_path_factory):
    """(base checkpoint, chat data): the tiny SmolLM2-style model converted, and a small chat set."""
    from llama_jax.convert.hf import convert_hf

    root = tmp_path_factory.mktemp("lora_base")
    base = convert_hf(hf_chat_model, root / "converted")
    records = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                             {"role": "assistant", "content": f"{2 * i}."}]} for i in range(40)]
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return base, data


@pytest.fixture(scope="module")
def lora_run(converted, tmp_path_factory):
    base, data = converted
    out = tmp_path_factory.mktemp("lora_run")
    summary = train(TrainConfig(out=str(out), init_from=str(base), data=(str(data),), **RUN))
    assert summary["status"] == "completed"
    return out, summary


def first_batch(base, data):
    """Step 0's global batch as a run reads it: `data` prepared with the base's tokenizer (once, then reused)."""
    from llama_jax.data import GlobalBatches, PreparedData, prepare

    prepared = data.parent / "prepared"
    prepare([data], checkpoint.tokenizer_path(base), RUN["seq_len"], prepared, progress=False)
    return GlobalBatches(PreparedData(prepared), RUN["batch_size"], seed=0).read(0)


def batch_loss(cfg, params, batch):
    from llama_jax.train.step import loss_sums

    _, sums = jax.jit(lambda p, b: loss_sums(cfg, p, b))(params, jax.tree.map(jnp.asarray, batch))
    return float(sums["nll"] / sums["weight"])


def test_lora_run_starts_at_the_base_loss_falls_and_exports(converted, lora_run):
    base, data = converted
    out, summary = lora_run
    cfg, params = checkpoint.load(base, dtype="float32")
    assert summary["first_loss"] == pytest.approx(batch_loss(cfg, params, first_batch(base, data)), rel=1e-5)
    assert summary["final_loss"] < summary["first_loss"] - 0.5, summary["losses"]
    assert summary["trained_params"] == lora.num_adapter_params(cfg, lora.LoraConfig(8, targets=RUN["lora_targets"]))

    # Train checkpoints hold the adapters and their Adam moments, nothing of the base.
    meta = ocp.StandardCheckpointer().metadata(out / "checkpoints" / str(STEPS) / "state").item_metadata
    adapter_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(lora.adapter_shapes(
        cfg, lora.LoraConfig(8, targets=RUN["lora_targets"]))))
    assert sorted(tuple(x.shape) for x in jax.tree.leaves(meta["params"])) == adapter_shapes
    run = json.loads((out / "lora.json").read_text())
    assert run["base"] == str(base) and run["base_config_sha256"] == lora.config_sha256(checkpoint.load_config(base))

    # OUT/model is W + alpha/r A @ B in the base's dtype; `infer --lora --merge-lora` merges the same at load.
    merged_cfg, merged = checkpoint.load(out / "model", dtype="float32")
    assert merged_cfg.param_dtype == checkpoint.load_config(base).param_dtype
    served = lora.merge_from(out / "adapters", params, cfg, base_path=base, base_config=checkpoint.load_config(base))
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(served)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(merged["layers"]["attention"]["wq"] - params["layers"]["attention"]["wq"]))) > 0
    np.testing.assert_array_equal(merged["layers"]["attention"]["wk"], params["layers"]["attention"]["wk"])
    assert batch_loss(cfg, merged, first_batch(base, data)) < summary["first_loss"] - 0.5


def test_merged_model_exports_to_hugging_face(converted, lora_run, tmp_path):
    """`convert to-hf` takes OUT/model as any checkpoint: transformers' logits are the merged model's."""
    import torch
    import transformers

    from llama_jax.convert.export_hf import export_hf

    base, data = converted
    out, _ = lora_run
    cfg, merged = checkpoint.load(out / "model", dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(export_hf(out / "model", tmp_path / "hf")).eval()
    tokens = first_batch(base, data)["inputs"][:1, :16]
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens).long()).logits.numpy()
    got = jax.jit(Llama(cfg).apply)({"params": merged}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_lora_resume_is_exact(converted, lora_run, tmp_path):
    base, data = converted
    stopped = train(TrainConfig(out=str(tmp_path), init_from=str(base), data=(str(data),), **RUN), sigterm_at(3))
    assert stopped["steps"] == 3 and saved_steps(tmp_path) == [2, 3]
    resumed = train(TrainConfig(out=str(tmp_path), data=(str(data),), **RUN))  # the base comes from OUT/lora.json
    assert resumed["resumed_from"] == 3 and resumed["status"] == "completed"
    want = losses(lora_run[0])
    for step, loss in losses(tmp_path).items():
        assert loss == pytest.approx(want[step], rel=1e-6), step


def test_qlora_run_merges_what_it_trained(converted, tmp_path):
    """The int8 base with the adapters applied unmerged gives the merged OUT/model's logits."""
    from llama_jax.quantize import quantize_params

    base, data = converted
    summary = train(TrainConfig(out=str(tmp_path), init_from=str(base), data=(str(data),),
                                **{**RUN, "steps": 2, "quantize_base": "int8"}))
    cfg, params = checkpoint.load(base, dtype="float32")
    int8 = quantize_params(params, "int8")
    assert summary["first_loss"] == pytest.approx(batch_loss(cfg, int8, first_batch(base, data)), rel=1e-5)
    spec, adapters = lora.load_adapters(tmp_path / "adapters", cfg, base_config=checkpoint.load_config(base),
                                        base_path=base)
    _, merged = checkpoint.load(tmp_path / "model", dtype="float32")
    tokens = jnp.asarray(first_batch(base, data)["inputs"][:2])
    apply = jax.jit(Llama(cfg).apply)
    unmerged_logits = apply({"params": lora.adapt(int8, adapters, spec)}, tokens)
    np.testing.assert_allclose(apply({"params": merged}, tokens), unmerged_logits, rtol=1e-5, atol=1e-5)


def test_bad_lora_flags_are_one_line(converted, tmp_path, capsys):
    from llama_jax.train.__main__ import main

    base, data = converted
    common = ["--init-from", str(base), "--data", str(data), "--no-progress"]
    cases = [
        (["--lora-rank", "0"], "error: --lora-rank must be a positive integer, got 0"),
        (["--lora-rank", "4", "--lora-targets", "wq,wz"], "error: --lora-targets: unknown weight 'wz'"),
    ]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main(["--out", str(out), *common, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
        assert not out.exists()  # nothing half-written
    assert main(["--out", str(tmp_path / "nobase"), "--lora-rank", "4", "--data", str(data)]) == 2
    assert capsys.readouterr().err.strip() == ("error: --lora-rank needs --init-from CHECKPOINT: the base model the "
                                               "adapters are trained on")


def test_infer_serves_adapters_and_refuses_another_base(converted, lora_run, tmp_path, capsys):
    from llama_jax.infer.__main__ import main

    base, _ = converted
    out, _ = lora_run
    prompt = ["--prompt", "What is 3 + 3?", "--chat", "--temperature", "0", "--max-new-tokens", "4"]
    assert main(["--checkpoint", str(base), "--lora", str(out / "adapters"), *prompt]) == 0
    with_adapters = capsys.readouterr().out
    assert main(["--checkpoint", str(out / "model"), *prompt]) == 0
    assert capsys.readouterr().out == with_adapters
    # Another base (a changed config): refused before the weights load.
    other = tmp_path / "other"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "norm_eps": 1e-6}))
    assert main(["--checkpoint", str(other), "--lora", str(out / "adapters"), *prompt]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --lora {out / 'adapters'} was trained on the base {base}") and "\n" not in err
    assert "not the same model" in err
