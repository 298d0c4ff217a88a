"""Any Hugging Face tokenizer (tokenizer.json) behind the interface of our Llama tokenizers.

For Llama-architecture models whose tokenizer is not Llama 3's (SmolLM's GPT-2-style byte-level
BPE with ChatML, TinyLlama's sentencepiece-style BPE with Zephyr's format, ...). The files are
used as the model ships them:

    tokenizer.json          read by the `tokenizers` library (Rust), which gives transformers' ids
    tokenizer_config.json   bos / eos / pad token names, and the chat template
    chat_template.jinja     the chat template, where transformers >= 4.43 saves it instead
    generation_config.json  more ids generation stops at

The chat template is rendered with jinja2 the way transformers' `apply_chat_template` renders it
(sandboxed, trim_blocks, lstrip_blocks, raise_exception, strftime_now, the special-token names as
variables), then tokenized without adding special tokens again, so `encode_dialog` gives
`apply_chat_template(messages, add_generation_prompt=True)`'s ids.
"""

from __future__ import annotations

import datetime
import json
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

from llama_jax.vocab import check_token_ids

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
# The special-token names transformers hands a chat template as variables.
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Content of the probe turn whose rendering shows which token ends an assistant turn.
_PROBE = "Probe reply 7"


def hf_tokenizer_files(tokenizer_json: str | os.PathLike) -> dict[str, Path]:
    """Name in a checkpoint -> file: tokenizer.json and those of its siblings that exist."""
    path = Path(tokenizer_json)
    siblings = (TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, GENERATION_CONFIG)
    return {TOKENIZER_JSON: path} | {name: path.parent / name for name in siblings if (path.parent / name).is_file()}


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_name(value) -> str | None:
    """tokenizer_config's token entries are a string or a serialized AddedToken ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(directory: Path, config: dict) -> str | None:
    """chat_template.jinja when present (transformers reads it first), else tokenizer_config's
    chat_template: a string, or a list of named templates of which "default" is the chat one."""
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{directory / TOKENIZER_CONFIG}: chat_template lists templates "
                             f"{sorted(map(str, named))} but none named 'default'")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{directory / TOKENIZER_CONFIG}: chat_template is a {type(template).__name__}, not text")
    return template


def compile_chat_template(source: str, where: str):
    """The jinja2 Template transformers would compile from `source`; ValueError naming `where` if
    it does not parse."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training
        masks; rendering it is just its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: jinja's own tojson escapes HTML characters.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}: the chat template does not parse (line {e.lineno}: {_one_line(e)})") from None


