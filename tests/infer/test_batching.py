"""The continuous-batching engine under load against each prompt alone: greedy tokens against the
model's full forward pass (`greedy_reference`, one compiled forward per power-of-two length), sampled
ones against `stream_tokens` (whose tokens tests/infer/test_engine.py checks against that forward):
tokens of requests arriving over time, finish reasons, logprobs, aborts, page accounting, the prefix
cache, preemption under a tiny page budget, compile counts and meshes."""

import collections
import dataclasses

import jax
import jax.monitoring
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import Llama, LlamaConfig
from llama_jax.infer.engine import BatchingEngine, prefill_shapes, serving_shapes
from llama_jax.sharding import batch_split
from llama_jax.infer.requests import EngineFullError, RequestParams
from llama_jax.infer.tokens import stream_tokens
from llama_jax.infer.sampling import SamplingParams
from llama_jax.quantize import quantize_params
from llama_jax.sharding import make_mesh
from tests.infer.common import collect, greedy_reference, random_params

# Shared by most tests, so they share compiled programs: 4 slots, pages of 8 tokens, prompt chunks of
# 32 tokens (as 1x32, 2x16 or 4x8) riding with the decode rows.
SETTINGS = dict(max_batch=4, page_size=8, chunk_shapes=prefill_shapes(32, max_rows=4))
# The server's kind of chunk: one small shape, 2 rows of 8 tokens, a prompt spread over several steps and rows.
SMALL_CHUNK = dict(chunk_shapes=[(2, 8)])
GREEDY = dict(temperature=0.0)

_compiles = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: _compiles.update([kw.get("fun_name", "?")])
    if event == "/jax/core/compile/backend_compile_duration" else None)


def prompt(n, start):
    return [1] + [(start + i) % 500 + 2 for i in range(n - 1)]


def greedy(cfg, params, ids, max_tokens):
    """The tokens and finish reason of one greedy prompt alone, without stop tokens: the argmax of the
    full forward pass at each step (which takes int8 weights too)."""
    return greedy_reference(cfg, params, ids, max_tokens), "length"


def alone(cfg, params, ids, max_tokens, temperature, top_p, top_k, seed):
    """The tokens and finish reason of one sampled prompt generated alone (`stream_tokens`)."""
    sampling = SamplingParams(temperature, top_p, top_k)
    return collect(stream_tokens(cfg, params, [ids], max_new_tokens=max_tokens, sampling=sampling, seed=seed))[0]


def drain(engine, arrivals=None):
    """Step until no work is left, adding arrivals[step] before that step. Returns {id: [outputs]}
    and {id: (step of first output, step of last)}."""
    arrivals = arrivals or {}
    outputs, steps = collections.defaultdict(list), {}
    step = 0
    while engine.has_work() or step in arrivals:
        for request_id, ids, params in arrivals.pop(step, []):
            engine.add(request_id, ids, params)
        for out in engine.step():
            outputs[out.request_id].append(out)
            first = steps.get(out.request_id, (step, step))[0]
            steps[out.request_id] = (first, step)
        step += 1
    return dict(outputs), steps


def tokens_and_reason(outs):
    return [o.token_id for o in outs], outs[-1].finish_reason


def without_stop_token(outs):
    """The engine reports a stop token as the last output; `stream_tokens` does not return it."""
    tokens, reason = tokens_and_reason(outs)
    return (tokens[:-1] if reason == "stop" else tokens), reason


# Prompts of 3 to 70 tokens (the longest spans 3 chunks), outputs of 2 to 12 tokens, arriving
# over the first steps: more requests than slots, so some wait for a slot.
REQUESTS = [(f"r{i}", prompt(n, 37 * i), m, step) for i, (n, m, step) in
            enumerate([(3, 30, 0), (70, 6, 0), (20, 2, 0), (9, 10, 1), (33, 8, 3), (12, 5, 3), (5, 9, 8)])]


