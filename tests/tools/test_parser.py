"""The incremental parser: each case fed whole, cut at every character, one character at a time and
one Llama 3 token at a time gives the same turn, its deltas joined are that turn, and Meta's own
model responses (prompt_format.md) parse to the calls llama-models' decoder reads from them."""

import codecs
import json
import re
from pathlib import Path

import pytest

from llama_jax import tokenizer as tok_lib
from llama_jax.tokenizer import Llama3Tokenizer
from llama_jax.tools.definitions import CallIds, parse_tools
from llama_jax.tools.parser import ArgumentsDelta, CallFinished, CallStarted, ContentDelta, ToolCallParser
from llama_jax.tools.syntaxes import HermesCalls, JsonCalls, PythonicCalls, llama3_syntax

SPECIAL = re.compile(r"(<\|python_tag\|>|<\|eom_id\|>|<\|eot_id\|>)")
JSON = JsonCalls(frozenset({"get_weather", "f"}), frozenset({"brave_search"}), True)
PYTHONIC = PythonicCalls(frozenset({"get_weather", "f"}), frozenset({"wolfram_alpha"}), False)
HERMES = HermesCalls(frozenset({"get_weather", "f"}))
W = '{"city": "Paris", "n": [1, {"a": "}"}]}'
# name: (syntax, generated text, expected content, expected [(name, arguments)])
CASES = {
    "json_call": (JSON, '{"name": "get_weather", "parameters": ' + W + "}<|eot_id|>", None, [("get_weather", W)]),
    "json_tagged_indented": (JSON, '<|python_tag|>{\n    "type": "function",\n    "name": "f",\n    "parameters": '
                             '{\n        "x": "1"\n    }\n}<|eom_id|>', None, [("f", '{\n        "x": "1"\n    }')]),
    "json_several": (JSON, ' {"name": "f", "parameters": {"x": 12}}; {"name": "get_weather", "arguments": {}}'
                     '{"parameters": {"k": null}, "name": "f"}', None,
                     [("f", '{"x": 12}'), ("get_weather", "{}"), ("f", '{"k": null}')]),
    "json_text": (JSON, "Hello, {\"name\": \"f\"} is how I call.\n", 'Hello, {"name": "f"} is how I call.', []),
    "json_unknown_tool_is_text": (JSON, '{"name": "nope", "parameters": {}} ok', '{"name": "nope", "parameters": {}} ok',
                                  []),
    # sglang#35562: JSON at the start of a text answer is content, not deleted.
    "leading_json_kept": (JSON, '{"a": 1, "b": [2]} is a JSON object.', '{"a": 1, "b": [2]} is a JSON object.', []),
    "json_text_after_call": (JSON, '{"name": "f", "parameters": {}} Done.', "Done.", [("f", "{}")]),
    "json_truncated": (JSON, '{"name": "f", "parameters": {"x": "unfinis', None, [("f", '{"x": "unfinis')]),
    "brave": (JSON, '<|python_tag|>brave_search.call(query="gold \\"1oz\\" price")<|eom_id|>', None,
              [("brave_search", '{"query": "gold \\"1oz\\" price"}')]),
    "code": (JSON, '<|python_tag|>def f():\n    return "\\n"\nprint(f())<|eom_id|>', None,
             [("code_interpreter", json.dumps({"code": 'def f():\n    return "\\n"\nprint(f())'}, ensure_ascii=False))]),
    "code_like_a_builtin_prefix": (JSON, "<|python_tag|>brave = 1", None,
                                   [("code_interpreter", '{"code": "brave = 1"}')]),
    "python_tag_in_plain_text": (JSON, "Write <|python_tag|> then code", "Write <|python_tag|> then code", []),
    "pythonic": (PYTHONIC, "[get_weather(city='San Francisco', n=3), f(a=True, b=None, c=[1, 'x'], d={\"k\": -1.5})]",
                 None, [("get_weather", '{"city": "San Francisco", "n": 3}'),
                        ("f", '{"a": true, "b": null, "c": [1, "x"], "d": {"k": -1.5}}')]),
    "pythonic_tagged_empty_args": (PYTHONIC, "<|python_tag|>[f()]<|eot_id|>", None, [("f", "{}")]),
    "pythonic_text": (PYTHONIC, "The list [a, b] (and [f]) ", "The list [a, b] (and [f])", []),
    "pythonic_unknown_is_text": (PYTHONIC, "[g(a=1)]", "[g(a=1)]", []),
    "wolfram": (PYTHONIC, '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>', None,
                [("wolfram_alpha", '{"query": "100th decimal of pi"}')]),
    "hermes": (HERMES, 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": "</tool_call>"}}\n</tool_call>\n'
               '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', "Let me check.",
               [("f", '{"a": "</tool_call>"}'), ("get_weather", "{}")]),
    "hermes_leading_json_kept": (HERMES, '{"x": 1} first.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
                                 '{"x": 1} first.', [("f", "{}")]),
    "hermes_lookalikes": (HERMES, "a <tool_ca b <tool_call>x</tool_call> <tool_", "a <tool_ca b <tool_call>x</tool_call> <tool_",
                          []),
    "empty": (JSON, "", "", []),
}


