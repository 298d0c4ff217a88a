"""Llama tokenizers: Llama 3 (tiktoken BPE + header/eot chat format) and Llama 2 (sentencepiece).

Both give the ids Meta's reference code gives (llama-models for Llama 3, meta-llama/llama for
Llama 2) and share one interface, which `hf_tokenizer.HFTokenizer` (any other model's tokenizer.json)
shares too: `encode(text, bos, eos)`, `decode(ids)`, `encode_dialog(messages)`, `bos_id`, `eos_id`,
`pad_id`, `stop_tokens`, `vocab_size`, `special_tokens`. `load_tokenizer` picks the class from the
file's contents.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
import re
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import tiktoken

from llama_jax.hf_tokenizer import TOKENIZER_JSON, HFTokenizer, hf_tokenizer_files
from llama_jax.tools.llama3 import Turn, llama3_turns, message_turn
from llama_jax.vocab import check_token_ids

# Meta's pre-tokenizer split: case-insensitive contractions, letter runs with one leading
# non-letter, digits in groups of at most 3, punctuation runs, newline runs, other whitespace.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
# Named special tokens in Meta's order; ids are n_base_tokens + position (128000.. for the real
# file). The rest of the 256 are `<|reserved_special_token_{2+i}|>`. `<|image|>` (Llama 3.2
# vision) takes the slot older Llama 3 releases called reserved_special_token_2; llama-models
# names it so, and its chat format looks it up, so we do the same.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)

# tiktoken's Rust core panics on very long inputs and is quadratic on long single pieces, so
# Meta encodes 400k-character chunks, each cut so no run of whitespace / non-whitespace exceeds
# 25k characters. The cut points change the ids, so they are part of the tokenizer's definition.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# Chat roles -> header text. Meta's "tool" role is spelled "ipython" in the header.
LLAMA3_HEADER_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "ipython",
    "ipython": "ipython",
}

# Llama 2 chat markup, from meta-llama/llama `generation.py`.
LLAMA2_B_INST, LLAMA2_E_INST = "[INST]", "[/INST]"
LLAMA2_B_SYS, LLAMA2_E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_SPECIAL_TAGS = (LLAMA2_B_INST, LLAMA2_E_INST, "<<SYS>>", "<</SYS>>")

_RANKS_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?")
_RUN = re.compile(r"\s+|\S+")  # Python's \s is exactly str.isspace, which Meta's split uses.


def _require_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy / jax arrays
    check_token_ids(ids, vocab_size, "cannot decode: token id")
    return ids


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads `<base64 token> <rank>` lines. Unlike Meta's reader, a bad line is an error, not a warning."""
    path = _require_file(path)
    not_ranks = f"{path} is not a tiktoken ranks file (lines of '<base64 token> <rank>')"
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{not_ranks}: it is binary") from None
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{not_ranks}: line {lineno} is {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"{not_ranks}: it has no token lines")
    # Special tokens are numbered right after the base tokens, so ranks must be exactly 0..n-1.
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"{path}: ranks of its {len(ranks)} distinct tokens are not exactly 0..{len(ranks) - 1}")
    return ranks


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cuts `text` so no piece holds more than `max_run` consecutive whitespace or non-whitespace.

    Same cut points as Meta's `_split_whitespaces_or_nonwhitespaces` (a cut every `max_run`
    characters into each run, counted from the run's start), but found with a regex in C rather
    than a Python loop per character.
    """
    start = 0
    for m in _RUN.finditer(text):
        run_start, run_end = m.span()
        for cut in range(run_start + max_run, run_end, max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Llama3Tokenizer:
    """Meta's Llama 3 tokenizer: tiktoken BPE over `tokenizer.model`, plus 256 special tokens."""

    def __init__(self, path: str | os.PathLike):
        self.path = _require_file(path)
        ranks = read_tiktoken_ranks(self.path)
        reserved = (
            f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))
        )
        names = LLAMA3_NAMED_SPECIAL_TOKENS + tuple(reserved)
        self._special = {name: len(ranks) + i for i, name in enumerate(names)}
        self._vocab_size = len(ranks) + len(names)
        self._model = tiktoken.Encoding(
            name=os.path.basename(self.path),
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self._special,
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return types.MappingProxyType(self._special)

    @property
    def bos_id(self) -> int:
        return self._special["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self._special["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        return self._special["<|eot_id|>"]

    @property
    def eom_id(self) -> int:
        return self._special["<|eom_id|>"]

    @property
    def python_tag_id(self) -> int:
        return self._special["<|python_tag|>"]

    @property
    def pad_id(self) -> int:
        return self._special["<|finetune_right_pad_id|>"]

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        # eom ends a tool-call turn (the caller runs the tool and continues), eot ends a turn.
        return (self.eos_id, self.eom_id, self.eot_id)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Ids of `text`; special-token strings inside it are encoded as plain text, as Meta does."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i : i + MAX_ENCODE_CHARS]):
                # encode_ordinary == Meta's encode(allowed_special=set(), disallowed_special=()).
                ids.extend(self._model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids decode to their names, broken UTF-8 to U+FFFD (as Meta)."""
        return self._model.decode(_check_ids(ids, self._vocab_size))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a character, for some); a special token's name."""
        return self._model.decode_single_token_bytes(_check_ids([token_id], self._vocab_size)[0])

    def encode_header(self, role: str) -> list[int]:
        if role not in LLAMA3_HEADER_ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(LLAMA3_HEADER_ROLES)}")
        return [
            self._special["<|start_header_id|>"],
            *self.encode(LLAMA3_HEADER_ROLES[role], bos=False, eos=False),
            self._special["<|end_header_id|>"],
            *self.encode("\n\n", bos=False, eos=False),
        ]

    def encode_turn(self, turn: Turn) -> list[int]:
        """Header, <|python_tag|> if the turn starts with one, text (not stripped, as llama-models), end token."""
        tag = [self.python_tag_id] if turn.python_tag else []
        return self.encode_header(turn.role) + tag + self.encode(turn.text, bos=False, eos=False) + [
            self._special[turn.end]]

    def encode_message(self, message: Mapping, tool_format: str = "json") -> list[int]:
        """One message as llama-models' ChatFormat encodes it: an assistant message's tool_calls in Meta's
        call syntax (`tools.llama3.message_turn`), ending in eom when it awaits a built-in tool's result
        (or says `"stop_reason": "end_of_message"`); the OpenAI `tool` role is Meta's `ipython`."""
        return self.encode_turn(message_turn(message, tool_format))

    def encode_dialog(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None, *,
                      tool_format: str = "json", tools_in: str = "user", today: str | None = None) -> list[int]:
        """bos, every message, then an open assistant header for the model to complete. `tools` (OpenAI
        definitions) are rendered in Meta's `tool_format` ("json": Llama 3.1 / 3.3, "pythonic": 3.2),
        see `tools.llama3.llama3_turns`."""
        ids = [self.bos_id]
        for turn in llama3_turns(messages, tools, tool_format=tool_format, tools_in=tools_in, today=today):
            ids.extend(self.encode_turn(turn))
        return ids + self.encode_header("assistant")


class Llama2Tokenizer:
    """Meta's Llama 2 tokenizer: a sentencepiece model, with Meta's `[INST]` chat format."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece  # only Llama 2 needs it

        self.path = _require_file(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a sentencepiece model (no ModelProto parses from it)") from e
        n = self._sp.vocab_size()
        self._special = {
            self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)
        }

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return types.MappingProxyType(self._special)

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()  # -1 for Meta's Llama 2 model: it has no pad piece

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return ([self.bos_id] if bos else []) + self._sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_check_ids(ids, self.vocab_size))

    def encode_dialog(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Meta's Llama 2 `chat_completion` prompt.

        An optional system message is folded into the first user message inside <<SYS>> tags;
        then every (user, assistant) pair is `bos [INST] u [/INST] a eos` with contents stripped,
        and the final user message `bos [INST] u [/INST]`. Meta refuses to answer a dialog whose
        text contains its markup tags (the model cannot tell them from real turns); we refuse to
        encode one.
        """
        turns = [_role_and_content(m) for m in messages]
        for _, content in turns:
            for tag in LLAMA2_SPECIAL_TAGS:
                if tag in content:
                    raise ValueError(f"Llama 2 chat message contains the markup tag {tag!r}")
        if turns and turns[0][0] == "system":
            if len(turns) < 2:
                raise ValueError("Llama 2 dialog has a system message but no user message after it")
            (_, system), (role, content) = turns[0], turns[1]
            turns = [(role, LLAMA2_B_SYS + system + LLAMA2_E_SYS + content)] + turns[2:]
        roles = [role for role, _ in turns]
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
        if not turns or roles != expected or roles[-1] != "user":
            raise ValueError(
                f"Llama 2 dialog roles must be [system,] user, assistant, user, ..., user; got {roles}"
            )
        ids = []
        for (_, prompt), (_, answer) in zip(turns[::2], turns[1::2]):
            text = f"{LLAMA2_B_INST} {prompt.strip()} {LLAMA2_E_INST} {answer.strip()} "
            ids += self.encode(text, bos=True, eos=True)
        return ids + self.encode(f"{LLAMA2_B_INST} {turns[-1][1].strip()} {LLAMA2_E_INST}", bos=True, eos=False)


def _role_and_content(message: Mapping[str, str]) -> tuple[str, str]:
    try:
        role, content = message["role"], message["content"]
    except (KeyError, TypeError):
        raise ValueError(f"a chat message is a dict with 'role' and 'content', got {message!r}") from None
    if not isinstance(content, str):
        raise TypeError(f"chat message content must be a str, got {type(content).__name__}")
    return role, content


TOKENIZER_MODEL = "tokenizer.model"  # the Llama 3 / Llama 2 tokenizer's name in a checkpoint directory


def _is_json(head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


def find_tokenizer(directory: str | os.PathLike) -> str | None:
    """The tokenizer file a directory holds: tokenizer.model, else a Hugging Face tokenizer.json."""
    for name in (TOKENIZER_MODEL, TOKENIZER_JSON):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def tokenizer_files(path: str | os.PathLike) -> dict[str, str]:
    """Name in a checkpoint directory -> file, for every file the tokenizer at `path` is made of: a
    tokenizer.model alone, or an HF tokenizer.json with its tokenizer_config.json, chat_template.jinja
    and generation_config.json."""
    path = _require_file(path)
    with open(path, "rb") as f:
        if _is_json(f.read(64)):
            return {name: os.fspath(file) for name, file in hf_tokenizer_files(path).items()}
    return {TOKENIZER_MODEL: path}


def load_tokenizer(path: str | os.PathLike) -> Llama3Tokenizer | Llama2Tokenizer | HFTokenizer:
    """The tokenizer at `path`: Llama3Tokenizer for a tiktoken ranks file, Llama2Tokenizer for a
    sentencepiece model, HFTokenizer for a Hugging Face tokenizer.json (with its sibling files); a
    directory (a checkpoint) gives the tokenizer it holds (`find_tokenizer`)."""
    if os.path.isdir(path):
        found = find_tokenizer(path)
        if found is None:
            raise ValueError(f"{path} holds no tokenizer ({TOKENIZER_MODEL} or {TOKENIZER_JSON})")
        path = found
    path = _require_file(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    first_line = next((line for line in head.split(b"\n") if line.strip()), b"")
    if _RANKS_LINE.fullmatch(first_line):
        return Llama3Tokenizer(path)
    if _is_json(head):
        return HFTokenizer(path)
    # A sentencepiece ModelProto starts with field 1 (`pieces`, length-delimited): tag byte 0x0A.
    if head[:1] == b"\n":
        return Llama2Tokenizer(path)
    raise ValueError(
        f"{path} is neither a Llama 3 tokenizer (tiktoken '<base64 token> <rank>' lines), "
        f"a Llama 2 sentencepiece model, nor a Hugging Face tokenizer.json"
    )


# Where Meta's tokenizer comes from: the llama-models package, installed by this project's extra.
LLAMA3_EXTRA = 'pip install -e ".[llama3]"'
TOKENIZER_CHOICES = "'bytes', 'llama3', a tokenizer.model / tokenizer.json file, or a checkpoint directory"


def default_tokenizer_path() -> str:
    """The real Llama 3 `tokenizer.model` that the `llama_models` package ships. Not vendored here: it
    is Meta's file under Meta's license, so it comes with their package (the `llama3` extra)."""
    spec = importlib.util.find_spec("llama_models")
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(package_dir, "llama3", "tokenizer.model")
        if os.path.isfile(path):
            return path
    raise ValueError(f"Meta's Llama 3 tokenizer comes with the llama-models package, which is not installed: "
                     f"{LLAMA3_EXTRA} (or pip install llama-models), or pass a tokenizer file")


def write_byte_tokenizer(path: str | os.PathLike) -> str:
    """A Llama 3-format tokenizer file with the 256 bytes as its only base tokens.

    Read by `Llama3Tokenizer`, it gives 256 byte ids plus Meta's 256 special tokens (bos 256, eos 257,
    eot 265, ...): a 512-token vocabulary, small enough that a tiny model trains on CPU in minutes,
    with the real chat format and stop tokens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama_jax"


def resolve_tokenizer(choice: str, *, bytes_dir: str | os.PathLike | None = None) -> str:
    """The tokenizer file a `--tokenizer` value names, the same for train, data and infer: 'bytes' (the
    byte-level demo tokenizer, written to bytes_dir/tokenizer.model: a run's OUT, else the user's cache
    directory), 'llama3' (Meta's), a tokenizer file, or a checkpoint directory (the tokenizer it holds).
    Anything else is a ValueError of one line."""
    if choice == "llama3":
        return default_tokenizer_path()
    if choice == "bytes":
        directory = Path(bytes_dir) if bytes_dir is not None else _cache_dir() / "bytes"
        directory.mkdir(parents=True, exist_ok=True)
        # Written under a unique name, then renamed: processes (hosts on a shared OUT) never see half a file.
        fd, staging = tempfile.mkstemp(dir=directory, prefix=f".{TOKENIZER_MODEL}.")
        os.close(fd)
        os.replace(write_byte_tokenizer(staging), directory / TOKENIZER_MODEL)
        return str(directory / TOKENIZER_MODEL)
    if os.path.isdir(choice):
        found = find_tokenizer(choice)
        if found is None:
            raise ValueError(f"--tokenizer {choice}: the directory holds no {TOKENIZER_MODEL} or {TOKENIZER_JSON}")
        return found
    if not os.path.isfile(choice):
        raise ValueError(f"--tokenizer: no such file or directory: {choice} (expected {TOKENIZER_CHOICES})")
    return choice