@pytest.mark.parametrize("layout", [{}, SMALL_CHUNK], ids=["prefill chunks", "small chunk"])
def test_greedy_requests_arriving_over_time_equal_each_prompt_alone(tiny, layout):
    cfg, params = tiny
    engine = BatchingEngine(cfg, params, **SETTINGS | layout)
    arrivals = collections.defaultdict(list)
    for request_id, ids, max_tokens, step in REQUESTS:
        arrivals[step].append((request_id, ids, RequestParams(max_tokens, **GREEDY)))
    outputs, steps = drain(engine, arrivals)
    for request_id, ids, max_tokens, _ in REQUESTS:
        assert tokens_and_reason(outputs[request_id]) == greedy(cfg, params, ids, max_tokens), request_id
        assert all(o.prompt_tokens == len(ids) for o in outputs[request_id])
    # r6 arrives at step 8 and starts while r0 (30 tokens from step 1) still runs.
    assert steps["r6"][0] < steps["r0"][1]
    assert engine.stats() | dict(pages_cached=0) == dict(
        running=0, waiting=0, pages_used=0, pages_cached=0, pages_total=4 * 32, preemptions=0,
        prefilled_tokens=sum(len(ids) for _, ids, _, _ in REQUESTS),
        generated_tokens=sum(m for _, _, m, _ in REQUESTS), cached_tokens=0, proposed_tokens=0,
        accepted_tokens=0)


def test_a_long_prompt_does_not_stall_running_requests(tiny):
    cfg, params = tiny
    engine = BatchingEngine(cfg, params, **SETTINGS)
    engine.add("short", prompt(4, 0), RequestParams(20, **GREEDY))
    engine.step()  # prefilled, first token out
    engine.add("long", prompt(100, 50), RequestParams(2, **GREEDY))  # 4 chunks: 32, 32, 32, 4
    # The short request gets a token at every step of the long prefill.
    assert [[o.request_id for o in engine.step()] for _ in range(4)] == [["short"]] * 3 + [["long", "short"]]


def test_seeded_sampling_depends_on_the_seed_only(tiny):
    cfg, params = tiny
    ids = prompt(30, 3)
    settings = dict(temperature=0.8, top_k=40, top_p=0.95, seed=7)
    engine = BatchingEngine(cfg, params, **SETTINGS)
    engine.add("x", ids, RequestParams(10, **settings))
    by_itself = tokens_and_reason(drain(engine)[0]["x"])
    # The same request among companions with other settings, arriving at another step.
    arrivals = {0: [("a", prompt(9, 1), RequestParams(15, temperature=1.0, seed=1)),
                    ("b", prompt(40, 2), RequestParams(15, **GREEDY))],
                2: [("x", ids, RequestParams(10, **settings))],
                3: [("c", prompt(5, 3), RequestParams(4, temperature=0.5, top_k=3))]}
    outputs, _ = drain(engine, arrivals)
    assert tokens_and_reason(outputs["x"]) == by_itself
    assert by_itself == alone(cfg, params, ids, 10, temperature=0.8, top_p=0.95, top_k=40, seed=7)
    engine.add("y", ids, RequestParams(10, **settings | dict(seed=8)))
    assert tokens_and_reason(drain(engine)[0]["y"]) != by_itself


def test_stop_ids_and_max_tokens_set_the_finish_reason(tiny):
    cfg, params = tiny
    ids = prompt(11, 30)
    reference, _ = greedy(cfg, params, ids, 10)
    k = next(k for k in range(2, 10) if reference[k] not in reference[:k])
    engine = BatchingEngine(cfg, params, **SETTINGS)
    engine.add("stop", ids, RequestParams(10, stop_token_ids=(reference[k], 499), **GREEDY))
    engine.add("length", ids, RequestParams(3, **GREEDY))
    outputs, _ = drain(engine)
    assert tokens_and_reason(outputs["stop"]) == (reference[:k + 1], "stop")  # the stop token is reported
    assert tokens_and_reason(outputs["length"]) == (reference[:3], "length")
    assert [o.finish_reason for o in outputs["length"]] == [None, None, "length"]


