"""Text in, text out: prompts through the tokenizer and the engine, streamed back as complete text.

    result = generate(cfg, params, tokenizer, ["The capital of France is"], max_new_tokens=32,
                      temperature=0)
    result.texts[0], result.token_ids[0], result.finish_reasons[0]
    generate(..., json_schema={"type": "object", ...})            # answers valid by construction

    chat = Chat(tokenizer, system="Be brief.", tools=[WEATHER])   # OpenAI tool definitions
    turn = chat.reply(Conversation(cfg, params), "Weather in Paris?")
    turn.tool_calls  # [{"id", "type": "function", "function": {"name", "arguments"}}]
    chat.tool_result(turn.tool_calls[0]["id"], '{"temp_c": 21}'); chat.reply(conversation)

Structured outputs (json_schema, response_format, grammar) and tools take the server's definitions
and defaults (llama_jax/infer/structured.py, llama_jax/tools/turn.py: the same code).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence

from llama_jax.config import LlamaConfig
from llama_jax.infer import tokens as token_generation
from llama_jax.infer.structured import grammar_compiler, output_grammar
from llama_jax.infer.weights import decode_params
from llama_jax.infer.sampling import SamplingParams
from llama_jax.tools.parser import ContentDelta
from llama_jax.tools.turn import TurnReader, turn_grammar

# A token that ends inside a multi-byte UTF-8 character decodes to this replacement character.
_INCOMPLETE = "\ufffd"


class TextStream:
    """Incremental detokenizer: push token ids, get back only text whose characters are complete.

    The ids since the last emitted piece are decoded together; while they end in a partial UTF-8
    character (decoded as U+FFFD) nothing is emitted. They are decoded after the ids of the piece
    before, and only the text they add is emitted: a sentencepiece-style decoder drops the space
    a token starts with at the start of a text ("▁world" alone is "world"). Concatenated pieces plus
    `flush()` equal `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pending: list[int] = []
        self._before: list[int] = []  # the ids of the last emitted piece

    def _added_text(self) -> str:
        before = self.tokenizer.decode(self._before) if self._before else ""
        text = self.tokenizer.decode(self._before + self._pending)
        return text[len(before):] if text.startswith(before) else self.tokenizer.decode(self._pending)

    def push(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._added_text()
        if text.endswith(_INCOMPLETE):
            return ""
        self._before, self._pending = self._pending, []
        return text

    def flush(self) -> str:
        """The held-back rest (a character the stream ended inside decodes as U+FFFD)."""
        text = self._added_text() if self._pending else ""
        self._before, self._pending = [], []
        return text


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]  # the generated ids, without the stop token
    finish_reason: str  # "stop": a stop token came; "length": the token limit or the context end


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Text is encoded with bos (a plain completion); a sequence of ids (a dialog) passes as is."""
    return [tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompts]


def check_tokenizer(cfg: LlamaConfig, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} token ids but the model's vocabulary has "
                         f"{cfg.vocab_size}: they do not belong together")


def iter_completions(cfg: LlamaConfig, params, tokenizer, prompts: Sequence[str | Sequence[int]], *,
                     max_new_tokens: int = 256, temperature: float = 0.6, top_p: float = 0.9, top_k: int = 0,
                     seed: int = 0, batch_size: int | None = None, mesh=None, truncate: bool = False,
                     on_text: Callable[[int, str], None] | None = None, n: int = 1, json_schema=None,
                     response_format: Mapping | None = None, grammar=None,
                     special_text: Mapping[int, str] | None = None, speculative=None, counters=None,
                     **penalties) -> Iterator[tuple[int, Completion]]:
    """(index, Completion) as each completion finishes; `on_text(index, piece)` streams the text. The
    index of prompt p's sample i (of n) is p * n + i. json_schema / response_format / grammar: what
    every answer follows (structured.output_grammar). special_text: token ids streamed to on_text as
    this text instead of theirs (a tool-call reader's stand-in for <|python_tag|>). penalties:
    SamplingParams' presence_penalty, frequency_penalty, repetition_penalty, logit_bias, min_tokens.
    speculative, counters: tokens.stream_tokens' (speculative decoding; the engine's counters)."""
    check_tokenizer(cfg, tokenizer)
    constraint = output_grammar(tokenizer, cfg.vocab_size, json_schema=json_schema, response_format=response_format,
                                grammar=grammar)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, n=n, grammar=constraint, **penalties)
    cfg, params = decode_params(cfg, params, mesh)
    events = token_generation.stream_tokens(cfg, params, encode_prompts(tokenizer, prompts), max_new_tokens=max_new_tokens,
                                  sampling=sampling, stop_ids=tokenizer.stop_tokens, seed=seed,
                                  batch_size=batch_size, mesh=mesh, truncate=truncate, speculative=speculative,
                                  counters=counters)
    yield from _completions(events, tokenizer, on_text, n, special_text)


def _completions(events, tokenizer, on_text, n: int = 1, special_text=None) -> Iterator[tuple[int, Completion]]:
    """TokenEvents -> (prompt index * n + sample, Completion) as each finishes, streaming text to on_text
    (a token in special_text as its text there, after what came before it)."""
    special_text = special_text or {}
    running: dict[int, tuple[list[int], TextStream]] = {}  # completion index -> (its new ids, its text stream)
    for event in events:
        index = event.index * n + event.sample
        ids, stream = running.setdefault(index, ([], TextStream(tokenizer)))
        if event.finish_reason is None:
            ids.append(event.token)
            if on_text is None:
                piece = ""
            elif event.token in special_text:
                piece = stream.flush() + special_text[event.token]
            else:
                piece = stream.push(event.token)
        else:
            piece = stream.flush() if on_text is not None else ""
        if piece:
            on_text(index, piece)
        if event.finish_reason is not None:
            del running[index]
            # The streamed pieces concatenate to this same text (TextStream's invariant).
            yield index, Completion(tokenizer.decode(ids), ids, event.finish_reason)


def generate(cfg: LlamaConfig, params, tokenizer, prompts: Sequence[str | Sequence[int]], *,
             max_new_tokens: int = 256, temperature: float = 0.6, top_p: float = 0.9, top_k: int = 0,
             seed: int = 0, batch_size: int | None = None, mesh=None, truncate: bool = False,
             on_text: Callable[[int, str], None] | None = None, n: int = 1, json_schema=None,
             response_format: Mapping | None = None, grammar=None, speculative=None,
             **penalties) -> GenerationResult:
    """Complete every prompt (text, encoded with bos; or a list of token ids, e.g. a dialog).

    temperature 0 is greedy; otherwise top-k (0: off) then top-p sampling, reproducible for a seed
    and independent of batch_size. Generation stops at the tokenizer's stop tokens, after
    `max_new_tokens`, or at the end of the model's context. n: completions per prompt (the prompt
    prefilled once), prompt p's sample i at index p * n + i of the result's lists. penalties:
    SamplingParams' presence_penalty, frequency_penalty, repetition_penalty, logit_bias, min_tokens.

    At most one of json_schema (a dict, compiled strictly as the server compiles one), response_format
    (OpenAI's: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}}) and
    grammar (a CompiledGrammar from structured.grammar_compiler(tokenizer, cfg.vocab_size)): every
    answer follows it, ending ("stop") as soon as it is complete; an answer that runs out of tokens
    first is "length" (and not valid).

    speculative: a speculation.SpeculativeConfig (prompt lookup, or a draft model with the same
    tokenizer, draft.load_draft): several tokens per step where the guesses hold, the same tokens for
    greedy and the same distribution when sampling.

    Computes in cfg.dtype with the params as given: from `llama_jax.load`, float32 on a CPU backend
    unless a dtype was named there (config.compute_dtype, the infer CLI's rule too).
    """
    done = dict(iter_completions(cfg, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 batch_size=batch_size, mesh=mesh, truncate=truncate, on_text=on_text, n=n,
                                 json_schema=json_schema, response_format=response_format, grammar=grammar,
                                 speculative=speculative, **penalties))
    ordered = [done[i] for i in range(len(prompts) * n)]
    return GenerationResult([c.text for c in ordered], [c.token_ids for c in ordered],
                            [c.finish_reason for c in ordered])


def reply(conversation: token_generation.Conversation, tokenizer, prompt_ids: Sequence[int], *, max_new_tokens: int = 256,
          temperature: float = 0.6, top_p: float = 0.9, top_k: int = 0, seed: int = 0,
          on_text: Callable[[int, str], None] | None = None, json_schema=None, response_format: Mapping | None = None,
          grammar=None, special_text: Mapping[int, str] | None = None, **penalties) -> Completion:
    """Complete `prompt_ids` (a whole dialog) in a Conversation: only the tokens after what its cache
    already holds from earlier turns are prefilled. Same tokens as `generate` on the same ids.
    json_schema, response_format, grammar, penalties: as generate's; special_text: as iter_completions'."""
    constraint = output_grammar(tokenizer, conversation.cfg.vocab_size, json_schema=json_schema,
                                response_format=response_format, grammar=grammar)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, grammar=constraint, **penalties)
    events = conversation.stream(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                 stop_ids=tokenizer.stop_tokens, seed=seed)
    (_, completion), = _completions(events, tokenizer, on_text, special_text=special_text)
    return completion


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    """An assistant turn as OpenAI returns it, and what the model generated for it."""

    content: str | None  # None when the turn only calls tools
    tool_calls: list[dict]  # [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]
    finish_reason: str  # "stop", "tool_calls" or "length" (the token limit or the context's end came first)
    completion: Completion  # the raw text and ids (a call's syntax, <|python_tag|> included)

    def message(self) -> dict:
        """The assistant message for the dialog: the calls whose arguments are a whole JSON object (a
        call cut by the token limit is left out), else the content (the raw text if there is none),
        so the next turn's prompt renders."""
        calls = self.complete_calls()
        if calls:
            return {"role": "assistant", "content": self.content, "tool_calls": calls}
        return {"role": "assistant", "content": self.content if self.content is not None else self.completion.text}

    def complete_calls(self) -> list[dict]:
        """The tool calls whose arguments parse as a JSON object."""
        def complete(call) -> bool:
            try:
                return isinstance(json.loads(call["function"]["arguments"]), dict)
            except ValueError:
                return False

        return [call for call in self.tool_calls if complete(call)]


class Chat:
    """A dialog: its messages so far, the tools the assistant may call, and the prompt ids of its next
    turn. tools: OpenAI tool definitions; tool_choice "auto" (the default with tools), "none",
    "required" or {"type": "function", "function": {"name": ...}}; parallel_tool_calls: several calls
    in one turn; tool_format: Llama 3's call syntax, "json" (3.1 / 3.3) or "pythonic" (3.2); an HF
    tokenizer's chat template defines its own. Bad tools are one-line ValueErrors, as the server's 400s.
    """

    def __init__(self, tokenizer, system: str | None = None, *, tools: Sequence[Mapping] | None = None,
                 tool_choice=None, parallel_tool_calls: bool = True, tool_format: str = "json"):
        self.tokenizer = tokenizer
        self.messages: list[dict] = [] if not system else [{"role": "system", "content": system}]
        self.calling = None  # a tools.request.ToolCalling when tools are given
        if tools is not None or tool_choice is not None:
            from llama_jax.tools.request import tool_calling

            self.calling = tool_calling(tokenizer, tools, tool_choice, parallel_tool_calls=parallel_tool_calls,
                                        tool_format=tool_format)

    def prompt_ids(self) -> list[int]:
        """The dialog so far in the chat format, ending with the assistant's header."""
        if self.calling is not None:
            return self.calling.encode_dialog(self.tokenizer, self.messages)
        return self.tokenizer.encode_dialog(self.messages)

    def user_turn(self, text: str) -> list[int]:
        """Add the user's message; the ids to generate the assistant's answer from."""
        self.messages.append({"role": "user", "content": text})
        return self.prompt_ids()

    def assistant_turn(self, turn: str | ChatTurn) -> None:
        self.messages.append(turn.message() if isinstance(turn, ChatTurn) else {"role": "assistant", "content": turn})

    def pending_calls(self) -> list[dict]:
        """The last assistant turn's calls that no tool message answers yet, in order."""
        answered = set()
        for message in reversed(self.messages):
            if message["role"] == "assistant":
                return [c for c in message.get("tool_calls") or () if c["id"] not in answered]
            if message["role"] == "tool":
                answered.add(message.get("tool_call_id"))
        return []

    def tool_result(self, content: str, tool_call_id: str | None = None) -> None:
        """A tool's result (text, e.g. JSON) for the call `tool_call_id` (default: the first call of
        the last turn without one)."""
        pending = self.pending_calls()
        if tool_call_id is None:
            if not pending:
                raise ValueError("no tool call waits for a result")
            tool_call_id = pending[0]["id"]
        elif tool_call_id not in {c["id"] for c in pending}:
            raise ValueError(f"tool_call_id {tool_call_id!r} names no call of the last turn waiting for a result")
        self.messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": content})

    def reply(self, model, message: str | None = None, *, on_text: Callable[[str], None] | None = None,
              json_schema=None, response_format: Mapping | None = None, truncate: bool = False,
              **options) -> ChatTurn:
        """The assistant's next turn, added to the dialog: after `message` (a user turn) if given,
        else after the dialog as it stands (e.g. the tool results).

        model: a tokens.Conversation (its cache kept between turns), or a load_for_inference model
        (each turn generated afresh; `truncate` keeps the ends of a dialog too long for the context).
        With tools, decoding follows the call syntax (llama_jax/tools/turn.py, the server's code) and
        the text is read into content and tool_calls; json_schema / response_format constrain the
        answer otherwise (not both with tools that may be called: a ValueError). on_text(piece): the
        content as it streams (a call's text is in tool_calls, not here). options: generate's
        max_new_tokens, temperature, top_p, top_k, seed and penalties (not n: one turn). The dialog
        is left as it was if generation fails (e.g. tokens.PromptTooLongError).
        """
        cfg = model.cfg
        if json_schema is not None:
            if response_format is not None:
                raise ValueError("pass json_schema or response_format, not both")
            response_format = {"type": "json_schema", "json_schema": {"schema": json_schema}}
        grammar = turn_grammar(lambda: grammar_compiler(self.tokenizer, cfg.vocab_size), self.calling,
                               response_format)
        reader = TurnReader(self.tokenizer, self.calling)

        def read(_, piece: str) -> None:
            for event in reader.feed(piece):
                if isinstance(event, ContentDelta) and on_text is not None:
                    on_text(event.text)

        before = len(self.messages)
        try:
            if message is not None:
                self.messages.append({"role": "user", "content": message})
            ids = self.prompt_ids()
            kwargs = dict(on_text=read, grammar=grammar, special_text=reader.special_text, **options)
            if isinstance(model, token_generation.Conversation):
                if truncate:
                    raise ValueError("a Conversation keeps its cache and cannot truncate: pass the model instead")
                completion = reply(model, self.tokenizer, ids, **kwargs)
            else:
                (_, completion), = iter_completions(cfg, model.params, self.tokenizer, [ids],
                                                    mesh=getattr(model, "mesh", None), truncate=truncate, **kwargs)
        except BaseException:
            del self.messages[before:]
            raise
        parsed = reader.finish(completion.finish_reason)
        if on_text is not None:
            for event in parsed.events:
                if isinstance(event, ContentDelta):
                    on_text(event.text)
        turn = ChatTurn(parsed.content, parsed.tool_calls, parsed.finish_reason, completion)
        self.assistant_turn(turn)
        return turn


__all__ = ["generate", "iter_completions", "reply", "GenerationResult", "Completion", "TextStream", "Chat",
           "ChatTurn", "encode_prompts", "check_tokenizer"]
