"""Speculative decoding in the engine: greedy with prompt-lookup proposals equals greedy without, token
for token and in log-probabilities, for requests of mixed lengths arriving and finishing mid-run, with
n > 1 samples, the prefix cache and preemption under a tiny page pool, penalties and JSON schemas; on a
random model (proposals mostly rejected) and on a model made to repeat itself (mostly accepted).
Sampled tokens are distributed as the target model's (chi-square on a tiny vocabulary)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bench.speculative import next_tokens, repeating_params
from llama_jax import Llama, LlamaConfig
from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.speculation import SpeculativeConfig
from llama_jax.sharding import make_mesh
from tests.grammar.validator import errors
from tests.infer.common import random_params
from tests.infer.test_constrained import PROMPT as JSON_PROMPT, SCHEMA, answer, byte_tokenizer, compiler  # noqa: F401

# A pool of 12 pages of 8 tokens for 4 rows of up to 64: the requests below preempt one another.
SETTINGS = dict(max_batch=4, max_seq_len=64, page_size=8, num_pages=12, decode_batches=[4], chunk_shapes=[(2, 8)])
NGRAM = SpeculativeConfig("ngram", num_tokens=4)


@pytest.fixture(scope="module")
def models(tiny):
    cfg, params = tiny
    # The repeating model (bench/speculative.py's): greedy text going round cycles of 2 to 6 tokens.
    return {"random": params, "repeating": repeating_params(cfg, params)}


def run(engine, arrivals):
    """{(id, sample): (tokens, finish, logprobs)} and the steps taken, for arrivals {step: [(id, prompt,
    RequestParams)]}. (Engines of one shape share their compiled programs: a new one is cheap.)"""
    out, step = {}, 0
    while engine.has_work() or any(s >= step for s in arrivals):
        for request_id, prompt, request in arrivals.get(step, []):
            engine.add(request_id, prompt, request)
        for o in engine.step():
            tokens, finish, logprobs = out.get((o.request_id, o.index), ([], None, []))
            assert finish is None, f"a token after {o.request_id} finished"
            out[(o.request_id, o.index)] = (tokens + [o.token_id], o.finish_reason, logprobs + [o.logprob])
        step += 1
    return out, step


def prompt(n, start):
    return [1] + [(7 * i + start) % 500 + 2 for i in range(n - 1)]


def arrivals(stop_token):
    greedy = dict(temperature=0.0, logprobs=0)
    shared = prompt(20, 3)
    return {0: [("a", prompt(5, 0), RequestParams(30, **greedy)),
                ("b", shared + [9, 9], RequestParams(24, **greedy, stop_token_ids=(stop_token,)))],
            2: [("c", prompt(13, 50), RequestParams(40, **greedy, n=2))],
            5: [("d", shared + [11], RequestParams(17, **greedy)),  # its first pages from b's, cached
                ("e", prompt(3, 90), RequestParams(1, **greedy))]}


def assert_same(plain, speculated):
    assert plain.keys() == speculated.keys()
    for key, (tokens, finish, logprobs) in plain.items():
        assert speculated[key][:2] == (tokens, finish), key
        np.testing.assert_allclose(speculated[key][2], logprobs, atol=2e-5, err_msg=str(key))


@pytest.mark.parametrize("model", ["random", "repeating"])
def test_greedy_with_prompt_lookup_equals_greedy_without(tiny, models, model):
    cfg, _ = tiny
    plain, plain_steps = run(BatchingEngine(cfg, models[model], **SETTINGS), arrivals(stop_token=300))
    engine = BatchingEngine(cfg, models[model], **SETTINGS, speculative=NGRAM)
    speculated, steps = run(engine, arrivals(stop_token=300))
    assert_same(plain, speculated)
    proposed, accepted = engine.counters["proposed_tokens"], engine.counters["accepted_tokens"]
    assert engine.counters["cached_tokens"] > 0  # d found b's pages
    assert engine.counters["preemptions"] > 0 and engine.scheduler.allocator.used == 0
    if model == "repeating":
        generated = sum(len(tokens) for tokens, _, _ in plain.values())
        assert accepted > 0.8 * proposed and accepted > generated / 2, (proposed, accepted, generated)
        assert steps < 0.6 * plain_steps
    else:
        assert proposed > 0  # some proposals, rejected or not: the rows are verified either way


def test_penalties_and_biases_apply_at_every_verified_position(tiny, models):
    # The repeating model's next token beats the others by a wide margin; a frequency penalty on the
    # tokens it repeats overturns that after a few rounds, at a point that depends on the counts after
    # each accepted proposal: in a cycle of 2 a row's proposals repeat tokens, and a verified position
    # with the counts of the step's start gets it wrong.
    greedy = dict(temperature=0.0, logprobs=0)
    nxt = next_tokens(tiny[0].vocab_size)
    two = next(t for t in range(2, 500) if nxt[nxt[t]] == t)
    requests = {0: [(f"f{penalty}", prompt(9, 4) + [two], RequestParams(32, **greedy, frequency_penalty=penalty))
                    for penalty in (0.3, 0.6, 0.9)]
                + [("p", prompt(6, 8), RequestParams(10, **greedy, presence_penalty=1.5, repetition_penalty=1.3,
                                                     logit_bias={7: 2.0, 400: -50.0}, min_tokens=6,
                                                     stop_token_ids=(300,)))]}
    cfg, _ = tiny
    plain, _ = run(BatchingEngine(cfg, models["repeating"], **SETTINGS), requests)
    engine = BatchingEngine(cfg, models["repeating"], **SETTINGS, speculative=NGRAM)
    speculated, _ = run(engine, requests)
    assert_same(plain, speculated)
    assert engine.counters["accepted_tokens"] > 10
    assert all(len(set(plain[(f"f{p}", 0)][0])) > 2 for p in (0.3, 0.6, 0.9))  # the penalty broke the cycle


def test_json_schema_rows_are_verified_through_their_grammar(tiny, compiler, byte_tokenizer):
    cfg, params = tiny
    stops = tuple(byte_tokenizer.stop_tokens)
    grammar = compiler.json_schema(SCHEMA)
    requests = {0: [("g", JSON_PROMPT, RequestParams(240, temperature=0.0, logprobs=0, stop_token_ids=stops,
                                                     grammar=grammar)),
                    ("free", prompt(7, 1), RequestParams(40, temperature=0.0, logprobs=0))]}
    # test_constrained's engine shapes: its plain programs come from the run's compilation cache.
    settings = dict(max_batch=8, max_seq_len=256, page_size=16, decode_batches=[8], chunk_shapes=[(2, 16)])
    plain = run(BatchingEngine(cfg, params, **settings), requests)[0]
    engine = BatchingEngine(cfg, params, **settings, speculative=NGRAM)
    speculated = run(engine, requests)[0]
    assert_same(plain, speculated)
    assert engine.counters["accepted_tokens"] > 0
    value = json.loads(answer(byte_tokenizer, speculated[("g", 0)][0], stops))
    assert not errors(value, SCHEMA)
    sampled = {0: [(f"s{i}", JSON_PROMPT, RequestParams(240, temperature=1.0, seed=i, stop_token_ids=stops,
                                                        grammar=grammar)) for i in range(4)]}
    for tokens, finish, _ in run(engine, sampled)[0].values():
        assert finish == "stop" and not errors(json.loads(answer(byte_tokenizer, tokens, stops)), SCHEMA)


class FixedProposer:
    """Proposes the same tokens for every row (a test of the verification rule: whatever is proposed,
    the tokens out are distributed as the target's)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, seqs, ks):
        return [self.tokens[:k] for k in ks]


def test_sampled_tokens_are_distributed_as_the_target_model():
    V = 8
    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), vocab_size=V, n_layers=1, max_seq_len=16)
    params = jax.tree.map(lambda x: x * 20, random_params(cfg, 5))  # logits far from uniform
    ids = [1, 3, 5]
    forward = jax.jit(lambda tokens: jax.nn.softmax(Llama(cfg).apply({"params": params}, tokens)[0, -1]))
    first = np.asarray(forward(jnp.asarray([ids])), np.float64)
    second = np.stack([np.asarray(forward(jnp.asarray([ids + [t]])), np.float64) for t in range(V)])
    joint = first[:, None] * second  # p(t1, t2)
    proposal = [int(np.argmax(second.sum(0))), int(np.argmin(second.sum(0)))]  # often and rarely kept
    N, batch = 3072, 128
    engine = BatchingEngine(cfg, params, max_batch=batch, max_seq_len=16, page_size=4, decode_batches=[batch],
                            chunk_shapes=[(batch, 4)], prefix_caching=False, max_waiting=N,
                            speculative=SpeculativeConfig("ngram", num_tokens=2, adaptive=False),
                            proposer=FixedProposer(proposal))
    for i in range(N):
        engine.add(str(i), ids, RequestParams(4, temperature=1.0, seed=i))
    tokens = {}
    while engine.has_work():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).append(o.token_id)
    assert engine.counters["accepted_tokens"] > N / 4
    counts = np.zeros((V, V))
    for t in tokens.values():
        counts[t[0], t[1]] += 1
    expected = joint * N
    big = expected > 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, len(observed) - 1) > 1e-3, (counts, joint * N)


