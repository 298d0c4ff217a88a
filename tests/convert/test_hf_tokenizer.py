"""The exported HF tokenizer against ours on the real Llama 3 tokenizer.model: transformers'
AutoTokenizer must give our ids, our text back, and our chat ids."""

import dataclasses
import json
from pathlib import Path

import jinja2
import pytest
import transformers
from transformers.convert_slow_tokenizer import TikTokenConverter

from llama_jax import checkpoint
from llama_jax.config import PRESETS
from llama_jax.convert.__main__ import main
from llama_jax.convert.hf import tiktoken_ranks
from llama_jax.convert.hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, write_hf_tokenizer
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path
from tests.reference import random_params, random_unicode_texts
from tests.test_tokenizer import DIALOGS
from tests.test_tokenizer import TEXTS as TOKENIZER_TEXTS

REPO = Path(__file__).parents[2]
# tokenizers cannot take a lone surrogate (tiktoken replaces it before encoding).
TEXTS = {name: text for name, text in TOKENIZER_TEXTS.items() if name != "lone_surrogate"} | {
    "long_spaces": "a" + " " * 1000 + "b\n" + "\t" * 300 + "\n" * 200 + "  end   ",
    "digit_runs": "1234567 12345678 0.000001 99999999999 x1y22z333",
    "three_part_tokens": ".:.:.:.: việc hợp nhiều nghiệp jeho",  # lower-rank BPE ends in 3 parts
    "vietnamese": "Tiếng Việt có nhiều dấu: ả, ẫ, ặ, ờ, ữ, ỵ.",
    "combining": "e\u0301 n\u0303 \u0915\u094d\u0937 Z\u0351\u036b\u0343",
    "json": '{"key": [1, 2.5e-3, null, true], "nested": {"a": "b\\n"}}',
    "specials_only": "<|begin_of_text|><|eot_id|><|reserved_special_token_245|><|python_tag|>",
    "readme": (REPO / "README.md").read_text(),
    "source": (REPO / "llama_jax" / "tokenizer.py").read_text(),
}


@pytest.fixture(scope="module")
def ours():
    return Llama3Tokenizer(default_tokenizer_path())


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(ours, directory, max_seq_len=8192, base=False)
    return directory


