"""Speculation's host side, without a model (no jax): each sequence's adaptive K, and the scheduler with
a fake proposer and a fake verifying device: the tokens out equal plain decoding's with guesses right,
half right or wrong, arrivals, preemption and stop tokens inside the accepted guesses; proposals take
only free pages (never preempting) and never run past max_tokens."""

import pytest

from llama_jax.infer.requests import RequestParams
from llama_jax.infer.speculation import MAX_PAUSE, Adaptive, SpeculativeConfig
from tests.infer.test_scheduler import expected, fake_token, scheduler


def test_k_follows_the_accepted_count_and_failures_pause_proposing():
    a = Adaptive(4)
    assert a.wanted() == 4
    a.update(4, 2, limit=4)
    assert a.k == 3  # one more than what held
    a.update(3, 3, limit=4)
    assert a.k == 4  # all held: one more, up to K
    a.update(2, 2, limit=4)
    assert a.k == 3
    pauses = []
    for _ in range(8):  # every guess failing: 1, 2, 4 .. MAX_PAUSE steps without proposing
        a.update(a.k, 0, limit=4)
        pauses.append(a.pause)
        while a.pause:
            assert a.wanted() == 0
    assert pauses == [1, 2, 4, 8, 16, 32, 32, 32] and MAX_PAUSE == 32 and a.k == 1
    a.update(1, 1, limit=4)
    assert (a.misses, a.pause, a.k) == (0, 0, 2)
    a.update(0, 0, limit=4)  # nothing proposed: nothing learned
    assert (a.misses, a.k) == (0, 2)


def test_a_config_that_does_not_add_up_is_one_line():
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 16\]"):
        SpeculativeConfig(num_tokens=0)
    with pytest.raises(ValueError, match="method must be one of ngram, draft"):
        SpeculativeConfig("eagle")
    with pytest.raises(ValueError, match="a draft model is for method 'draft'"):
        SpeculativeConfig("ngram", draft=object())
    assert SpeculativeConfig(num_tokens=1).widths == [2] and SpeculativeConfig(num_tokens=4).widths == [2, 5]


class Guesser:
    """Proposes each sequence's true next tokens (the fake model's), spoiling the guess at position
    `wrong[id]` (None: all right). Records every (id, k asked, proposal)."""

    def __init__(self, wrong):
        self.wrong, self.asked = wrong, []

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            tokens, guess = list(seq.tokens), []
            for j in range(k):
                t = fake_token(tokens)
                guess.append((t + 1) % 97 if self.wrong.get(seq.id) == j else t)
                tokens.append(t)
            self.asked.append((seq.id, k, guess))
            out.append(guess)
        return out


def verify(plan):
    """The device step of a speculative plan with the fake model: each decode row keeps the guesses
    the model agrees with, then the model's token; a finishing prompt's sample row its first token."""
    T = plan.width
    tokens, accepted = [0] * (plan.decode_batch * T), [0] * plan.decode_batch
    for row, seq in enumerate(plan.sampled):
        assert plan.sample_at[row] == row * T if row < len(plan.decoding) else plan.sample_at[row] >= plan.decode_batch * T
        context = list(seq.tokens)
        for guess in (plan.proposals[row] if row < len(plan.decoding) else []):
            if fake_token(context) != guess:
                break
            context.append(guess)
            accepted[row] += 1
        new = context[len(seq.tokens):] + [fake_token(context)]
        tokens[row * T:row * T + len(new)] = new
    return tokens, accepted


def run_all(sched, arrivals):
    outputs, step = {}, 0
    while sched.has_work() or arrivals:
        for request_id, prompt, params in arrivals.pop(step, []):
            sched.add(request_id, prompt, params)
        plan = sched.schedule()
        if plan is not None:
            for seq, guess in zip(plan.decoding, plan.proposals):
                assert len(seq.pages) * sched.page_size > seq.written + len(guess)  # pages for every guess
                assert seq.generated + len(guess) < seq.params.max_tokens  # never past max_tokens
            if plan.width > 1:
                tokens, accepted = verify(plan)
                outs = sched.update(plan, tokens, accepted=accepted)
            else:
                outs = sched.update(plan, [fake_token(s.tokens) for s in plan.sampled] + [0] * plan.decode_batch)
            for out in outs:
                outputs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 10_000
    return outputs, step


