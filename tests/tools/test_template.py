"""Tools with Hugging Face chat templates: a Hermes-style template (written here, ChatML with
<tool_call> blocks) renders tools and calls to transformers' apply_chat_template(..., tools=...) ids;
a template without tools gets our system message; grammars over that tokenizer's vocabulary give
outputs the parser reads into schema-valid calls."""

import json
import random

import jsonschema
import llguidance
import pytest
import transformers

from llama_jax.hf_tokenizer import HFTokenizer
from llama_jax.tools.definitions import ToolChoice, parse_tools
from llama_jax.tools.grammars import hermes_grammar, json_grammar
from llama_jax.tools.template import fallback_system_prompt, hf_call_syntax, template_call_syntax
from tests.hf_chat_model import CHATML_TEMPLATE
from tests.test_hf_tokenizer import variant
from tests.tools.common import RandomWalk, feed_tokens

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}You may call functions, defined in <tools></tools>:\n<tools>\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}</tools>\nCall one as <tool_call>\n{\"name\": <name>, \"arguments\": "
    "<arguments>}\n</tool_call><|im_end|>\n{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n"
    "{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}{%- if message.role == 'system' %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}\n{% endif %}{% for call in message.tool_calls %}<tool_call>\n"
    "{\"name\": \"{{ call.function.name }}\", \"arguments\": {% if call.function.arguments is string %}"
    "{{ call.function.arguments }}{% else %}{{ call.function.arguments | tojson }}{% endif %}}\n</tool_call>"
    "{% if not loop.last %}\n{% endif %}{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"],
    "additionalProperties": False}}},
         {"type": "function", "function": {"name": "now", "description": "The time"}}]
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "noon"},
]


@pytest.fixture(scope="module")
def hermes_dir(hf_chat_model, tmp_path_factory):
    return variant(hf_chat_model, tmp_path_factory.mktemp("hermes"),
                   config_edit=lambda c: {**c, "chat_template": HERMES_TEMPLATE}).parent


def test_call_syntax_is_read_off_the_template():
    assert template_call_syntax(HERMES_TEMPLATE) == "hermes"
    assert template_call_syntax(CHATML_TEMPLATE) is None
    assert template_call_syntax("{% if tools %}{{ '<|python_tag|>' }}{% endif %}") == "llama3_json"


