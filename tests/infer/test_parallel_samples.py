"""n > 1 samples of one prompt: prefilled once, forked into n sequences that share the prompt's full
pages (and copy its last partial one), each then decoded, preempted and finished on its own. Sample i
must equal an n = 1 request with the same seed and stream i; greedy samples equal greedy decoding
of the full forward pass."""

import dataclasses

import jax
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.scheduler import Scheduler
from llama_jax.infer.sampling import SamplingParams
from llama_jax.infer.text import generate
from llama_jax.infer.tokens import Conversation, stream_tokens
from llama_jax.params import param_shardings
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Llama3Tokenizer, write_byte_tokenizer
from tests.infer.common import greedy_reference, random_params

PAGE = 8
PROMPT = [1] + [(17 * i + 5) % 500 + 3 for i in range(42)]  # 43 tokens: 5 full pages and a partial one
HOT = dict(temperature=1.0, seed=7)


def make_engine(tiny, **overrides):
    cfg, params = tiny
    settings = dict(max_batch=4, max_seq_len=64, page_size=PAGE, decode_batches=[4], chunk_shapes=[(1, 32)])
    return BatchingEngine(cfg, params, **settings | overrides)


@pytest.fixture(scope="module")
def engine(tiny):
    return make_engine(tiny)


def run(engine, requests, *, each_step=None, logprobs=None):
    """{(request id, sample index): (tokens, finish reason)} of requests {id: (prompt, params, stream)};
    `logprobs`, a dict, gets each sample's token log-probabilities (when its params ask for them)."""
    for request_id, (prompt, params, stream) in requests.items():
        engine.add(request_id, prompt, params, stream=stream)
    out = {}
    while engine.has_work():
        for o in engine.step():
            key = (o.request_id, o.index)
            assert out.get(key, ([], None))[1] is None, f"a token after {key} finished"
            out[key] = (out.get(key, ([], None))[0] + [o.token_id], o.finish_reason)
            if logprobs is not None:
                logprobs.setdefault(key, []).append(o.logprob)
        if each_step is not None:
            each_step(engine)
    return out


def test_greedy_samples_are_identical_and_equal_greedy_decoding(tiny, engine):
    cfg, params = tiny
    out = run(engine, {"r": (PROMPT, RequestParams(10, temperature=0.0, n=4), 0)})
    want = (greedy_reference(cfg, params, PROMPT, 10), "length")
    assert out == {("r", i): want for i in range(4)}


def test_sample_i_equals_an_n_1_request_with_stream_i(tiny, engine):
    # The log-probabilities show that every sample attends to the prompt's keys and values, those of
    # its copied last page included (a tiny random model's tokens may not).
    together_logprobs, alone_logprobs = {}, {}
    together = run(engine, {"r": (PROMPT, RequestParams(10, n=4, logprobs=0, **HOT), 0)}, logprobs=together_logprobs)
    assert len({tuple(tokens) for tokens, _ in together.values()}) > 1  # one seed, four different samples
    for i in range(4):
        alone = run(engine, {"alone": (PROMPT, RequestParams(10, logprobs=0, **HOT), i)}, logprobs=alone_logprobs)
        assert alone[("alone", 0)] == together[("r", i)], i
        np.testing.assert_allclose(together_logprobs[("r", i)], alone_logprobs.pop(("alone", 0)), rtol=0, atol=1e-6)
    # A base stream shifts every sample's: stream 2's sample 0 is stream 0's sample 2.
    shifted = run(engine, {"s": (PROMPT, RequestParams(10, n=2, **HOT), 2)})
    assert shifted[("s", 0)] == together[("r", 2)] and shifted[("s", 1)] == together[("r", 3)]


def test_the_samples_share_the_prompt_s_full_pages(tiny):
    engine = make_engine(tiny, prefix_caching=False)
    used = []
    out = run(engine, {"r": (PROMPT, RequestParams(4, n=4, **HOT), 0)},
              each_step=lambda e: used.append(e.scheduler.allocator.used))
    # While the 4 samples decode positions 43..46 (in the prompt's partial page): its 5 full pages
    # held together, and a copy of the partial page each; 4 separate requests would hold 4 * 6.
    assert used[-2] == 5 + 4 < 4 * 6
    assert used[-1] == 0 and len(out) == 4