class HFTokenizer:
    """A tokenizer.json with its tokenizer_config.json, served by the `tokenizers` library."""

    def __init__(self, path: str | os.PathLike):
        import tokenizers

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 (tokenizers raises bare Exception for every parse error)
            raise ValueError(f"{self.path}: the tokenizers library cannot read it ({_one_line(e)})") from None
        directory = self.path.parent
        config_path, generation_path = directory / TOKENIZER_CONFIG, directory / GENERATION_CONFIG
        config = _read_json(config_path) if config_path.is_file() else {}
        generation = _read_json(generation_path) if generation_path.is_file() else {}
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        names = {name: _token_name(config.get(name)) for name in TEMPLATE_TOKEN_NAMES}
        self._names = {name: token for name, token in names.items() if token is not None}
        # A name outside the vocabulary (transformers would add it as a new token) has no id here.
        ids = {name: self._tok.token_to_id(token) for name, token in self._names.items()}
        ids = {name: i for name, i in ids.items() if i is not None}
        self._bos_id = ids.get("bos_token", generation.get("bos_token_id"))
        generation_eos = generation.get("eos_token_id")
        generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        eos_ids = [i for i in (ids.get("eos_token"), *generation_eos) if isinstance(i, int)]
        self._eos_id = eos_ids[0] if eos_ids else None
        self._pad_id = ids.get("pad_token", -1)
        source = _chat_template_source(directory, config)
        self.chat_template = source  # its text: tools.template reads the call syntax off it
        self._template = None if source is None else compile_chat_template(source, str(directory))
        end_of_turn = self._end_of_turn_id() if self._template is not None else None
        self._stop_tokens = tuple(dict.fromkeys([*eos_ids, *([end_of_turn] if end_of_turn is not None else [])]))

    def _end_of_turn_id(self) -> int | None:
        """The token the template writes right after an assistant message (ChatML's <|im_end|>,
        Zephyr's </s>): the first non-blank token after the content, if it is an added token."""
        text = self.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
                                add_generation_prompt=False)
        at = text.rfind(_PROBE)
        if at < 0:
            return None
        added = self._tok.get_added_tokens_decoder()
        for i in self._tok.encode(text[at + len(_PROBE):], add_special_tokens=False).ids:
            if i in added:
                return i
            if self._tok.decode([i], skip_special_tokens=False).strip():
                return None
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return types.MappingProxyType(self._special)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id  # -1 when the tokenizer names no pad token, as Llama2Tokenizer

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """eos_token, generation_config's eos_token_id(s), and the template's end-of-turn token."""
        return self._stop_tokens

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Ids of `text` as transformers' `tokenizer(text)` gives them: special-token strings become
        their ids. bos: the tokens the tokenizer's post-processor adds around a text (a Llama 2 style
        <s>; none for GPT-2 style byte-level BPE), as `add_special_tokens=True`. eos: eos_id after."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=bos).ids
        if eos:
            if self._eos_id is None:
                raise ValueError(f"{self.path}: no eos token (tokenizer_config.json eos_token, or "
                                 f"generation_config.json eos_token_id) to end a text with")
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included; broken UTF-8 decodes to U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        check_token_ids(ids, self._vocab_size, "cannot decode: token id")
        return self._tok.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping] | None = None) -> str:
        """The chat template's text of `messages`; ValueError with the template's message if it raises.
        `tools` (OpenAI definitions) go to the template as transformers' `tools=` does, or, for a
        template that renders no tools, into a system message (`tools.template.chat_with_tools`)."""
        import jinja2

        from llama_jax.tools.template import chat_with_tools

        if self._template is None:
            raise ValueError(f"{self.path.parent} has no chat template ({TOKENIZER_CONFIG} chat_template or "
                             f"{CHAT_TEMPLATE_FILE}): chat needs a chat model's tokenizer")
        messages, tools = chat_with_tools(self.chat_template, messages, tools)
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._names)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise ValueError(f"the chat template of {self.path.parent} failed: {_one_line(e)}") from None

    def encode_dialog(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> list[int]:
        """`apply_chat_template(messages, tools=tools, add_generation_prompt=True)`: the rendered text,
        its special-token strings as their ids, no special tokens added around it."""
        return self._tok.encode(self.render_chat(messages, tools=tools), add_special_tokens=False).ids

    def encode_dialog_for_training(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[float]]:
        """The ids of the whole conversation as the template renders it (no generation prompt), and
        weight 1 on the tokens of each assistant turn (content and what the template writes after it,
        its end-of-turn token included), 0 elsewhere, as transformers' assistant masks do.

        A turn's text is what rendering the conversation up to it adds to the rendering of the turns
        before it with the generation prompt; so the template must render a conversation as an
        extension of its beginning, which chat templates do unless they rewrite earlier turns.
        """
        if not all(isinstance(m, Mapping) for m in messages):
            raise ValueError(f"a chat is a list of {{role, content}} dicts, got {list(messages)!r}")
        text = self.render_chat(messages, add_generation_prompt=False)
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render_chat(messages[:k], add_generation_prompt=True) if k else ""
            through = self.render_chat(messages[:k + 1], add_generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError(f"the chat template of {self.path.parent} renders turn {k} differently once later "
                                 f"turns follow, so its assistant tokens cannot be told apart for training")
            spans.append((len(before), len(through)))
        encoding = self._tok.encode(text, add_special_tokens=False)
        weights = [float(any(start < stop and begin < end for begin, stop in spans))
                   for start, end in encoding.offsets]
        return encoding.ids, weights