@pytest.mark.parametrize("dialog", [DIALOG[:2], DIALOG], ids=["question", "calls_and_results"])
def test_hermes_template_renders_tools_as_apply_chat_template(hermes_dir, dialog):
    ours = HFTokenizer(hermes_dir / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(hermes_dir)
    expected = theirs.apply_chat_template(dialog, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    assert ours.encode_dialog(dialog, TOOLS) == expected
    assert "<tools>" in ours.render_chat(dialog, tools=TOOLS)


def test_template_without_tools_gets_our_system_message(hf_chat_model):
    ours = HFTokenizer(hf_chat_model / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_chat_model)
    rewritten = [
        {"role": "system", "content": fallback_system_prompt(parse_tools(TOOLS)) + "\n\nBe brief."},
        DIALOG[1],
        {"role": "assistant", "content": 'Checking.\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                         '{"name": "now", "arguments": {}}'},
        {"role": "user", "content": "Result of get_weather: 21 C"}, {"role": "user", "content": "Result of now: noon"}]
    expected = theirs.apply_chat_template(rewritten, add_generation_prompt=True, return_dict=False)
    assert ours.encode_dialog(DIALOG, TOOLS) == expected
    with pytest.raises(ValueError, match=r"messages\[3\]\.tool_call_id 'zz'"):
        ours.encode_dialog(DIALOG[:3] + [{"role": "tool", "tool_call_id": "zz", "content": "x"}], TOOLS)


class HFVocabulary:
    """What tests.tools.common needs of a tokenizer, for an HFTokenizer (token bytes from llguidance)."""

    def __init__(self, tokenizer: HFTokenizer, ll: llguidance.LLTokenizer):
        self._tokenizer, self._ll = tokenizer, ll
        self.vocab_size, self.special_tokens = tokenizer.vocab_size, tokenizer.special_tokens
        self.stop_tokens = tokenizer.stop_tokens
        names = {i: name for name, i in tokenizer.special_tokens.items()}
        self._bytes = [names[i].encode() if i in names else ll.decode_bytes([i]) for i in range(self.vocab_size)]

    def token_bytes(self, i):
        return self._bytes[i]

    def encode(self, text, bos, eos):
        return self._tokenizer.encode(text, bos=bos, eos=eos)

    def decode(self, ids):
        return self._tokenizer.decode(ids)


@pytest.mark.parametrize("template", ["hermes", "none"])
@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("required", "get_weather"), ToolChoice("auto")])
def test_hf_grammars_parse_into_valid_calls(hermes_dir, hf_chat_model, template, choice):
    directory = hermes_dir if template == "hermes" else hf_chat_model
    tokenizer = HFTokenizer(directory / "tokenizer.json")
    stops = list(tokenizer.stop_tokens)
    ll = llguidance.LLTokenizer(str(directory / "tokenizer.json"), eos_token=stops)
    vocabulary = HFVocabulary(tokenizer, ll)
    walk = RandomWalk(vocabulary, ll, stops)
    tools = parse_tools(TOOLS)
    make = hermes_grammar if template == "hermes" else json_grammar
    grammar = make(tools, choice)
    assert llguidance.LLMatcher.validate_grammar(grammar, ll) == ""
    syntax = hf_call_syntax(tokenizer.chat_template, tools)
    call = "<tool_call>" if template == "hermes" else "{"
    starts = [[], tokenizer.encode(call, bos=False, eos=False),
              tokenizer.encode("Let me see. " + call, bos=False, eos=False)]
    kinds = set()
    for seed in range(6):
        ids = walk(grammar, random.Random(seed), first=starts[seed % 3])
        turn, _ = feed_tokens(syntax, vocabulary, ids, seed)
        if choice.mode == "auto" and not turn.tool_calls:
            assert turn.content == tokenizer.decode(ids[:-1]).strip()
            kinds.add("text")
            continue
        assert turn.tool_calls and turn.finish_reason == "tool_calls"
        if template == "hermes" and choice.mode == "auto" and seed % 3 == 2:
            assert turn.content == "Let me see."  # the text before the lazy trigger
            kinds.add("text then call")
        elif template == "none" or choice.mode != "auto":
            assert turn.content is None
        for call in turn.tool_calls:
            assert choice.function in (None, call["function"]["name"])
            tool = next(t for t in tools if t.name == call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]), tool.call_schema())
        kinds.add("call")
    assert "call" in kinds and (choice.mode != "auto" or "text" in kinds)
    assert "text then call" in kinds or not (template == "hermes" and choice.mode == "auto")


def test_tool_calling_with_an_hf_tokenizer(hermes_dir, hf_chat_model):
    from llama_jax.tools.request import tool_calling
    from llama_jax.tools.syntaxes import HermesCalls, JsonCalls

    hermes = HFTokenizer(hermes_dir / "tokenizer.json")
    calling = tool_calling(hermes, TOOLS, "auto")
    assert calling.tool_format == "hermes" and isinstance(calling.syntax, HermesCalls)
    assert "<|im_end|>" in calling.end_tokens and "head[lazy]" in calling.grammar
    theirs = transformers.AutoTokenizer.from_pretrained(hermes_dir)
    assert calling.encode_dialog(hermes, DIALOG) == theirs.apply_chat_template(
        DIALOG, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    parser = calling.parser()
    parser.feed('Sure.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    parser.feed_special("<|im_end|>")
    turn = parser.finish()
    assert (turn.content, turn.tool_calls[0]["function"], turn.end_token) == (
        "Sure.", {"name": "now", "arguments": "{}"}, "<|im_end|>")
    plain = tool_calling(HFTokenizer(hf_chat_model / "tokenizer.json"), TOOLS, "required")
    assert plain.tool_format == "json" and isinstance(plain.syntax, JsonCalls) and '"arguments"' in plain.grammar