def test_samples_preempted_under_a_small_pool_get_the_same_tokens(tiny, engine):
    want = run(engine, {"r": (PROMPT, RequestParams(20, n=4, **HOT), 0)})
    # 10 pages of 8: the prompt's 6 and 3 copies fit, the samples' next pages do not.
    small = make_engine(tiny, num_pages=10)
    got = run(small, {"r": (PROMPT, RequestParams(20, n=4, **HOT), 0)})
    assert small.stats()["preemptions"] > 0
    assert got == want
    assert small.stats()["pages_used"] == 0


def test_a_sample_that_stops_early_finishes_alone(tiny, engine):
    together = run(engine, {"r": (PROMPT, RequestParams(10, n=4, **HOT), 0)})
    tokens0, _ = together[("r", 0)]
    stop = tokens0[3]
    out = run(engine, {"r": (PROMPT, RequestParams(10, n=4, stop_token_ids=(stop,), **HOT), 0)})
    for i in range(4):
        tokens, _ = together[("r", i)]
        k = tokens.index(stop) if stop in tokens else None
        assert out[("r", i)] == ((tokens, "length") if k is None else (tokens[:k + 1], "stop"))
    assert out[("r", 0)][1] == "stop"


def test_aborting_mid_run_frees_every_page(tiny):
    engine = make_engine(tiny)
    engine.add("r", PROMPT, RequestParams(20, n=4, **HOT))
    engine.add("other", PROMPT[:20], RequestParams(20, **HOT))  # waits: the 4 samples hold every slot
    while engine.scheduler.counters["generated_tokens"] < 8:
        engine.step()
    assert engine.scheduler.allocator.used > 0 and len(engine.requests["r"]) == 4
    engine.abort("r")
    engine.abort("other")
    assert not engine.has_work()
    allocator = engine.scheduler.allocator
    assert allocator.used == 0 and allocator.available() == allocator.num_pages


def test_prefix_caching_serves_the_prompt_of_a_later_n_request(tiny):
    engine = make_engine(tiny)
    first = run(engine, {"a": (PROMPT, RequestParams(6, n=3, **HOT), 0)})
    fed = engine.stats()["prefilled_tokens"]
    outputs = []
    engine.add("b", PROMPT, RequestParams(6, n=3, **HOT))
    while engine.has_work():
        outputs += engine.step()
    assert engine.stats()["prefilled_tokens"] - fed == len(PROMPT) - 40  # only past the 5 cached pages
    assert {o.cached_prompt_tokens for o in outputs} == {40}
    for i in range(3):
        assert [o.token_id for o in outputs if o.index == i] == first[("a", i)][0]


def test_generate_with_n_returns_every_sample_as_the_prompts_repeated(tiny, tmp_path):
    cfg, params = tiny
    tokenizer = Llama3Tokenizer(write_byte_tokenizer(tmp_path / "bytes.model"))  # 512 ids: the tiny model's
    prompts = [PROMPT, PROMPT[:30]]
    settings = dict(max_new_tokens=6, seed=7, batch_size=6, temperature=1.0, top_p=1.0)
    streamed = {}
    got = generate(cfg, params, tokenizer, prompts, n=3,
                   on_text=lambda i, piece: streamed.setdefault(i, []).append(piece), **settings)
    # Prompt p's sample i is at index p * n + i, drawn with stream p * n + i: as the same index of a
    # list of n = 1 prompts, each prompt repeated n times.
    want = generate(cfg, params, tokenizer, [prompt for prompt in prompts for _ in range(3)], **settings)
    assert got == want and len(got.token_ids) == 6 and got.token_ids[0] != got.token_ids[1]
    assert ["".join(streamed.get(i, [])) for i in range(6)] == got.texts


