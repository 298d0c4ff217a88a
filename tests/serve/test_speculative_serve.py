"""The server with speculative decoding (`--speculative draft`, the checkpoint drafting for itself so
every greedy guess holds): clients get what `generate` gives, streamed or not, JSON schemas included,
and /metrics counts the proposed and accepted tokens."""

import json

import httpx
import openai
import pytest

from llama_jax import checkpoint
from llama_jax.infer.text import generate
from llama_jax.serve.__main__ import build_parser, load_engine
from llama_jax.serve.app import create_app
from tests.serve.common import live_server
from tests.serve.test_real_engine import metric

MODEL = "tiny-llama3"


@pytest.fixture(scope="module")
def served(checkpoint_dir):
    args = build_parser().parse_args(["--checkpoint", str(checkpoint_dir), "--max-batch", "4", "--page-size", "8",
                                      "--speculative", "draft", "--draft-checkpoint", str(checkpoint_dir),
                                      "--num-speculative-tokens", "3"])
    engine, tokenizer = load_engine(args)
    cfg, params = checkpoint.load(checkpoint_dir)
    with live_server(create_app(engine, tokenizer, MODEL)) as url:
        yield url, lambda prompt, **kw: generate(cfg, params, tokenizer, [prompt], **kw).texts[0], engine


def test_greedy_text_equals_generate_and_metrics_count_the_guesses(served):
    url, alone, engine = served
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    prompt = "1, 2, 3, 1, 2, 3, 1, 2,"
    whole = api.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    streamed = "".join(c.choices[0].text for c in api.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                                                          temperature=0, stream=True))
    assert whole.choices[0].text == streamed == alone(prompt, max_new_tokens=16, temperature=0)
    assert whole.usage.completion_tokens == 16
    proposed = metric(url, "llama_jax_spec_decode_num_draft_tokens_total")
    accepted = metric(url, "llama_jax_spec_decode_num_accepted_tokens_total")
    assert proposed > 0 and accepted == proposed  # the checkpoint drafting for itself, greedily
    card = api.models.list().data[0]
    assert "speculative_decoding:draft" in card.model_extra["features"]


def test_json_schema_answers_follow_it(served):
    url, _, _ = served
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "A number?"}], "max_tokens": 40,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert reply["choices"][0]["finish_reason"] == "stop", reply
    assert isinstance(json.loads(reply["choices"][0]["message"]["content"])["n"], int)