@pytest.fixture(scope="module")
def tokenizer():
    return Llama3Tokenizer(tok_lib.default_tokenizer_path())


def pieces_of(text: str, cut) -> list[tuple[str, bool]]:
    """(piece, is special token) in order, text segments cut by `cut`."""
    out = []
    for segment in SPECIAL.split(text):
        if SPECIAL.fullmatch(segment):
            out.append((segment, True))
        elif segment:
            out += [(piece, False) for piece in cut(segment)]
    return out


def run(syntax, pieces):
    parser = ToolCallParser(syntax, CallIds(7))
    events = []
    for piece, special in pieces:
        events += parser.feed_special(piece) if special else parser.feed(piece)
    turn = parser.finish()
    return turn, events + turn.events


def check_events(turn, events):
    """Content deltas joined are the content; each call starts once, its argument deltas joined are its
    arguments, and it finishes once, after them."""
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == (turn.content or "")
    for index, call in enumerate(turn.tool_calls):
        mine = [e for e in events if getattr(e, "index", None) == index]
        assert mine[0] == CallStarted(index, call["id"], call["function"]["name"])
        assert mine[-1] == CallFinished(index) and mine.count(CallFinished(index)) == 1
        assert "".join(e.text for e in mine if isinstance(e, ArgumentsDelta)) == call["function"]["arguments"]


@pytest.mark.parametrize("name", CASES)
def test_every_split_gives_the_same_turn(tokenizer, name):
    syntax, text, content, calls = CASES[name]
    whole, events = run(syntax, pieces_of(text, lambda s: [s]))
    assert whole.content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls] == calls
    assert whole.finish_reason == ("tool_calls" if calls else "stop")
    ids = CallIds(7)
    assert [c["id"] for c in whole.tool_calls] == [ids() for _ in calls]
    check_events(whole, events)
    result = (whole.content, whole.tool_calls)

    def by_token(segment):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return [decoder.decode(tokenizer.token_bytes(t)) for t in tokenizer.encode(segment, bos=False, eos=False)]

    splits = [lambda s: list(s), by_token] + [lambda s, k=k: [s[:k], s[k:]] for k in range(1, len(text))]
    for cut in splits:
        turn, events = run(syntax, pieces_of(text, cut))
        assert (turn.content, turn.tool_calls) == result
        check_events(turn, events)


def test_call_ids_are_deterministic_under_a_seed_and_differ_without():
    assert CallIds(3)() == CallIds(3)() != CallIds(4)()
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", CallIds()()) and CallIds()() != CallIds()()


def model_responses(relative: str) -> list[str]:
    chat_format = pytest.importorskip("llama_models.llama3.chat_format")
    text = (Path(chat_format.__file__).parents[1] / relative).read_text()
    return re.findall(r"##### Model Response Format\n```\n(.*?)\n```", text, re.S)


def test_metas_model_responses_parse_as_metas_decoder_reads_them(tokenizer):
    """Every tool call among the responses in Meta's prompt_format.md files: the calls llama-models'
    ChatFormat.decode_assistant_message_from_content reads (its first call; ours are all of them)."""
    chat_format = pytest.importorskip("llama_models.llama3.chat_format")
    meta_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
    datatypes = pytest.importorskip("llama_models.datatypes")
    decoder = chat_format.ChatFormat(meta_tokenizer.Tokenizer(Path(tok_lib.default_tokenizer_path())))
    tools = parse_tools([{"type": "function", "function": {"name": n}} for n in
                         ("trending_songs", "get_weather", "get_user_info", "brave_search", "wolfram_alpha",
                          "code_interpreter")])
    seen = 0
    for relative, tool_format in (("llama3_1/prompt_format.md", "json"), ("llama3_2/text_prompt_format.md", "pythonic")):
        for response in model_responses(relative):
            meta = decoder.decode_assistant_message_from_content(response, datatypes.StopReason.end_of_turn)
            if not meta.tool_calls or "<function=" in response:
                continue
            turn, _ = run(llama3_syntax(tools, tool_format), pieces_of(response, lambda s: [s]))
            name = meta.tool_calls[0].tool_name
            first = turn.tool_calls[0]["function"]
            assert first["name"] == getattr(name, "value", name)
            assert json.loads(first["arguments"]) == meta.tool_calls[0].arguments
            assert turn.content is None and turn.end_token in ("<|eom_id|>", "<|eot_id|>")
            seen += 1
    assert seen == 6


def test_a_json_answer_streams_from_its_first_key():
    parser = ToolCallParser(JSON, CallIds(0))
    assert parser.feed('{"na') == [] and parser.feed('me": "') == []  # may still be a call
    assert [type(e) for e in parser.feed('f", "par')] == [CallStarted]
    answer = ToolCallParser(JSON, CallIds(0))
    assert answer.feed('{"result": [1, ') == [ContentDelta('{"result": [1,')]
    answer.feed("2]}")
    assert answer.finish().content == '{"result": [1, 2]}'