@pytest.fixture(scope="module")
def hf(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


def has_special_string(text: str, ours) -> bool:
    return any(name in text for name in ours.special_tokens)


def test_vocab_and_merges_are_those_of_transformers_converter(exported):
    model = json.loads((exported / TOKENIZER_JSON).read_text(encoding="utf-8"))["model"]
    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(default_tokenizer_path())
    assert model["vocab"] == vocab and len(vocab) == 128000
    assert model["merges"] == [f"{left} {right}" for left, right in merges]
    assert len(merges) == 280147  # as in Meta's own Llama 3 tokenizer.json


def test_tokenizer_json_converts_back_to_the_same_ranks_file(exported):
    """convert hf reads tokenizer.json back into tiktoken ranks: the round trip is exact."""
    assert tiktoken_ranks(exported / TOKENIZER_JSON) == Path(default_tokenizer_path()).read_bytes()


@pytest.mark.parametrize("name", TEXTS)
def test_encode_and_decode_match_ours(ours, hf, name):
    text = TEXTS[name]
    with_bos, without = ours.encode(text, bos=True, eos=False), ours.encode(text, bos=False, eos=False)
    # split_special_tokens=True: special-token strings in the text stay text, as in Meta's encode.
    assert hf(text, split_special_tokens=True)["input_ids"] == with_bos
    assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == without
    if not has_special_string(text, ours):
        assert hf(text)["input_ids"] == with_bos
        assert hf(text, add_special_tokens=False)["input_ids"] == without
    assert hf.decode(without) == text
    assert hf.decode(with_bos) == ours.decode(with_bos)


def test_special_strings_in_text_become_special_ids_by_default(ours, hf):
    """HF's convention, which its chat template relies on; Meta's encode keeps them text."""
    hi = ours.encode("hi ", bos=False, eos=False)
    assert hf("hi <|eot_id|>", add_special_tokens=False)["input_ids"] == [*hi, ours.eot_id]
    assert ours.eot_id not in ours.encode("hi <|eot_id|>", bos=False, eos=False)


def test_random_unicode_matches_ours(ours, hf):
    texts = random_unicode_texts(0, 500, extra=(".:", ":."))
    assert hf(texts, add_special_tokens=False)["input_ids"] == [ours.encode(t, bos=False, eos=False) for t in texts]


def test_decoding_a_cut_character_gives_the_replacement_character(ours, hf):
    ids = ours.encode("🙂日本", bos=False, eos=False)
    assert [hf.decode(ids[:k]) for k in range(1, len(ids) + 1)] == ["\ufffd", "🙂", "🙂日本"]
    assert [ours.decode(ids[:k]) for k in range(1, len(ids) + 1)] == ["\ufffd", "🙂", "🙂日本"]


@pytest.mark.parametrize("name", DIALOGS)
def test_chat_template_matches_encode_dialog(ours, hf, name):
    messages = DIALOGS[name]
    want = ours.encode_dialog(messages)
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == want
    header = ours.encode_header("assistant")
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == want[:-len(header)]


def test_chat_template_refuses_what_encode_dialog_refuses(hf):
    with pytest.raises(jinja2.TemplateError, match="unknown chat role narrator"):
        hf.apply_chat_template([{"role": "narrator", "content": "x"}])
    with pytest.raises(jinja2.TemplateError, match="content must be a str"):
        hf.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_chat_content_starting_with_a_newline_is_the_known_difference(ours, hf):
    """The template's "\\n\\n" and the content are one text to HF, two encodes to encode_dialog."""
    messages = [{"role": "user", "content": "\nHi"}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) != ours.encode_dialog(
        messages)


def test_runs_over_25000_characters_are_the_known_difference(ours, hf):
    """Meta cuts such runs into 25,000-character pieces before encoding; HF encodes them whole."""
    text = "a" + " " * 30000 + "b"
    assert hf(text, add_special_tokens=False)["input_ids"] != ours.encode(text, bos=False, eos=False)


def test_config(exported, hf, ours):
    config = json.loads((exported / TOKENIZER_CONFIG).read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (hf.bos_token_id, hf.eos_token_id, hf.model_max_length) == (ours.bos_id, ours.eot_id, 8192)
    assert len(hf) == ours.vocab_size == 128256
    assert {hf.convert_tokens_to_ids(name) for name in ours.special_tokens} == set(range(128000, 128256))
    assert set(hf.all_special_tokens) >= {"<|begin_of_text|>", "<|eot_id|>"}


# The whole export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_vocab_checkpoint(tmp_path_factory):
    cfg = dataclasses.replace(PRESETS["tiny-3.2"], vocab_size=128256, bos_id=128000, eos_id=128001)
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "ckpt", cfg, random_params(cfg),
                           tokenizer_path=default_tokenizer_path())


@pytest.mark.parametrize("base", [False, True])
def test_to_hf_writes_a_tokenizer_that_autotokenizer_loads(tmp_path, capsys, ours, real_vocab_checkpoint, base):
    dst = tmp_path / "hf"
    assert main(["to-hf", str(real_vocab_checkpoint), str(dst), "--quiet", *(["--base"] if base else [])]) == 0
    assert capsys.readouterr().err == ""
    assert {TOKENIZER_JSON, TOKENIZER_CONFIG, "original"} <= {p.name for p in dst.iterdir()}
    hf = transformers.AutoTokenizer.from_pretrained(dst)
    text = TEXTS["english"] + TEXTS["code"]
    assert hf(text)["input_ids"] == ours.encode(text, bos=True, eos=False)
    assert hf.apply_chat_template(DIALOGS["system_user"], add_generation_prompt=True,
                                  return_dict=False) == ours.encode_dialog(DIALOGS["system_user"])
    assert hf.eos_token_id == (ours.eos_id if base else ours.eot_id)
    assert hf.model_max_length == PRESETS["tiny-3.2"].max_seq_len
    generation = transformers.GenerationConfig.from_pretrained(dst)
    assert generation.eos_token_id == (ours.eos_id if base else [ours.eos_id, ours.eom_id, ours.eot_id])


def test_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path, capsys):
    cfg = PRESETS["tiny-3.2"]  # vocab_size 512
    src = checkpoint.save(tmp_path / "ckpt", cfg, random_params(cfg), tokenizer_path=default_tokenizer_path())
    assert main(["to-hf", str(src), str(tmp_path / "hf"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {src}/tokenizer.model: 128256 tokens do not fit the model's vocab_size 512 "
                   f"({src}/config.json)\n")
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_checkpoint_without_tokenizer_gets_no_tokenizer_files(tmp_path):
    cfg = PRESETS["tiny-3.2"]
    src = checkpoint.save(tmp_path / "ckpt", cfg, random_params(cfg))
    assert main(["to-hf", str(src), str(tmp_path / "hf"), "--quiet"]) == 0
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "config.json" in names and not names & {TOKENIZER_JSON, TOKENIZER_CONFIG, "original"}
