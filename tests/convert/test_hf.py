"""HF model directory -> our checkpoint -> HF model directory: logits and weights survive the round trip."""

import base64
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from transformers.convert_slow_tokenizer import TikTokenConverter

from llama_jax import checkpoint
from llama_jax.config import PRESETS
from llama_jax.convert.export_hf import export_hf
from llama_jax.convert.hf import convert_hf, tiktoken_ranks
from llama_jax.model import Llama
from llama_jax.hf_tokenizer import HFTokenizer
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path, load_tokenizer
from tests.convert import sources
from tests.reference import random_params

TOL = 1e-4
TOKENS = np.random.default_rng(1).integers(0, sources.VOCAB, (2, 20))
TEXTS = ["Hello, world! It's 2024 and   spaces\n\nnewlines.", "naïve café — 日本語 🙂 'll 've 12345"]


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens):
    return Llama(cfg).apply({"params": params}, tokens)


def save_hf(model, directory, version, config_style, **overrides):
    """save_pretrained in small shards; "4.x" swaps in a hand-written transformers 4.x config.json."""
    model.save_pretrained(directory, max_shard_size="100KB")
    assert "rope_parameters" in json.loads((directory / "config.json").read_text()), "transformers 5 writes 5.x keys"
    if config_style == "4.x":
        (directory / "config.json").write_text(json.dumps(sources.hf_config(version, **overrides)))
    return directory


def tensors_of(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(directory / file))
    assert set(out) == set(index["weight_map"])
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("version, config_style", [("3.0", "5.x"), ("3.1", "4.x"), ("3.2", "4.x"), ("3.2", "5.x")])
def test_round_trip(tmp_path, version, config_style):
    model = sources.hf_model(version)
    want = sources.hf_logits(model, TOKENS)
    src = save_hf(model, tmp_path / "hf", version, config_style)
    assert len(list(src.glob("model-*.safetensors"))) > 3
    (src / "original").mkdir()
    sources.byte_tokenizer(src / "original" / "tokenizer.model")

    ours = convert_hf(src, tmp_path / "ours")
    cfg, params = checkpoint.load(ours, dtype="float32")
    assert cfg.tie_embeddings == (version == "3.2")
    assert (cfg.rope_scaling.factor if cfg.rope_scaling else None) == sources.ROPE_FACTOR[version]
    assert (ours / "tokenizer.model").read_bytes() == (src / "original" / "tokenizer.model").read_bytes()
    np.testing.assert_allclose(np.asarray(forward(cfg, params, jnp.asarray(TOKENS))), want, atol=TOL, rtol=0)

    back = export_hf(ours, tmp_path / "back", max_shard_size=100_000)
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.tie_word_embeddings == (version == "3.2")
    assert ("lm_head.weight" in tensors_of(back)) == (version != "3.2")
    original = model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(bits(value), bits(original[name])), name
    np.testing.assert_array_equal(sources.hf_logits(reloaded.eval(), TOKENS), want)
    assert (back / "original" / "tokenizer.model").read_bytes() == (src / "original" / "tokenizer.model").read_bytes()


def test_bfloat16_round_trip_is_bit_exact(tmp_path, monkeypatch):
    from llama_jax.convert import safetensors_io, store

    monkeypatch.setattr(store, "CHUNK_BYTES", 1000)  # tensors written in blocks of a few rows,
    monkeypatch.setattr(safetensors_io, "_BLOCK_BYTES", 1000)  # uneven last blocks included
    model = sources.hf_model("3.1").to(torch.bfloat16)
    src = save_hf(model, tmp_path / "hf", "3.1", "5.x")
    ours = convert_hf(src, tmp_path / "ours")
    assert checkpoint.load_config(ours).param_dtype == "bfloat16"
    assert json.loads((ours / "params" / "layers.attention.wq" / ".zarray").read_text())["dtype"] == "bfloat16"
    back = export_hf(ours, tmp_path / "back")
    assert len(list(back.glob("model-*.safetensors"))) == 1
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported, original = tensors_of(back), tensors_of(src)
    assert exported.keys() == original.keys()
    for name in original:
        assert exported[name].dtype == torch.bfloat16 and torch.equal(bits(exported[name]), bits(original[name]))


