"""HFTokenizer against transformers' AutoTokenizer on a SmolLM2-style model directory (byte-level BPE
trained here, ChatML template): the same ids for text and chat, the same text back, and one-line
errors for files the `tokenizers` library or jinja cannot use."""

import json
import shutil

import pytest
import transformers

from llama_jax.hf_tokenizer import CHAT_TEMPLATE_FILE, GENERATION_CONFIG, TOKENIZER_CONFIG, HFTokenizer
from llama_jax.tokenizer import load_tokenizer, tokenizer_files
from tests.hf_chat_model import CHATML_TEMPLATE
from tests.reference import random_unicode_texts
from tests.test_tokenizer import TEXTS as TOKENIZER_TEXTS

# tokenizers cannot take a lone surrogate.
TEXTS = {name: text for name, text in TOKENIZER_TEXTS.items() if name != "lone_surrogate"} | {
    "long_spaces": "a" + " " * 1000 + "b\n" + "\t" * 300 + "\n" * 200 + "  end   ",
    "specials": "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "specials_glued": "x<|im_end|>y  <|im_start|><|im_start|>",
    "special_lookalike": "<|im_end| > <|im_start |> <|endoftext",
}
DIALOGS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Hi! Count to 3.\n"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Now in 日本語, please 🙏 <|im_end|>"},
    ],
}


@pytest.fixture(scope="module")
def ours(hf_chat_model):
    return HFTokenizer(hf_chat_model / "tokenizer.json")


@pytest.fixture(scope="module")
def theirs(hf_chat_model):
    return transformers.AutoTokenizer.from_pretrained(hf_chat_model)


def variant(hf_chat_model, tmp_path, config_edit=None, generation_edit=None):
    """A copy of the model's tokenizer files with tokenizer_config / generation_config edited."""
    for name in tokenizer_files(hf_chat_model / "tokenizer.json"):
        shutil.copyfile(hf_chat_model / name, tmp_path / name)
    for name, edit in ((TOKENIZER_CONFIG, config_edit), (GENERATION_CONFIG, generation_edit)):
        if edit is not None:
            path = tmp_path / name
            path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return tmp_path / "tokenizer.json"


@pytest.mark.parametrize("name", TEXTS)
def test_encode_and_decode_match_autotokenizer(ours, theirs, name):
    text = TEXTS[name]
    ids = ours.encode(text, bos=True, eos=False)
    assert ids == theirs(text)["input_ids"]
    assert ours.encode(text, bos=False, eos=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text, bos=False, eos=True) == ids + [ours.eos_id]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False) == text


def test_random_unicode_matches_autotokenizer(ours, theirs):
    for text in random_unicode_texts(seed=3, count=300, extra=("<|im_start|>", "<|im_end|>")):
        assert ours.encode(text, bos=True, eos=False) == theirs(text)["input_ids"], text


def test_special_ids_and_vocab(ours, theirs):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert dict(ours.special_tokens) == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert ours.vocab_size == len(theirs)


def test_decoding_a_cut_character_gives_the_replacement_character(ours):
    ids = ours.encode("日", bos=False, eos=False)
    assert len(ids) > 1 and ours.decode(ids[:1]).endswith("\ufffd")


def test_decode_out_of_vocab_raises(ours):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])


@pytest.mark.parametrize("name", DIALOGS)
def test_encode_dialog_matches_apply_chat_template(ours, theirs, name):
    expected = theirs.apply_chat_template(DIALOGS[name], add_generation_prompt=True, return_dict=False)
    assert ours.encode_dialog(DIALOGS[name]) == expected
    assert ours.decode(expected).endswith("<|im_start|>assistant\n")


def test_chat_template_from_chat_template_jinja(hf_chat_model, tmp_path, ours):
    """transformers >= 4.43 saves the template as chat_template.jinja, which wins over tokenizer_config."""
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": "{{ raise_exception('x') }}"})
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(CHATML_TEMPLATE)
    assert HFTokenizer(path).encode_dialog(DIALOGS["multi_turn"]) == ours.encode_dialog(DIALOGS["multi_turn"])
    assert CHAT_TEMPLATE_FILE in tokenizer_files(path)


def test_named_templates_use_the_default_one(hf_chat_model, tmp_path, ours):
    named = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
             {"name": "default", "template": CHATML_TEMPLATE}]
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": named})
    assert HFTokenizer(path).encode_dialog(DIALOGS["user"]) == ours.encode_dialog(DIALOGS["user"])