def test_a_draft_model_proposes_and_greedy_equals_greedy_without(tiny, models):
    cfg, params = tiny
    plain, plain_steps = run(BatchingEngine(cfg, params, **SETTINGS), arrivals(stop_token=300))
    for draft, most_accepted in ((params, True), (random_params(cfg, 1), False)):
        spec = SpeculativeConfig("draft", num_tokens=4, draft=(cfg, draft))
        engine = BatchingEngine(cfg, params, **SETTINGS, speculative=spec)
        speculated, steps = run(engine, arrivals(stop_token=300))
        assert_same(plain, speculated)
        proposed, accepted = engine.counters["proposed_tokens"], engine.counters["accepted_tokens"]
        if most_accepted:  # the target drafting for itself: every greedy guess is right
            assert accepted == proposed > 0 and steps < 0.6 * plain_steps, (proposed, accepted, steps, plain_steps)
        else:
            assert proposed > 0
        assert not engine.draft_engine.has_work() and engine.draft_engine.scheduler.allocator.used == 0


def test_a_mesh_verifies_as_one_device(tiny, models):
    cfg, _ = tiny
    mesh = make_mesh("dp2,tp2", jax.devices()[:4])  # the rows split over dp, the heads over tp
    requests = {0: [(f"r{i}", prompt(5 + 3 * i, 20 * i), RequestParams(20, temperature=0.0, logprobs=0))
                    for i in range(3)]}
    one = run(BatchingEngine(cfg, models["repeating"], **SETTINGS, speculative=NGRAM), requests)[0]
    engine = BatchingEngine(cfg, models["repeating"], mesh=mesh, **SETTINGS, speculative=NGRAM)
    assert_same(one, run(engine, requests)[0])
    assert engine.counters["accepted_tokens"] > 0