def test_logprobs_are_the_log_softmax_of_the_model_logits(tiny):
    cfg, params = tiny
    ids = prompt(13, 5)
    engine = BatchingEngine(cfg, params, **SETTINGS)
    engine.add("top", ids, RequestParams(6, temperature=1.0, seed=3, logprobs=5))
    engine.add("chosen", ids, RequestParams(6, **GREEDY, logprobs=0))
    engine.add("none", ids, RequestParams(2, **GREEDY))
    outputs, _ = drain(engine)
    for name in ("top", "chosen"):
        tokens = [o.token_id for o in outputs[name]]
        logits = Llama(cfg).apply({"params": params}, np.array([ids + tokens], np.int32))[0]
        expected = jax.nn.log_softmax(logits[len(ids) - 1:-1], axis=-1)
        for out, row in zip(outputs[name], np.asarray(expected)):
            np.testing.assert_allclose(out.logprob, row[out.token_id], rtol=1e-4, atol=1e-4)
            if name == "chosen":
                assert out.top_logprobs is None
                continue
            top = np.argsort(-row)[:5]
            assert [t for t, _ in out.top_logprobs] == top.tolist()
            np.testing.assert_allclose([lp for _, lp in out.top_logprobs], row[top], rtol=1e-4, atol=1e-4)
    assert all(o.logprob is None and o.top_logprobs is None for o in outputs["none"])


def test_abort_frees_the_slot_and_pages(tiny):
    cfg, params = tiny
    engine = BatchingEngine(cfg, params, **SETTINGS)
    for i in range(5):  # one more than the slots
        engine.add(f"r{i}", prompt(20, i), RequestParams(30, **GREEDY))
    early = [out for _ in range(4) for out in engine.step()]
    used = lambda: {k: engine.stats()[k] for k in ("running", "waiting", "pages_used")}  # noqa: E731
    assert used() == dict(running=4, waiting=1, pages_used=4 * 3)  # 20 prompt tokens, a few new: 3 pages each
    engine.abort("r1")
    engine.abort("r4")  # still waiting
    engine.abort("unknown")
    assert used() == dict(running=3, waiting=0, pages_used=3 * 3)
    outputs, _ = drain(engine)
    assert set(outputs) == {"r0", "r2", "r3"} and engine.stats()["pages_used"] == 0
    for i in (0, 2, 3):
        outs = [o for o in early if o.request_id == f"r{i}"] + outputs[f"r{i}"]
        assert tokens_and_reason(outs) == greedy(cfg, params, prompt(20, i), 30)


def test_bad_requests_are_refused(tiny):
    cfg, params = tiny
    engine = BatchingEngine(cfg, params, max_seq_len=64, max_waiting=2, **SETTINGS)
    with pytest.raises(ValueError, match="prompt of 60 tokens plus max_tokens 5 is 65 tokens, more than the "
                                         "context of 64"):
        engine.check(60, 5)
    with pytest.raises(ValueError, match="token id 512 is outside"):
        engine.add("a", [1, 512], RequestParams(2))
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        RequestParams(2, top_k=1000)
    with pytest.raises(ValueError, match="logprobs must be in"):
        RequestParams(2, logprobs=21)
    engine.add("a", [1], RequestParams(2))
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add("a", [1], RequestParams(2))
    engine.add("b", [1], RequestParams(2))
    with pytest.raises(EngineFullError):
        engine.add("c", [1], RequestParams(2))


def test_serving_shapes_are_few_at_any_max_batch():
    assert serving_shapes(64) == dict(decode_batches=[1, 4, 8, 16, 32, 64], chunk_shapes=[(4, 16)])
    assert serving_shapes(64, multiple=8) == dict(decode_batches=[8, 32, 64], chunk_shapes=[(32, 16)])
    assert prefill_shapes(256, smallest=64, max_rows=4) == [(1, 64), (2, 32), (4, 16), (1, 128), (2, 64), (4, 32),
                                                          (1, 256), (2, 128), (4, 64)]
    assert prefill_shapes(32, multiple=4, max_rows=4) == [(4, 32)]
    for max_batch in (1, 3, 5, 64, 100, 1024):
        shapes = serving_shapes(max_batch)
        assert shapes["decode_batches"][0] == 1 and shapes["decode_batches"][-1] == max_batch
        assert len(shapes["decode_batches"]) <= max_batch.bit_length()  # two programs each