def test_generation_tags_render_their_body(hf_chat_model, tmp_path, ours):
    tagged = CHATML_TEMPLATE.replace("{{'<|im_start|>' + message['role']",
                                     "{% generation %}{{'<|im_start|>' + message['role']").replace(
        "+ '\n'}}{% endfor %}", "+ '\n'}}{% endgeneration %}{% endfor %}")
    assert tagged.count("generation %}") == 2
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": tagged})
    assert HFTokenizer(path).encode_dialog(DIALOGS["multi_turn"]) == ours.encode_dialog(DIALOGS["multi_turn"])


def test_stop_tokens_include_the_templates_end_of_turn(hf_chat_model, tmp_path):
    """With eos <|endoftext|> everywhere in the config, <|im_end|> still ends a reply: the template
    writes it after an assistant message."""
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "eos_token": "<|endoftext|>"},
                   generation_edit=lambda g: {**g, "eos_token_id": [0]})
    tokenizer = HFTokenizer(path)
    assert tokenizer.eos_id == 0 and tokenizer.stop_tokens == (0, 2)


def test_stop_tokens_of_a_template_without_an_end_token(hf_chat_model, tmp_path):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": plain})
    assert HFTokenizer(path).stop_tokens == (2,)


def test_template_variables_are_the_special_token_names(hf_chat_model, tmp_path, theirs):
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": template})
    ids = HFTokenizer(path).encode_dialog(DIALOGS["user"])
    assert ids == theirs.apply_chat_template(DIALOGS["user"], chat_template=template, add_generation_prompt=True,
                                             return_dict=False)
    assert ids[0] == 1 and ids[-1] == 2


def test_load_tokenizer_opens_a_directory_or_its_tokenizer_json(hf_chat_model):
    for path in (hf_chat_model, hf_chat_model / "tokenizer.json"):
        assert isinstance(load_tokenizer(path), HFTokenizer)


def test_unreadable_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ValueError, match=f"{path}: the tokenizers library cannot read it"):
        load_tokenizer(path)


def test_template_that_does_not_parse(hf_chat_model, tmp_path):
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": "{% for m in messages %}"})
    with pytest.raises(ValueError, match="the chat template does not parse"):
        HFTokenizer(path)


def test_template_that_raises_when_rendered(hf_chat_model, tmp_path):
    """A template that cannot render a user / assistant exchange fails when loaded (so convert
    refuses it); one that refuses a particular dialog fails encode_dialog with its message."""
    refuse_all = "{{ raise_exception('no chat here') }}"
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": refuse_all})
    with pytest.raises(ValueError, match="chat template .* failed: no chat here"):
        HFTokenizer(path)
    refuse_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                     "{% endif %}" + CHATML_TEMPLATE)
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": refuse_system})
    tokenizer = HFTokenizer(path)
    with pytest.raises(ValueError, match="failed: System role not supported"):
        tokenizer.encode_dialog(DIALOGS["system_user"])


def test_template_cannot_escape_the_sandbox(hf_chat_model, tmp_path):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": escape})
    with pytest.raises(ValueError, match="chat template .* failed: .*unsafe"):
        HFTokenizer(path)


def test_no_chat_template(hf_chat_model, tmp_path):
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {k: v for k, v in c.items() if k != "chat_template"})
    tokenizer = HFTokenizer(path)
    assert tokenizer.stop_tokens == (2,)
    with pytest.raises(ValueError, match="has no chat template"):
        tokenizer.encode_dialog(DIALOGS["user"])


def test_training_weights_are_transformers_assistant_masks(ours, theirs):
    """Weights on the assistant turns, as transformers' return_assistant_tokens_mask gives them for
    the same template with {% generation %} around each assistant turn's content and end."""
    tagged = (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endif %}{% endfor %}")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, naïve 日本語 🙂"}, {"role": "user", "content": "More"},
            {"role": "assistant", "content": " 1 2 3\n\n"}]
    expected = theirs.apply_chat_template(chat, chat_template=tagged, return_assistant_tokens_mask=True,
                                          return_dict=True)
    ids, weights = ours.encode_dialog_for_training(chat)
    assert ids == expected["input_ids"]
    assert weights == [float(m) for m in expected["assistant_masks"]]
    weighted = ours.decode([i for i, w in zip(ids, weights) if w])
    assert weighted == "Hello, naïve 日本語 🙂<|im_end|>\n 1 2 3\n\n<|im_end|>\n"


def test_training_weights_need_a_template_that_extends_its_earlier_turns(hf_chat_model, tmp_path):
    """A template that renders earlier turns differently once later ones follow (here: the last
    assistant turn alone keeps its text) gives no assistant spans to weight: refused."""
    rewriting = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                 "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
                 "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
    path = variant(hf_chat_model, tmp_path, config_edit=lambda c: {**c, "chat_template": rewriting})
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "No"}]
    with pytest.raises(ValueError, match="renders turn 1 differently once later turns follow"):
        HFTokenizer(path).encode_dialog_for_training(chat)
