"""Structured outputs and tool calls from Python and the infer CLI, on a random tiny model with the real
Llama 3 tokenizer: answers that follow a JSON schema whatever the weights (the grammar does it all),
a chat turn whose tool call parses and whose result feeds the next turn, and bad schema or tools
files refused in one line before the model loads."""

import io
import json
import sys

import pytest

from llama_jax import LlamaConfig, checkpoint, save
from llama_jax.infer import text
from llama_jax.infer.load import load_for_inference
from llama_jax.infer.structured import grammar_compiler
from llama_jax.infer.text import Chat, ChatTurn, Completion, generate
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path
from tests.grammar.validator import errors
from tests.infer.common import random_params, run_cli

# The Llama 3 tiny model with room for a tool prompt (~160 tokens) and a call after it.
CFG = LlamaConfig(vocab_size=128256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256,
                  dtype="float32")
# Bounded, so even a model that picks the most white space JSON allows completes it in the budget.
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}
BUDGET = 150  # new tokens: prompt + budget fall in one context bucket (256) for the API and the CLI alike
SAMPLED = ["--temperature", "1", "--max-new-tokens", BUDGET]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save(tmp_path_factory.mktemp("structured") / "ckpt", CFG, random_params(CFG, 1),
                tokenizer_path=default_tokenizer_path())


@pytest.fixture(scope="module")
def model(ckpt):
    return load_for_inference(ckpt)  # as the CLI loads it: API and CLI tests share compiled programs


def test_generate_follows_a_json_schema_and_the_compiler_is_kept(model):
    compiler = grammar_compiler(model.tokenizer, CFG.vocab_size)
    for seed in range(3):
        result = generate(model.cfg, model.params, model.tokenizer, ["A record:"], json_schema=SCHEMA,
                          temperature=1.0, max_new_tokens=BUDGET, seed=seed)
        assert result.finish_reasons == ["stop"]
        assert errors(json.loads(result.texts[0]), SCHEMA) == [], result.texts[0]
    # The server's response_format spelling is the same grammar; the schema was compiled once.
    same = generate(model.cfg, model.params, model.tokenizer, ["A record:"], temperature=1.0, max_new_tokens=BUDGET,
                    seed=2, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})
    assert same.texts == result.texts and compiler.misses == 1 and compiler.hits >= 3
    # A tokenizer loaded again shares the compiler (llguidance's vocabulary is built once a process).
    assert grammar_compiler(Llama3Tokenizer(model.tokenizer.path), CFG.vocab_size) is compiler
    digits = generate(model.cfg, model.params, model.tokenizer, ["Year:"], temperature=1.0, max_new_tokens=BUDGET,
                      grammar=compiler.regex(r"(19|20)[0-9]{2}"))
    assert len(digits.texts[0]) == 4 and digits.texts[0][:2] in ("19", "20")


def test_structured_arguments_are_checked_before_generating(model, tokenizer):
    run = lambda **kw: generate(model.cfg, model.params, model.tokenizer, ["x"], **kw)  # noqa: E731
    with pytest.raises(ValueError, match="pass one of json_schema, response_format and grammar, not json_schema "
                                         "and response_format"):
        run(json_schema=SCHEMA, response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="uniqueItems"):
        run(json_schema={"type": "array", "uniqueItems": True})
    with pytest.raises(ValueError, match="response_format.type"):
        run(response_format={"type": "xml"})
    with pytest.raises(ValueError, match="compiled for 128288 token ids, but the model has 128256"):
        run(grammar=grammar_compiler(tokenizer, 128288).json_object())
    chat = Chat(tokenizer, tools=[WEATHER])
    with pytest.raises(ValueError, match="response_format with tools is not supported"):
        chat.reply(model, "Hi", json_schema=SCHEMA)
    assert chat.messages == []  # the dialog is left as it was


