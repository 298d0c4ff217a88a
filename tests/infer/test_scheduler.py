"""The scheduler alone, with fake step outputs (no model, no jax): what each plan feeds, where it
samples, admission, the prefix cache, preemption and recompute, finish reasons and page accounting."""

import subprocess
import sys

import pytest

from llama_jax.infer.requests import EngineFullError, RequestParams
from llama_jax.infer.scheduler import Scheduler

VOCAB = 97


def fake_token(tokens):
    """A deterministic 'model': the next token is a function of the whole context, so a sequence
    recomputed after a preemption produces the same tokens."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + 7) % VOCAB


def scheduler(**overrides):
    settings = dict(max_batch=3, page_size=4, pages_per_seq=16, num_pages=24, decode_batches=[1, 2, 3],
                    chunk_shapes=[(2, 4)])
    return Scheduler(**settings | overrides)


class FakeDevice:
    """Checks each plan as the device step would read it, then returns the fake model's tokens: a
    sequence's tokens this step continue from what its pages hold (seq.written) without gaps, never
    past its context; it is sampled exactly when they reach its context's end, from the row of its
    last token; the decode rows and samples fit the decode batch, the pieces the chunk."""

    def run(self, plan):
        b = plan.decode_batch
        assert len(plan.sampled) <= b and len(plan.sample_at) == len(plan.sampled)
        fed = {id(s): (s, s.written, s.written + 1) for s in plan.decoding}  # seq, first and next position fed
        last_row = {id(s): row for row, s in enumerate(plan.decoding)}
        for s in plan.decoding:
            assert s.written == len(s.tokens) - 1  # a decode row feeds the newest token
        R, C = plan.chunk_shape or (0, 0)
        assert len(plan.pieces) <= R
        for row, piece in enumerate(plan.pieces):
            assert 1 <= piece.length <= C
            seq, first, next_ = fed.get(id(piece.seq), (piece.seq, piece.start, piece.seq.written))
            assert piece.start == next_, (seq.id, piece.start, next_)  # no gap, nothing fed twice
            fed[id(seq)] = (seq, first, piece.start + piece.length)
            last_row[id(seq)] = b + row * C + piece.length - 1
        finishing = []
        for seq, _, next_ in fed.values():
            assert next_ <= len(seq.tokens)
            if next_ == len(seq.tokens):
                finishing.append(seq)
        assert sorted(map(id, plan.sampled)) == sorted(map(id, finishing))
        assert plan.sample_at == [last_row[id(s)] for s in plan.sampled]
        return [fake_token(s.tokens) for s in plan.sampled] + [0] * (b - len(plan.sampled))


def run_all(sched, arrivals):
    """Step until idle, adding arrivals[step] first. {id: [TokenOutput]}."""
    device, outputs, step = FakeDevice(), {}, 0
    while sched.has_work() or arrivals:
        for request_id, prompt, params in arrivals.pop(step, []):
            sched.add(request_id, prompt, params)
        plan = sched.schedule()
        if plan is not None:
            for out in sched.update(plan, device.run(plan)):
                outputs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 10_000
    return outputs


def expected(prompt, max_tokens, stop=()):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_token(tokens))
        if tokens[-1] in stop:
            return tokens[len(prompt):], "stop"
    return tokens[len(prompt):], "length"


def got(outs):
    return [o.token_id for o in outs], outs[-1].finish_reason


def prompt(n, start):
    return [(start + 3 * i) % VOCAB for i in range(n)]


def test_every_request_gets_the_tokens_of_running_alone():
    sched = scheduler()
    requests = {f"r{i}": (prompt(3 + 5 * i, i), 4 + i) for i in range(6)}
    arrivals = {0: [(r, p, RequestParams(m)) for r, (p, m) in list(requests.items())[:3]],
                2: [(r, p, RequestParams(m)) for r, (p, m) in list(requests.items())[3:]]}
    outputs = run_all(sched, arrivals)
    for r, (p, m) in requests.items():
        assert got(outputs[r]) == expected(p, m), r
        assert all(o.prompt_tokens == len(p) for o in outputs[r])
    stats = sched.stats()
    assert stats["running"] == stats["waiting"] == stats["pages_used"] == 0
    assert stats["prefilled_tokens"] == sum(len(p) for p, _ in requests.values())
    assert stats["generated_tokens"] == sum(m for _, m in requests.values())


def test_a_plan_samples_at_each_finishing_prompt_s_last_token_and_pads_decode_rows():
    sched = scheduler()
    sched.add("a", prompt(6, 0), RequestParams(3))  # 6 tokens: rows of 4 and 2, finishing in this step
    plan = sched.schedule()
    assert plan.decoding == [] and plan.chunk_shape == (2, 4)
    assert [(p.start, p.length) for p in plan.pieces] == [(0, 4), (4, 2)]
    # One sample row: the last prompt token, chunk row 1 (after the decode batch of 1 row), slot 1.
    assert plan.decode_batch == 1 and plan.sample_at == [1 + 1 * 4 + 1]
    sched.update(plan, [5])
    sched.add("b", prompt(9, 1), RequestParams(3))
    plan = sched.schedule()
    assert [s.id for s in plan.decoding] == ["a"] and plan.decode_batch == 1  # b does not finish its prompt here
    assert [(p.seq.id, p.start, p.length) for p in plan.pieces] == [("b", 0, 4), ("b", 4, 4)]
    assert plan.sample_at == [0]


def test_stop_tokens_and_limits_finish_requests_and_free_their_pages():
    sched = scheduler()
    p = prompt(5, 2)
    reference, _ = expected(p, 8)
    k = next(k for k in range(1, 8) if reference[k] not in reference[:k])
    outputs = run_all(sched, {0: [("stop", p, RequestParams(8, stop_token_ids=(reference[k],))),
                                  ("len", p, RequestParams(3))]})
    assert got(outputs["stop"]) == (reference[:k + 1], "stop")
    assert got(outputs["len"]) == (reference[:3], "length")
    assert sched.stats()["pages_used"] == 0


def test_a_shared_prefix_is_fed_once_and_reported_as_cached():
    sched = scheduler()
    system = prompt(12, 5)  # three full pages of 4
    outputs = run_all(sched, {0: [("first", system + [1, 2], RequestParams(2))]})
    fed_before = sched.stats()["prefilled_tokens"]
    outputs |= run_all(sched, {0: [("second", system + [3], RequestParams(2))]})
    assert sched.stats()["prefilled_tokens"] - fed_before == 1  # only the token after the cached pages
    assert outputs["second"][0].cached_prompt_tokens == 12
    assert got(outputs["second"]) == expected(system + [3], 2)


def test_page_pressure_preempts_the_newest_and_recomputes_it_exactly():
    sched = scheduler(num_pages=8, prefix_caching=False)  # 8 pages of 4: 32 positions for 3 sequences
    requests = {f"r{i}": (prompt(6 + i, 7 * i), 14) for i in range(3)}
    outputs = run_all(sched, {0: [(r, p, RequestParams(m)) for r, (p, m) in requests.items()]})
    assert sched.stats()["preemptions"] > 0
    for r, (p, m) in requests.items():
        assert got(outputs[r]) == expected(p, m), r
    assert sched.stats()["pages_used"] == 0


def test_aborts_and_a_full_queue():
    sched = scheduler(max_waiting=2)
    sched.add("a", [1, 2], RequestParams(2))
    sched.add("b", [1, 2], RequestParams(2))
    with pytest.raises(EngineFullError):
        sched.add("c", [1], RequestParams(2))
    with pytest.raises(ValueError, match="already in use"):
        sched.schedule() and sched.add("a", [1], RequestParams(2))
    sched.abort("a")
    sched.abort("b")
    sched.abort("nope")
    assert not sched.has_work() and sched.stats()["pages_used"] == 0


def test_the_scheduler_imports_no_jax():
    code = ("import sys, llama_jax.infer.scheduler, llama_jax.infer.requests; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