def test_export_from_a_saved_checkpoint(tmp_path):
    """`checkpoint.save` writes Orbax's OCDBT layout; export reads it slice by slice too."""
    cfg = dataclasses.replace(PRESETS["tiny-3.1"], bos_id=256, eos_id=257)
    params = random_params(cfg)
    saved = checkpoint.save(tmp_path / "ckpt", cfg, params,
                            tokenizer_path=sources.byte_tokenizer(tmp_path / "tokenizer.model"))
    bare = checkpoint.save(tmp_path / "bare", cfg, params)
    assert (saved / "params" / "manifest.ocdbt").exists()

    out = export_hf(saved, tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    want = np.asarray(forward(dataclasses.replace(cfg, dtype="float32"), params, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(sources.hf_logits(model, TOKENS), want, atol=TOL, rtol=0)
    # end_of_text, then the tokenizer's end-of-message and end-of-turn (128001, 128008, 128009 in Llama 3).
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [257, 264, 265] and generation["bos_token_id"] == 256
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [257, 264, 265]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [257, 264, 265]

    base = export_hf(saved, tmp_path / "hf-base", base=True, dtype="bfloat16")
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 257
    assert all(t.dtype == torch.bfloat16 for t in tensors_of(base).values())
    assert json.loads((export_hf(bare, tmp_path / "hf-bare") / "generation_config.json").read_text())[
        "eos_token_id"] == 257


# tokenizer.json -> tiktoken ranks -----------------------------------------------------------

def tokenizer_json(ranks_file, path):
    specials = list(Llama3Tokenizer(ranks_file).special_tokens)
    TikTokenConverter(vocab_file=str(ranks_file), extra_special_tokens=specials).converted().save(str(path))
    return path


def llama3_subset(path, n_merged):
    """The real Llama 3 ranks, cut to every single byte plus the first `n_merged` longer tokens."""
    lines = [line.split() for line in open(default_tokenizer_path()).read().splitlines()]
    kept = [t for t, _ in lines if len(base64.b64decode(t)) == 1] + [
        t for t, _ in lines if len(base64.b64decode(t)) > 1][:n_merged]
    kept.sort(key=dict(lines).__getitem__)
    path.write_text("".join(f"{t} {i}\n" for i, t in enumerate(kept)))
    return path


def test_tokenizer_json_becomes_the_same_tiktoken_file(tmp_path):
    subset = llama3_subset(tmp_path / "subset.model", 744)
    model = sources.hf_model("3.0", vocab_size=1000 + 256)
    src = save_hf(model, tmp_path / "hf", "3.0", "5.x")
    hf_tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json(subset, src / "tokenizer.json")))

    ours = convert_hf(src, tmp_path / "ours")
    assert (ours / "tokenizer.model").read_bytes() == subset.read_bytes()
    tokenizer = Llama3Tokenizer(ours / "tokenizer.model")
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False).ids
        assert max(ids) > 255, "merged tokens are used"


def test_real_llama3_tokenizer_json(tmp_path):
    converted = tiktoken_ranks(tokenizer_json(default_tokenizer_path(), tmp_path / "tokenizer.json"))
    assert converted == open(default_tokenizer_path(), "rb").read()


def test_tokenizer_json_that_is_not_llama3_is_carried_as_it_is(tmp_path):
    """Llama 3's vocabulary split by another pattern is not Llama 3's tokenizer: tiktoken cannot
    give its ids, so the checkpoint keeps the tokenizer.json, which the `tokenizers` library serves."""
    model = sources.hf_model("3.0", vocab_size=10 + 256 + 256)
    src = save_hf(model, tmp_path / "hf", "3.0", "5.x")
    path = tokenizer_json(llama3_subset(tmp_path / "subset.model", 10), src / "tokenizer.json")
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tokenizer.json: its pre-tokenizer does not split text with Llama 3's"):
        tiktoken_ranks(path)

    ours = convert_hf(src, tmp_path / "ours")
    assert not (ours / "tokenizer.model").exists()
    assert (ours / "tokenizer.json").read_bytes() == path.read_bytes()
    tokenizer = load_tokenizer(ours)
    assert isinstance(tokenizer, HFTokenizer)
    for text in TEXTS:
        assert tokenizer.encode(text, bos=False, eos=False) == tokenizers.Tokenizer.from_file(str(path)).encode(
            text, add_special_tokens=False).ids


# A Llama-architecture model with its own tokenizer (SmolLM2-style) ---------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, naïve café!"}]


def test_model_with_its_own_tokenizer_converts_exactly(tmp_path, hf_chat_model):
    ours = convert_hf(hf_chat_model, tmp_path / "ours")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ours / name).read_bytes() == (hf_chat_model / name).read_bytes()
    assert not (ours / "tokenizer.model").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(hf_chat_model, dtype=torch.float32).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(hf_chat_model)
    tokenizer = load_tokenizer(ours)
    ids = tokenizer.encode_dialog(CHAT)
    assert ids == theirs.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    cfg, params = checkpoint.load(ours, dtype="float32")
    assert (cfg.vocab_size, cfg.bos_id, cfg.eos_id, cfg.tie_embeddings) == (len(theirs), 1, 2, True)
    got = np.asarray(forward(cfg, params, jnp.asarray([ids])))
    np.testing.assert_allclose(got, sources.hf_logits(model, [ids]), atol=TOL, rtol=TOL)


def test_model_with_its_own_tokenizer_exports_its_tokenizer(tmp_path, hf_chat_model):
    """to-hf copies the carried files: AutoTokenizer loads them with the original's ids."""
    exported = export_hf(convert_hf(hf_chat_model, tmp_path / "ours"), tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).read_bytes() == (hf_chat_model / name).read_bytes()
    assert not (exported / "original").exists()
    assert json.loads((exported / "generation_config.json").read_text()) == json.loads(
        (hf_chat_model / "generation_config.json").read_text())  # its own, with the same bos / eos
    original = transformers.AutoTokenizer.from_pretrained(hf_chat_model)
    again = transformers.AutoTokenizer.from_pretrained(exported)
    for text in [*TEXTS, "<|im_start|>user\nHi<|im_end|>"]:
        assert again(text)["input_ids"] == original(text)["input_ids"]
    assert again.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False) == \
        original.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    tensors, reference = tensors_of(exported), transformers.LlamaForCausalLM.from_pretrained(hf_chat_model)
    assert all(torch.equal(tensors[name], value) for name, value in reference.state_dict().items()
               if name in tensors)
