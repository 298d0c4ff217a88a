"""The OpenAI API's request and response bodies, with OpenAI's field names (pydantic v2).

Requests validate what this server can honour: a value it would have to ignore or could not
sample with (temperature 3, an empty stop string) is a 400, never silently changed. No field is
dropped: each is honoured; or one this server does not implement (NO_OPS: best_of, functions,
store, ...) accepted only with a value that asks for nothing (OpenAI's default, or null); or an identifier that never changes what is generated (user,
safety_identifier, prompt_cache_key); any other field, OpenAI's or not, is a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llama_jax.infer.requests import MAX_LOGPROBS  # the alternatives per token the engine reports at most

# OpenAI request fields this server does not implement, with the values that change nothing (what
# OpenAI does when the field is left out, or asks for without tools or a stored completion).
NO_OPS: dict[str, tuple] = {
    "best_of": (1,), "suffix": ("",),  # completions
    "functions": ([],), "function_call": ("none", "auto"),  # chat: the deprecated forms of tools and tool_choice
    "modalities": (["text"],), "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
}


def _valid_unicode(value):
    """`value`, each string in it checked: JSON can spell a lone UTF-16 surrogate ("\\ud800"), which
    no tokenizer or response can encode. A validator of a whole field, not of a union's member
    (whose error would come after the other members' type errors)."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                                 f"{e.start}") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # app.py answers an unknown field with a 400 naming it


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """The fields completions and chat completions share."""

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM's extension; 0 or -1: off")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, description="choices sampled from the prompt, prefilled once")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Identify the caller (OpenAI's abuse monitoring, prompt cache routing); they change no token.
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # {token id (a JSON key, so a string): bias in [-100, 100]}
    # vLLM's extensions.
    repetition_penalty: float | None = Field(None, gt=0, description="1: off; > 1 discourages prompt and output tokens")
    min_tokens: int | None = Field(None, ge=0, description="the stop tokens cannot end the output before this many")
    ignore_eos: bool = Field(False, description="generate through the stop tokens, up to max_tokens")

    @field_validator(*NO_OPS, check_fields=False)
    @classmethod
    def _no_op(cls, value, info: ValidationInfo):
        allowed = NO_OPS[info.field_name]
        if value is not None and value not in allowed:
            spelled = " or ".join(repr(v) for v in allowed)
            raise ValueError(f"{info.field_name} is not supported by this server: only {spelled} (which changes "
                             f"nothing) or null, got {value!r:.100}")
        return value

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return _valid_unicode(stop)

    @model_validator(mode="after")
    def _options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    # One prompt: a string or token ids; a list holding exactly one of those is accepted too.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: the echoed prompt alone (with echo), as OpenAI allows
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with echo: the prompt's tokens' too
    echo: bool = False
    best_of: Any = None  # NO_OPS
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return _valid_unicode(prompt)

    @model_validator(mode="after")
    def _zero_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (nothing would be returned)")
        return self

    @property
    def scores_prompt(self) -> bool:
        """Echo with logprobs: the prompt's tokens are scored too (what lm-eval's loglikelihood reads)."""
        return self.echo and self.logprobs is not None


class TextPart(_Request):
    type: Literal["text"]
    text: str  # checked by ChatMessage


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: str | list[TextPart] | None = None  # None: an assistant message that only calls tools
    tool_calls: list[dict[str, Any]] | None = None  # assistant: [{id, type: "function", function: {name, arguments}}]
    tool_call_id: str | None = None  # tool: the call this message answers

    @field_validator("content")
    @classmethod
    def _unicode(cls, content):
        if content is not None:
            _valid_unicode(content if isinstance(content, str) else [part.text for part in content])
        return content

    @model_validator(mode="after")
    def _fields_of_the_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message that calls tools "
                             f"may leave it out)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role}")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id belongs to tool messages, not {self.role}")
        return self

    @property
    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None  # checked by llama_jax.tools (a 400 naming the bad field)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (compiled by llama_jax.grammar)
    functions: Any = None  # NO_OPS
    function_call: Any = None
    modalities: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("pass max_tokens or max_completion_tokens, not both")
        return self

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, response_format):
        if response_format is not None and response_format.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got "
                             f"{response_format.get('type')!r:.60}")
        return response_format


class TokenizeRequest(_Request):
    """vLLM's POST /tokenize: a prompt, or chat messages in the chat format (which adds its own
    special tokens and the assistant's header: what /v1/chat/completions would feed the model)."""

    model: Text | None = None  # None: the served model
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # prompt: the BOS token (default true); messages: false only
    add_generation_prompt: bool = True  # messages only; the chat format always adds it
    continue_final_message: bool = False  # messages only; not supported

    @field_validator("messages")
    @classmethod
    def _prompt_or_messages(cls, messages, info: ValidationInfo):
        if messages is not None and info.data.get("prompt") is not None:
            raise ValueError("pass prompt or messages, not both")
        return messages

    @field_validator("add_special_tokens")
    @classmethod
    def _chat_adds_its_own(cls, add, info: ValidationInfo):
        if add and info.data.get("messages") is not None:
            raise ValueError("add_special_tokens must be false with messages: the chat format adds its own")
        return add

    @field_validator("add_generation_prompt")
    @classmethod
    def _generation_prompt(cls, add, info: ValidationInfo):
        if not add:
            raise ValueError("add_generation_prompt false is not supported: the chat format ends with the "
                             "assistant's header")
        return add

    @field_validator("continue_final_message")
    @classmethod
    def _no_continuation(cls, continue_final, info: ValidationInfo):
        if continue_final:
            raise ValueError("continue_final_message is not supported by this server")
        return continue_final

    @model_validator(mode="after")
    def _something_to_tokenize(self):
        if self.prompt is None and self.messages is None:
            raise ValueError("pass prompt (a string) or messages (a chat)")
        return self


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int]


# Responses.

class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """An echoed prompt's tokens first (with echo), its first token's logprob and top_logprobs null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # a stream's chunks carry none, except the last with include_usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object's text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A call's first delta has its id, type and name; the next ones add to its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _honoured(request: type[_Request]) -> list[str]:
    """A request's fields that change what is returned: all but those accepted as no-ops only."""
    return sorted(name for name in request.model_fields if name not in NO_OPS)


class ModelCard(BaseModel):
    """OpenAI's Model (id, object, created, owned_by) with what this server supports beside it:
    fields the openai client's Model keeps as extras, so its parsing is unchanged."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama_jax"
    root: str | None = None  # vLLM's: the served weights' name
    max_model_len: int
    max_logprobs: int = MAX_LOGPROBS
    endpoints: list[str] = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
    # Per endpoint, the request fields it takes (each value checked: one it cannot honour is a 400); an
    # OpenAI field missing here is accepted only with a value that asks for nothing (NO_OPS).
    parameters: dict[str, list[str]] = Field(default_factory=lambda: {
        "/v1/completions": _honoured(CompletionRequest), "/v1/chat/completions": _honoured(ChatCompletionRequest),
        "/tokenize": _honoured(TokenizeRequest), "/detokenize": _honoured(DetokenizeRequest)})
    features: list[str] = ["stream", "logprobs", "echo_logprobs"]  # echo_logprobs: the prompt's tokens scored


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