def test_n_beyond_the_batch_or_the_pool_is_refused(tiny, engine):
    with pytest.raises(ValueError, match="n must be at most max_batch=4"):
        engine.add("x", PROMPT, RequestParams(4, n=5))
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="a Conversation continues one sequence: sampling.n must be 1, got 2"):
        next(Conversation(*tiny).stream(PROMPT, max_new_tokens=2, sampling=SamplingParams(n=2)))
    with pytest.raises(ValueError, match="need more pages than the pool"):
        Scheduler(max_batch=8, page_size=4, pages_per_seq=4, num_pages=6, decode_batches=[8],
                  chunk_shapes=[(1, 4)]).add("x", [1] * 14, RequestParams(2, n=4))


def test_the_scheduler_plans_n_sample_rows_with_their_streams_and_copies():
    sched = Scheduler(max_batch=4, page_size=4, pages_per_seq=8, num_pages=16, decode_batches=[1, 4],
                      chunk_shapes=[(2, 4)])
    sched.add("r", list(range(1, 7)), RequestParams(3, n=3), stream=5)  # 6 tokens: a full page and a partial one
    plan = sched.schedule()
    assert plan.decode_batch == 4 and plan.sampled == [plan.pieces[0].seq] * 3
    assert plan.sample_at == [4 + 4 + 1] * 3 and plan.streams == [5, 6, 7]
    assert sched.allocator.used == 2 + 2  # the context's 2 pages, 2 spares for the copies
    sched.update(plan, np.array([10, 11, 12, 0]))
    samples = sched.requests["r"]
    assert [s.index for s in samples] == [0, 1, 2] and [s.tokens[-1] for s in samples] == [10, 11, 12]
    full, partial = samples[0].pages
    assert [s.pages[0] for s in samples] == [full] * 3 and sched.allocator.refs[full] == 3
    plan = sched.schedule()
    assert plan.page_copies == [(partial, samples[1].pages[1]), (partial, samples[2].pages[1])]
    assert plan.streams == [5, 6, 7] and sched.schedule is not None
    sched.update(plan, np.array([1, 2, 3, 0]))
    assert sched.schedule().page_copies == []


VOCAB = 97


