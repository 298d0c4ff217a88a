"""HF reward models (LlamaForSequenceClassification, num_labels=1) -> ours -> HF: our scores equal
transformers' on a random float32 model, the round trip gives back every tensor exactly, and other
num_labels are one line."""

import json

import numpy as np
import pytest
import torch
import transformers

from llama_jax import checkpoint
from llama_jax.convert.__main__ import main as convert_main
from llama_jax.convert.export_hf import export_hf
from llama_jax.convert.hf import convert_hf
from llama_jax.reward import model as rm
from llama_jax.tokenizer import load_tokenizer
from tests.convert import sources
from tests.convert.test_hf import tensors_of

TOL = 1e-4
HF_PAD = 300  # the source model's pad id: never among the tokens scored
LENGTHS = [20, 7, 1, 13]


def hf_reward_model(version: str, seed: int = 0) -> transformers.LlamaForSequenceClassification:
    """transformers' own reward model shape, random weights ~N(0, 0.1) (norms ~1 +- 0.2): scores O(1)."""
    config = {k: v for k, v in sources.hf_config(version).items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**config, num_labels=1, pad_token_id=HF_PAD)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def padded_rows(pad: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows of LENGTHS tokens (none of them `pad` or HF_PAD) and their lengths."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(LENGTHS), max(LENGTHS)), pad, np.int64)
    for row, n in zip(tokens, LENGTHS):
        ids = rng.integers(0, 256, n)  # byte tokens: below every special id
        row[:n] = ids
    return tokens, np.asarray(LENGTHS)


def hf_scores(model, tokens) -> np.ndarray:
    """transformers' scores: each row read at its last token that is not config.pad_token_id."""
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens), attention_mask=torch.as_tensor(tokens != model.config.pad_token_id))
    return logits.logits[:, 0].float().numpy()


@pytest.mark.parametrize("version", ["3.1", "3.2"], ids=["untied", "tied"])
def test_hf_reward_model_round_trip_scores_as_transformers(tmp_path, version):
    model = hf_reward_model(version)
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="100KB")
    (src / "original").mkdir()
    sources.byte_tokenizer(src / "original" / "tokenizer.model")
    tokens, lengths = padded_rows(HF_PAD)
    want = hf_scores(model, tokens)
    assert np.abs(want).max() > 0.5 and len(set(np.round(want, 3))) == len(LENGTHS)

    ours = convert_hf(src, tmp_path / "ours")
    assert checkpoint.stored_head(ours) == "score"
    cfg, params = rm.load(ours, dtype="float32")
    assert "output" not in params and params["score"].shape == (cfg.dim,)
    got = np.asarray(rm.scores(cfg, params, tokens, lengths))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    back = export_hf(ours, tmp_path / "back", max_shard_size=100_000)
    config = json.loads((back / "config.json").read_text())
    pad = load_tokenizer(ours / "tokenizer.model").special_tokens["<|finetune_right_pad_id|>"]
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    assert config["pad_token_id"] == pad
    assert json.loads((back / "tokenizer_config.json").read_text())["pad_token"] == "<|finetune_right_pad_id|>"
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(back, output_loading_info=True)
    assert isinstance(reloaded, transformers.LlamaForSequenceClassification) and not any(info.values()), info
    assert reloaded.config.num_labels == 1
    exported = tensors_of(back)
    source = {name: t for name, t in model.state_dict().items() if name != "lm_head.weight"}
    assert set(exported) == set(source) and "score.weight" in exported and "lm_head.weight" not in exported
    for name, tensor in source.items():  # q/k permuted back exactly, score [1, D]
        assert torch.equal(exported[name], tensor), name
    np.testing.assert_allclose(hf_scores(reloaded.eval(), padded_rows(pad)[0]), got, atol=TOL, rtol=0)


def test_other_num_labels_are_refused_in_one_line(tmp_path, capsys):
    src = tmp_path / "classifier"
    src.mkdir()
    config = {**sources.hf_config("3.0"), "architectures": ["LlamaForSequenceClassification"],
              "id2label": {"0": "NEGATIVE", "1": "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}
    (src / "config.json").write_text(json.dumps(config))
    assert convert_main(["hf", str(src), str(tmp_path / "out"), "--quiet"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {src / 'config.json'}: a LlamaForSequenceClassification with num_labels 2; only reward models, "
        f"num_labels 1 (one score per sequence), convert"]
    assert not (tmp_path / "out").exists()