def test_no_request_compiles_anything_after_warm_up():
    # A config of its own, so nothing compiled by other tests is reused; the server's shapes.
    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), norm_eps=3e-5)
    shapes = serving_shapes(SETTINGS["max_batch"], 32)
    engine = BatchingEngine(cfg, random_params(cfg), **dict(SETTINGS, **shapes))
    assert engine.decode_batches == [1, 4] and engine.chunk_shapes == [(4, 2)]
    _compiles.clear()
    engine.warm_up()
    assert _compiles["jit(model_step)"] == 2 * 2  # steps of 1 and 4 decode rows, with and without a 4x2 chunk
    _compiles.clear()
    arrivals = {0: [("a", prompt(3, 0), RequestParams(5, **GREEDY)),
                    ("b", prompt(45, 1), RequestParams(9, temperature=0.7, top_p=0.9, seed=1, logprobs=3))],
                2: [("c", prompt(17, 2), RequestParams(4, temperature=1.2, top_k=5, stop_token_ids=(3, 4, 5)))],
                3: [("d", prompt(8, 3), RequestParams(12, logprobs=0)), ("e", prompt(2, 4), RequestParams(1)),
                    ("f", prompt(30, 5), RequestParams(3))]}
    outputs, _ = drain(engine, arrivals)
    assert len(outputs) == 6
    assert sum(_compiles.values()) == 0, _compiles


def test_smaller_decode_batches_compile_at_warm_up_and_give_the_same_tokens():
    # A config of its own, so nothing compiled by other tests is reused.
    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), norm_eps=4e-5)
    params = random_params(cfg)
    # Steps of 1 decode row: test_no_request_compiles_anything_after_warm_up (the server's [1, 4]).
    engine = BatchingEngine(cfg, params, **SETTINGS | dict(chunk_shapes=[(2, 16)]), decode_batches=[2])
    assert engine.decode_batches == [2, 4]
    _compiles.clear()
    engine.warm_up()
    assert _compiles["jit(model_step)"] == 2 + 2  # steps of 2 and 4 decode rows, alone and with a 2x16 chunk
    _compiles.clear()
    arrivals = collections.defaultdict(list)
    for request_id, ids, max_tokens, step in REQUESTS:
        arrivals[step].append((request_id, ids, RequestParams(max_tokens, **GREEDY)))
    outputs, _ = drain(engine, arrivals)
    assert sum(_compiles.values()) == 0, _compiles
    for request_id, ids, max_tokens, _ in REQUESTS:
        assert tokens_and_reason(outputs[request_id]) == greedy(cfg, params, ids, max_tokens), request_id
    with pytest.raises(ValueError, match="decode_batches must be multiples of 1 in \\[1, max_batch=4\\], got \\[5\\]"):
        BatchingEngine(cfg, params, **SETTINGS, decode_batches=[5])


# Prefix cache and preemption ------------------------------------------------------------------

def test_a_shared_prefix_is_prefilled_once(tiny):
    cfg, params = tiny
    system = prompt(24, 100)  # 3 full pages
    first, second = system + prompt(6, 7)[1:], system + prompt(9, 8)[1:]
    runs = {}
    for caching in (True, False):
        engine = BatchingEngine(cfg, params, prefix_caching=caching, **SETTINGS)
        engine.add("first", first, RequestParams(5, **GREEDY))
        drain(engine)
        before = engine.stats()["prefilled_tokens"]
        engine.add("second", second, RequestParams(7, **GREEDY))
        outputs, _ = drain(engine)
        runs[caching] = (tokens_and_reason(outputs["second"]), engine.stats()["prefilled_tokens"] - before,
                         outputs["second"][0].cached_prompt_tokens)
    assert runs[True][0] == runs[False][0] == greedy(cfg, params, second, 7)
    assert runs[True][1:] == (len(second) - 24, 24)
    assert runs[False][1:] == (len(second), 0)


@pytest.mark.parametrize("layout", [{}, SMALL_CHUNK], ids=["prefill chunks", "small chunk"])
def test_a_tiny_page_budget_evicts_and_preempts_but_loses_no_request(tiny, layout):
    cfg, params = tiny
    # 8 pages of 8 tokens: one sequence of 64 tokens, or a few shorter ones at a time.
    engine = BatchingEngine(cfg, params, max_seq_len=64, num_pages=8, **SETTINGS | layout)
    system = prompt(16, 300)
    requests = {f"r{i}": (system + prompt(4 + 5 * i, 11 * i)[1:], 6 + 2 * i) for i in range(6)}  # 25..60 tokens
    arrivals = {0: [(r, ids, RequestParams(m, **GREEDY)) for r, (ids, m) in list(requests.items())[:4]],
                5: [(r, ids, RequestParams(m, **GREEDY)) for r, (ids, m) in list(requests.items())[4:]]}
    outputs, _ = drain(engine, arrivals)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["cached_tokens"] > 0 and stats["pages_used"] == 0
    for request_id, (ids, max_tokens) in requests.items():
        assert tokens_and_reason(outputs[request_id]) == greedy(cfg, params, ids, max_tokens), request_id