def fake_token(context, stream):
    """A deterministic 'model' of the whole context and the row's key stream."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + 7 + 13 * stream) % VOCAB


class PagedFakeDevice:
    """Runs a plan as the device step does, on pages of token ids: the copies first, then every row
    writes its tokens at its positions through its page table, then each sample row reads its
    sequence's context back from the pages and draws fake_token(context, its stream). A page shared
    or copied wrongly gives a wrong context, so wrong tokens."""

    def __init__(self, sched):
        self.sched, self.pages = sched, {}

    def run(self, plan):
        P, table = self.sched.page_size, self.sched.page_table
        for src, dst in plan.page_copies:
            self.pages[dst] = list(self.pages[src])
        writes = [(s, s.written, s.tokens[-1]) for s in plan.decoding]
        writes += [(p.seq, p.start + k, p.seq.tokens[p.start + k]) for p in plan.pieces for k in range(p.length)]
        for seq, position, token in writes:
            self.pages.setdefault(int(table[seq.slot, position // P]), [None] * P)[position % P] = token
        out = []
        for seq, stream in zip(plan.sampled, plan.streams):
            context = [self.pages[int(table[seq.slot, q // P])][q % P] for q in range(len(seq.tokens))]
            assert context == seq.tokens, (seq.id, seq.index)
            out.append(fake_token(context, stream))
        return out + [0] * (plan.decode_batch - len(out))


def expected_sample(prompt, max_tokens, stream, stop=()):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_token(tokens, stream))
        if tokens[-1] in stop:
            return tokens[len(prompt):], "stop"
    return tokens[len(prompt):], "length"


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("num_pages", [14, 40])
def test_forked_samples_read_their_own_context_back_through_shared_and_copied_pages(prefix_caching, num_pages):
    """Requests of n = 1..4 arriving over time, prompts ending inside and at the end of a page, one
    repeated (the prefix cache), a pool small enough to preempt, and samples 0 that stop at their
    first token (the page the others copy is let go before the copy): every sample gets the tokens
    of its stream alone, and every page and slot comes back."""
    rng = np.random.default_rng(0)
    sched = Scheduler(max_batch=4, page_size=4, pages_per_seq=12, num_pages=num_pages, decode_batches=[1, 2, 4],
                      chunk_shapes=[(2, 4)], prefix_caching=prefix_caching)
    shared = rng.integers(0, VOCAB, 9).tolist()
    requests = {f"r{i}": (shared if i % 3 == 0 else rng.integers(0, VOCAB, 5 + 2 * i).tolist(), 1 + i % 4, 10 + i)
                for i in range(8)}  # id -> (prompt, n, max_tokens)
    stops = {r: (fake_token(prompt, 10 * int(r[1:])),) if r in ("r3", "r6") else ()
             for r, (prompt, _, _) in requests.items()}
    arrivals = {2 * i: (r, *spec) for i, (r, spec) in enumerate(requests.items())}
    device, got, step = PagedFakeDevice(sched), {}, 0
    while sched.has_work() or step in arrivals or step < max(arrivals):
        if step in arrivals:
            r, prompt, n, max_tokens = arrivals[step]
            sched.add(r, prompt, RequestParams(max_tokens, n=n, stop_token_ids=stops[r]), stream=10 * int(r[1:]))
        plan = sched.schedule()
        if plan is not None:
            for out in sched.update(plan, device.run(plan)):
                tokens, reason = got.get((out.request_id, out.index), ([], None))
                assert reason is None
                got[(out.request_id, out.index)] = (tokens + [out.token_id], out.finish_reason)
        step += 1
        assert step < 5000
    for r, (prompt, n, max_tokens) in requests.items():
        for i in range(n):
            assert got[(r, i)] == expected_sample(prompt, max_tokens, 10 * int(r[1:]) + i, stops[r]), (r, i)
    assert got[("r3", 0)][1] == got[("r6", 0)][1] == "stop" and got[("r3", 1)][1] == "length"
    assert len(got) == sum(n for _, n, _ in requests.values())
    if num_pages == 14:
        assert sched.counters["preemptions"] > 0
    assert sched.allocator.used == 0 and not sched.reserved and sched.slots == [None] * 4


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")
def test_samples_and_penalties_on_a_mesh_equal_one_device():
    """The new step inputs (page copies, penalty lists) placed on a dp2,tp4 mesh: the same tokens."""
    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), n_heads=16, n_kv_heads=8, dim=128)
    params = random_params(cfg, 3)
    sampling = SamplingParams(temperature=1.0, n=2, presence_penalty=1.0, repetition_penalty=1.3,
                              logit_bias={5: 2.0})
    prompts = [PROMPT[:21], PROMPT[:9]]

    def run_on(mesh):
        placed = params if mesh is None else jax.device_put(params, param_shardings(cfg, mesh, params))
        events = stream_tokens(cfg, placed, prompts, max_new_tokens=6, sampling=sampling, seed=1, mesh=mesh)
        out = {}
        for e in events:
            out.setdefault((e.index, e.sample), []).append((e.token, e.finish_reason))
        return out

    single = run_on(None)
    assert len(single) == 4 and single[(0, 0)] != single[(0, 1)]
    assert run_on(make_mesh("dp2,tp4")) == single


def test_one_sample_aborted_frees_its_pages_and_the_others_go_on(engine):
    params = RequestParams(max_tokens=12, temperature=1.0, seed=3, n=3)
    whole = run(engine, {"r": (PROMPT, params, 0)})
    engine.add("r", PROMPT, params)
    out, aborted = {}, False
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.index, []).append(o.token_id)
        if len(out.get(1, [])) == 2 and not aborted:
            aborted, used = True, engine.scheduler.allocator.used
            engine.abort("r", 1)
            assert engine.scheduler.allocator.used < used  # its own pages went back
            engine.abort("r", 1)  # again: a no-op
    assert len(out[1]) == 2
    assert out[0] == whole[("r", 0)][0] and out[2] == whole[("r", 2)][0]
    assert engine.scheduler.allocator.used == 0