def test_tool_results_answer_the_last_turns_calls_in_order(tokenizer):
    chat = Chat(tokenizer, tools=[WEATHER], tool_choice="required")
    with pytest.raises(ValueError, match="no tool call waits for a result"):
        chat.tool_result("21")
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}} for i, c in enumerate("AB")]
    chat.assistant_turn(ChatTurn(None, calls, "tool_calls", Completion("", [], "stop")))
    chat.tool_result("21")
    assert chat.pending_calls() == calls[1:] and chat.messages[-1]["tool_call_id"] == "call_0"
    with pytest.raises(ValueError, match="'call_0' names no call"):
        chat.tool_result("again", "call_0")
    # A call cut by the token limit is left out of the dialog; with no other, the text the model wrote stands.
    partial = {**calls[1], "function": {"name": "get_weather", "arguments": '{"ci'}}
    cut = ChatTurn(None, [calls[0], partial], "length", Completion("...", [], "length"))
    assert cut.message() == {"role": "assistant", "content": None, "tool_calls": calls[:1]}
    cut = ChatTurn(None, [partial], "length", Completion('{"name": "get_weather", "parameters": {"ci', [], "length"))
    assert cut.message() == {"role": "assistant", "content": cut.completion.text}
    with pytest.raises(ValueError, match="tool_choice 'required' needs tools"):
        Chat(tokenizer, tool_choice="required")


def test_cli_json_schema_prints_valid_json(capsys, tmp_path, ckpt, model):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    for seed in (3, 4):
        status, out, err = run_cli(capsys, "--checkpoint", ckpt, "--prompt", "A record:", "--json-schema",
                                   tmp_path / "schema.json", *SAMPLED, "--seed", seed)
        assert status == 0 and err == ""
        assert errors(json.loads(out), SCHEMA) == [], out


def test_cli_chat_calls_a_tool_and_reads_its_result(capsys, monkeypatch, tmp_path, ckpt, model, tokenizer):
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    prompts = []
    real = text.reply

    def spy(conversation, tok, prompt_ids, **kw):
        prompts.append(prompt_ids)
        return real(conversation, tok, prompt_ids, **kw)

    monkeypatch.setattr(text, "reply", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO('Weather in Paris?\ntool: {"temp_c": 21}\n'))
    status, out, err = run_cli(capsys, "--checkpoint", ckpt, "--chat", "--tools", tmp_path / "tools.json",
                               "--tool-choice", "get_weather", "--no-parallel-tool-calls", "--temperature", "1",
                               "--max-new-tokens", 80)
    assert status == 0 and err == "" and len(prompts) == 2, (out, err)
    first = out.splitlines()[0]
    assert first.startswith("tool call: get_weather {")
    arguments = json.loads(first.removeprefix("tool call: get_weather "))
    assert errors(arguments, WEATHER["function"]["parameters"]) == []
    # The second turn read the result in Llama 3's ipython role, after the call as the model made it.
    second = tokenizer.decode(prompts[1])
    assert second.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n{"temp_c": 21}<|eot_id|>'
                           '<|start_header_id|>assistant<|end_header_id|>\n\n')
    assert '"name": "get_weather"' in second


@pytest.mark.parametrize("argv, files, message", [
    (["--prompt", "x", "--json-schema", "{tmp}/none.json"], {}, "--json-schema {tmp}/none.json: no such file"),
    (["--prompt", "x", "--json-schema", "{tmp}/s.json"], {"s.json": "{not json"}, "s.json: not valid JSON"),
    (["--prompt", "x", "--json-schema", "{tmp}/s.json"], {"s.json": '{"type": "array", "uniqueItems": true}'},
     "--json-schema {tmp}/s.json: Unimplemented keys: [\"uniqueItems\"]"),
    (["--chat", "--tools", "{tmp}/t.json"], {"t.json": "[1,"}, "--tools {tmp}/t.json: not valid JSON"),
    (["--chat", "--tools", "{tmp}/t.json"], {"t.json": json.dumps([{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}])},
     "--tools {tmp}/t.json: tools[0].function.parameters must be a JSON schema of type 'object'"),
    (["--chat", "--tools", "{tmp}/t.json", "--tool-choice", "nope"], {"t.json": json.dumps([WEATHER])},
     "tool_choice.function.name 'nope' is not one of the tools ['get_weather']"),
    (["--chat", "--tools", "{tmp}/t.json", "--json-object"], {"t.json": json.dumps([WEATHER])},
     "--json-object with --tools: pass --tool-choice none"),
    (["--prompt", "x", "--tools", "{tmp}/t.json"], {"t.json": json.dumps([WEATHER])}, "--tools and --tool-choice "
                                                                                        "need --chat"),
])
def test_bad_schema_and_tools_files_are_one_line_before_the_model_loads(capsys, monkeypatch, tmp_path, ckpt, argv,
                                                                        files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    monkeypatch.setattr(checkpoint, "load", lambda *args, **kwargs: pytest.fail("the model loaded"))
    status, out, err = run_cli(capsys, "--checkpoint", ckpt, *[a.format(tmp=tmp_path) for a in argv])
    assert (status, out) == (1, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
