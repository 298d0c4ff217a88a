"""Our Llama 3 tokenizer (tiktoken ranks) -> the Hugging Face tokenizer files AutoTokenizer loads.

    tokenizer.json          byte-level BPE in the `tokenizers` library's format, 256 special tokens
    tokenizer_config.json   PreTrainedTokenizerFast, bos / eos, model_max_length, our chat format

Written with the stdlib alone: transformers and tokenizers are test dependencies, not ours. Only the
ranks file is read, never the weights.

Where the ids differ from `Llama3Tokenizer`'s, and no file can change it:
- HF turns special-token strings inside text ("<|eot_id|>") into their special ids, where Meta's
  `encode` keeps them text; `tokenizer(text, split_special_tokens=True)` gives Meta's ids. The
  chat template needs the default, since it writes its markup as those strings. (transformers'
  `apply_chat_template(..., sanitize_control_tokens=True)` keeps them text inside messages, but
  encodes the text on either side apart, so those ids can differ from `encode_dialog`'s too.)
- HF does not cut runs of over 25,000 whitespace or non-whitespace characters as Meta does.
- The chat template hands HF "\\n\\n" + content as one text, where `encode_dialog` encodes the two
  apart, so content that starts with a newline can get other ids ("\\nHi" does).
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_jax.hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON
from llama_jax.tokenizer import LLAMA3_HEADER_ROLES, LLAMA3_PAT_STR, Llama3Tokenizer, read_tiktoken_ranks

BOS, EOS, EOT, EOM = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"


def byte_level_alphabet() -> tuple[str, ...]:
    """GPT-2's `bytes_to_unicode`: the one printable character byte-level BPE spells each byte with.
    Printable Latin-1 bytes stand for themselves, the other 68 are chr(256), chr(257), ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(extra)) for b in range(256))


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, ordered by the rank of the token they make.

    tiktoken merges whichever adjacent pair concatenates to the lowest-ranked token, whatever the
    pair's split point; a BPE merge list names its pairs. Listing each token's every split (as
    transformers' TikTokenConverter does, giving the 280,147 merges of Meta's own Llama 3
    tokenizer.json) lets HF merge whatever pair tiktoken would. One merge per token is not enough:
    for 678 Llama 3 tokens, such as b'.:.:', BPE over the lower ranks stops at three parts (there
    b'.' b':.' b':'), so no single pair builds them. Splits of one token are ordered by the ranks
    of their left then right part, as that converter orders them, so the lists are identical.
    """
    keyed = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None:
                keyed.append((rank, left, right, cut, token))
    keyed.sort()
    return [(token[:cut], token[cut:]) for _, _, _, cut, token in keyed]


def tokenizer_json(tokenizer: Llama3Tokenizer) -> dict:
    """The `tokenizers` JSON of `tokenizer`: Meta's Llama 3 tokenizer.json layout (ignore_merges:
    a pre-token that is itself a token maps to it directly, as in tiktoken)."""
    ranks = read_tiktoken_ranks(tokenizer.path)
    as_chars = dict(enumerate(byte_level_alphabet()))

    def spell(token: bytes) -> str:
        return token.decode("latin-1").translate(as_chars)

    special = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for name, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    bos = [{"SpecialToken": {"id": BOS, "type_id": 0}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level},
        ]},
        # ByteLevel here only maps offsets back to characters; then bos in front, as HF's Llama 3.
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", **byte_level, "trim_offsets": False},
            {"type": "TemplateProcessing",
             "single": [*bos, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [*bos, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {BOS: {"id": BOS, "ids": [tokenizer.bos_id], "tokens": [BOS]}}},
        ]},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {spell(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])},
            # "a b" strings, which every tokenizers version reads; no byte-level token holds a space.
            "merges": [f"{spell(left)} {spell(right)}" for left, right in bpe_merges(ranks)],
        },
    }


def chat_template() -> str:
    """Jinja for `Llama3Tokenizer.encode_dialog`: bos, per message its header, "\\n\\n", content and
    eot (eom for an assistant turn with stop_reason "end_of_message"); with add_generation_prompt,
    an open assistant header. Unknown roles and non-str content raise, as encode_dialog does."""
    header = f"'{START_HEADER}' + roles[message['role']] + '{END_HEADER}\n\n'"
    return (
        f"{{%- set roles = {json.dumps(LLAMA3_HEADER_ROLES)} -%}}"
        f"{{{{- '{BOS}' -}}}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in roles -%}"
        f"{{{{- raise_exception('unknown chat role ' ~ message['role'] ~ '; expected one of "
        f"{', '.join(sorted(LLAMA3_HEADER_ROLES))}') -}}}}"
        "{%- endif -%}"
        "{%- if message['content'] is not string -%}"
        "{{- raise_exception('chat message content must be a str') -}}"
        "{%- endif -%}"
        f"{{{{- {header} + message['content'] -}}}}"
        "{%- if message['role'] == 'assistant' and message.get('stop_reason') == 'end_of_message' -%}"
        f"{{{{- '{EOM}' -}}}}"
        "{%- else -%}"
        f"{{{{- '{EOT}' -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        f"{{{{- '{START_HEADER}{LLAMA3_HEADER_ROLES['assistant']}{END_HEADER}\n\n' -}}}}"
        "{%- endif -%}"
    )


def tokenizer_config(*, max_seq_len: int, base: bool, pad_token: str | None = None) -> dict:
    """eos is what ends a reply: end_of_text for a base model, eot for an instruct one (as Meta's HF
    repos set it); generation_config.json lists every stop id either way. pad_token: a reward model's
    (export_hf.reward_pad_id), so that padded batches pad with the id its config names."""
    return {**({"pad_token": pad_token} if pad_token else {}),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS if base else EOT,
        "model_max_length": max_seq_len,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(),
    }


def write_hf_tokenizer(tokenizer: Llama3Tokenizer, directory: Path, *, max_seq_len: int, base: bool,
                       pad_token: str | None = None) -> None:
    """Write tokenizer.json and tokenizer_config.json of `tokenizer` into `directory`."""
    with open(directory / TOKENIZER_JSON, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(tokenizer), f, ensure_ascii=False, indent=2)
        f.write("\n")
    (directory / TOKENIZER_CONFIG).write_text(
        json.dumps(tokenizer_config(max_seq_len=max_seq_len, base=base, pad_token=pad_token), indent=2,
                   ensure_ascii=False) + "\n",
        encoding="utf-8")
