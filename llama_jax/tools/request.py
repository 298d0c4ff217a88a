"""A chat request's tool calling in one object: the checked tools and tool_choice, the prompt, the
grammar that constrains decoding (None when nothing is constrained) and a parser per output.

    calling = tool_calling(tokenizer, body["tools"], body.get("tool_choice"),
                           parallel_tool_calls=body.get("parallel_tool_calls", True))
    prompt = calling.encode_dialog(tokenizer, body["messages"])
    # decode with calling.grammar (llguidance Lark text) masking the tokens, and per output:
    parser = calling.parser()
    ...parser.feed(text) / parser.feed_special(name) per token..., turn = parser.finish()

The call syntax follows the tokenizer: Meta's Llama 3 tokenizer calls in Meta's JSON (3.1 / 3.3)
or pythonic (3.2) syntax, by `tool_format`; a Hugging Face tokenizer in the syntax its chat template
defines (`template.template_call_syntax`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from llama_jax.tools.definitions import CallIds, Tool, ToolChoice, parse_tool_choice, parse_tools
from llama_jax.tools.grammars import hermes_grammar, json_grammar, llama3_grammar
from llama_jax.tools.parser import END_TOKENS, ToolCallParser
from llama_jax.tools.syntaxes import llama3_syntax
from llama_jax.tools.template import HERMES, LLAMA3_JSON, hf_call_syntax, template_call_syntax


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    tools: tuple[Tool, ...]
    choice: ToolChoice
    parallel: bool
    tool_format: str  # "json" / "pythonic" (Llama 3), "hermes" / "llama3_json" / "json" (HF templates)
    syntax: object
    grammar: str | None
    end_tokens: tuple[str, ...]
    definitions: tuple = ()  # the request's tools as given (what an HF template receives)

    def parser(self, call_ids=None) -> ToolCallParser:
        """A parser for one output (call_ids: CallIds(seed) for reproducible ids)."""
        return ToolCallParser(self.syntax, call_ids or CallIds(), end_tokens=self.end_tokens)

    def encode_dialog(self, tokenizer, messages: Sequence[Mapping], **llama3_options) -> list[int]:
        """The prompt ids, the tools rendered as this format renders them (llama3_options: `today`,
        `tools_in` of Llama3Tokenizer.encode_dialog)."""
        if hasattr(tokenizer, "chat_template"):
            return tokenizer.encode_dialog(messages, list(self.definitions) or None)
        return tokenizer.encode_dialog(messages, self.tools or None, tool_format=self.tool_format, **llama3_options)


def tool_calling(tokenizer, tools: Sequence[Mapping] | None, tool_choice=None, *, parallel_tool_calls: bool = True,
                 tool_format: str = "json") -> ToolCalling:
    """The tool calling of a request to a model with this tokenizer (Llama3Tokenizer or HFTokenizer);
    one-line ValueErrors for bad tools, tool_choice or tool_format."""
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    if not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    callable_tools = parsed if choice.mode != "none" else ()  # "none": calls the model writes stay text
    if hasattr(tokenizer, "chat_template"):
        kind = template_call_syntax(tokenizer.chat_template) or "json"
        custom = tuple(t for t in parsed if not t.builtin) if kind == LLAMA3_JSON else parsed
        if kind == HERMES:
            grammar = hermes_grammar(parsed, choice, parallel=parallel_tool_calls)
        elif kind == LLAMA3_JSON:
            grammar = llama3_grammar(custom, choice, parallel=parallel_tool_calls)
        else:
            grammar = json_grammar(parsed, choice, parallel=parallel_tool_calls)
        return ToolCalling(parsed, choice, parallel_tool_calls, kind, hf_call_syntax(tokenizer.chat_template, callable_tools),
                           grammar, tuple(names[i] for i in tokenizer.stop_tokens if i in names), tuple(tools or ()))
    if not hasattr(tokenizer, "python_tag_id"):
        raise ValueError("tools need a Llama 3 tokenizer or a Hugging Face tokenizer with a chat template")
    if tool_format not in ("json", "pythonic"):
        raise ValueError(f"tool_format must be 'json' (Llama 3.1 / 3.3) or 'pythonic' (Llama 3.2), got {tool_format!r}")
    grammar = llama3_grammar(parsed, choice, tool_format=tool_format, parallel=parallel_tool_calls)
    return ToolCalling(parsed, choice, parallel_tool_calls, tool_format, llama3_syntax(callable_tools, tool_format), grammar,
                       END_TOKENS)