# Meshes ---------------------------------------------------------------------------------------

@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")
# dp2,tp2 only: tp alone (tp8) and dp2,tp4 give the single device's tokens in tests/infer/test_sharded.py.
@pytest.mark.parametrize("spec, layout", [("dp2,tp2", {}), ("dp2,tp2", SMALL_CHUNK)],
                         ids=["dp2,tp2", "dp2,tp2 small chunk"])
def test_a_mesh_gives_the_single_device_tokens(tiny, spec, layout):
    cfg, params = tiny
    arrivals = {0: [("a", prompt(3, 0), RequestParams(8, **GREEDY)),
                    ("b", prompt(40, 1), RequestParams(6, temperature=0.9, top_k=20, seed=4))],
                2: [("c", prompt(12, 2), RequestParams(7, temperature=1.0, seed=5, logprobs=2))]}
    single, _ = drain(BatchingEngine(cfg, params, **SETTINGS), {k: list(v) for k, v in arrivals.items()})
    mesh = make_mesh(spec, jax.devices()[:4])
    # The mesh's batch split (dp2: 2) divides every chunk's rows.
    chunks = dict(chunk_shapes=prefill_shapes(32, multiple=batch_split(mesh), max_rows=4))
    engine = BatchingEngine(cfg, params, mesh=mesh, **SETTINGS | chunks | layout)
    sharded, _ = drain(engine, arrivals)
    assert {k: tokens_and_reason(v) for k, v in sharded.items()} == {k: tokens_and_reason(v) for k, v in single.items()}
    np.testing.assert_allclose([o.logprob for o in sharded["c"]], [o.logprob for o in single["c"]], rtol=1e-5)
    assert engine.pages[0][0].sharding.spec == P(None, None, "tp")


# The pallas tests' engine: 2 slots, prompts in chunks of 2 rows of 8 tokens (a dp2 mesh's split divides them).
PALLAS_SETTINGS = dict(max_batch=2, page_size=8, chunk_shapes=[(2, 8)], max_seq_len=64)


def pallas_arrivals():
    return {0: [("a", prompt(20, 0), RequestParams(4, **GREEDY)),  # more tokens than a chunk holds
                ("b", prompt(5, 1), RequestParams(3, temperature=1.0, seed=2))]}


@pytest.fixture(scope="module")
def xla_tokens(tiny):
    """The pallas tests' requests on the XLA attention, one device (test_a_mesh_gives_the_single_device_tokens:
    a mesh gives these tokens too)."""
    cfg, params = tiny
    xla, _ = drain(BatchingEngine(cfg, params, **PALLAS_SETTINGS), pallas_arrivals())
    return {k: tokens_and_reason(v) for k, v in xla.items()}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")
@pytest.mark.parametrize("spec", [None, "dp2,tp2"])
def test_the_pallas_kernel_in_the_interpreter_gives_the_xla_tokens(tiny, xla_tokens, spec):
    cfg, params = tiny
    mesh = None if spec is None else make_mesh(spec, jax.devices()[:4])
    in_interpreter = dataclasses.replace(cfg, attention_interpret=True)
    engine = BatchingEngine(in_interpreter, params, attention_impl="pallas", mesh=mesh, **PALLAS_SETTINGS)
    pallas, _ = drain(engine, pallas_arrivals())
    assert {k: tokens_and_reason(v) for k, v in pallas.items()} == xla_tokens


def test_int8_weights_and_tied_embeddings_give_each_prompt_alones_tokens():
    cfg = LlamaConfig.preset("tiny-3.2")  # tied embeddings, 4 kv heads, scaled rope
    params = quantize_params(random_params(cfg), "int8")
    engine = BatchingEngine(cfg, params, **SETTINGS)
    ids = prompt(21, 9)
    engine.add("q", ids, RequestParams(8, **GREEDY))
    assert tokens_and_reason(drain(engine)[0]["q"]) == greedy(cfg, params, ids, 8)