ARRIVALS = {0: [("a", [1, 5, 9], 30, ()), ("b", [2, 4, 6, 8, 10, 12, 14], 25, ())],
            3: [("c", [3] * 11, 30, ()), ("d", [7, 7], 20, (fake_token([7, 7, fake_token([7, 7])]),))]}


@pytest.mark.parametrize("num_pages", [64, 12])  # roomy; tight: preemptions
def test_outputs_equal_plain_decoding_whatever_the_guesses(num_pages):
    results = {}
    for name, speculative, wrong in (("plain", None, {}), ("right", 4, {}), ("mixed", 4, {"a": 2, "c": 0}),
                                     ("wrong", 3, {k: 0 for k in "abcd"})):
        sched = scheduler(max_batch=3, num_pages=num_pages, pages_per_seq=12, speculative=None if speculative is None
                          else SpeculativeConfig(num_tokens=speculative), proposer=Guesser(wrong) if speculative else None)
        arrivals = {step: [(i, p, RequestParams(n, stop_token_ids=stop)) for i, p, n, stop in requests]
                    for step, requests in ARRIVALS.items()}
        outputs, steps = run_all(sched, arrivals)
        results[name] = {i: ([o.token_id for o in outs], outs[-1].finish_reason) for i, outs in outputs.items()}
        assert sched.allocator.used == 0 and not sched.requests
        if num_pages == 12 and name == "plain":
            assert sched.counters["preemptions"] > 0
        if name == "right":
            assert sched.counters["accepted_tokens"] == sched.counters["proposed_tokens"] > 0 and steps < results_steps / 2
        if name == "wrong":
            assert sched.counters["accepted_tokens"] == 0 and sched.counters["proposed_tokens"] > 0
        results_steps = steps if name == "plain" else results_steps
    for request_id, prompt, max_tokens, stop in (r for rs in ARRIVALS.values() for r in rs):
        want = expected(prompt, max_tokens, stop)  # a stop token is the last token reported
        for name, got in results.items():
            assert got[request_id] == want, (name, request_id)
    assert results["plain"]["d"][1] == "stop" and len(results["plain"]["d"][0]) == 2  # a stop among the guesses


def test_proposals_take_free_pages_only_and_stop_before_max_tokens():
    guesser = Guesser({})
    sched = scheduler(max_batch=1, num_pages=8, pages_per_seq=8, decode_batches=[1], chunk_shapes=[(1, 4)],
                      speculative=SpeculativeConfig(num_tokens=4, adaptive=False), proposer=guesser)
    sched.add("x", [1, 2, 3], RequestParams(20))
    plan = sched.schedule()
    sched.update(plan, [fake_token([1, 2, 3])])
    held = [sched.allocator.allocate() for _ in range(7)]  # every free page taken by someone else
    assert sched.allocator.allocate() is None
    plan = sched.schedule()  # its token at position 3 fits its page; guesses at 4.. would need another
    assert plan.proposals == [] and plan.width == 1 and sched.counters["preemptions"] == 0
    sched.update(plan, [fake_token(plan.decoding[0].tokens)])
    sched.allocator.release(held[:1])  # one page free: position 4 takes it, guesses fill it up to 7
    plan = sched.schedule()
    assert [len(g) for g in plan.proposals] == [3] and sched.counters["preemptions"] == 0
    tokens, accepted = verify(plan)
    sched.update(plan, tokens, accepted=accepted)
    sched.allocator.release(held[1:])
    outputs, _ = run_all(sched, {})
    assert [k for _, k, _ in guesser.asked] == [4, 4, 4, 4, 3]  # the last: max_tokens - generated - 1
    assert len(outputs["x"]) == 20 - 6 and outputs["x"][-1].finish_reason == "length"
