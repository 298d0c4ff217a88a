"""Grammar-constrained decoding in the engine: a random model's sampled answers follow a JSON schema
whatever its weights (the mask does it all), rows without a grammar in the same batch are untouched,
n samples each follow it, and max_tokens before the grammar completes ends with "length"."""

import json

import pytest

from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import RequestParams
from llama_jax.tokenizer import Llama3Tokenizer, write_byte_tokenizer
from tests.grammar.validator import errors

# Small, so that even a model that always picks white space where JSON allows it (up to 21 characters
# between tokens, llama_jax.grammar.compile) completes it within the tiny model's context in bytes.
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 4}, "ok": {"enum": [True, 7, "x"]}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}
PROMPT = [1, 40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return Llama3Tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("bytes") / "tokenizer.model"))


@pytest.fixture(scope="module")
def compiler(byte_tokenizer, tiny):
    from llama_jax.grammar import GrammarCompiler, grammar_vocabulary

    return GrammarCompiler(grammar_vocabulary(byte_tokenizer, vocab_size=tiny[0].vocab_size))


@pytest.fixture(scope="module")
def engine(tiny):
    cfg, params = tiny
    return BatchingEngine(cfg, params, max_batch=8, max_seq_len=256, page_size=16, decode_batches=[8],
                          chunk_shapes=[(2, 16)])


def run(engine, requests):
    """{(id, sample): (tokens, finish)} for {id: RequestParams} all added at once on PROMPT."""
    for request_id, params in requests.items():
        engine.add(request_id, PROMPT, params)
    out = {}
    while engine.has_work():
        for o in engine.step():
            tokens, _ = out.get((o.request_id, o.index), ([], None))
            out[(o.request_id, o.index)] = (tokens + [o.token_id], o.finish_reason)
    return out


def answer(tokenizer, tokens, stop_ids):
    return tokenizer.decode([t for t in tokens if t not in stop_ids])


def test_sampled_answers_follow_the_schema_and_free_rows_are_untouched(engine, compiler, byte_tokenizer):
    grammar = compiler.json_schema(SCHEMA)
    stops = tuple(byte_tokenizer.stop_tokens)
    free = RequestParams(max_tokens=12, temperature=1.0, seed=3, stop_token_ids=stops)
    alone = run(engine, {"free": free})
    constrained = {f"json{i}": RequestParams(max_tokens=248, temperature=1.0, seed=i, stop_token_ids=stops,
                                             grammar=grammar) for i in range(5)}
    together = run(engine, {"free": free, **constrained, "many": RequestParams(
        max_tokens=248, temperature=1.0, seed=11, stop_token_ids=stops, grammar=grammar, n=2)})
    assert together[("free", 0)] == alone[("free", 0)]  # a masked neighbour changes nothing of it
    answers = {key: value for key, value in together.items() if key[0] != "free"}
    assert len(answers) == 7
    for key, (tokens, finish) in answers.items():
        assert finish == "stop", (key, answer(byte_tokenizer, tokens, stops))
        value = json.loads(answer(byte_tokenizer, tokens, stops))
        assert not errors(value, SCHEMA), (key, value)
    assert together[("many", 0)] != together[("many", 1)]  # n samples, each with its own draws


def test_greedy_follows_the_schema_too(engine, compiler, byte_tokenizer):
    stops = tuple(byte_tokenizer.stop_tokens)
    out = run(engine, {"g": RequestParams(max_tokens=248, temperature=0.0, stop_token_ids=stops,
                                          grammar=compiler.json_schema(SCHEMA))})
    tokens, finish = out[("g", 0)]
    assert finish == "stop"
    assert not errors(json.loads(answer(byte_tokenizer, tokens, stops)), SCHEMA)


def test_max_tokens_before_the_grammar_completes_is_length_and_not_json(engine, compiler, byte_tokenizer):
    stops = tuple(byte_tokenizer.stop_tokens)
    out = run(engine, {"short": RequestParams(max_tokens=4, temperature=1.0, seed=0, stop_token_ids=stops,
                                              grammar=compiler.json_schema(SCHEMA))})
    tokens, finish = out[("short", 0)]
    assert finish == "length" and len(tokens) == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer(byte_tokenizer, tokens, stops))


def test_warm_up_compiles_the_grammar_step_so_no_request_waits_on_a_compile(tiny, compiler, byte_tokenizer):
    import jax

    cfg, params = tiny
    engine = BatchingEngine(cfg, params, max_batch=2, max_seq_len=256, page_size=16, decode_batches=[2],
                            chunk_shapes=[(2, 8)])  # shapes no other test compiles
    engine.warm_up(grammars=True)
    compiles = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        stops = tuple(byte_tokenizer.stop_tokens)
        engine.add("j", PROMPT, RequestParams(max_tokens=248, temperature=1.0, seed=1, stop_token_ids=stops,
                                              grammar=compiler.json_schema(SCHEMA)))
        engine.add("free", PROMPT, RequestParams(max_tokens=4, temperature=0.0))
        while engine.has_work():
            engine.step()
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles == []
