"""Conversation: an engine kept between chat turns gives the tokens a fresh generation gives, while
prefilling only what its cached pages do not hold."""

import numpy as np
import pytest

from llama_jax.infer.weights import decode_params
from llama_jax.infer.tokens import Conversation, PromptTooLongError, PAGE_SIZE, stream_tokens
from llama_jax.infer.sampling import SamplingParams
from tests.infer.common import collect

SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.95)
END_OF_TURN = 2  # stands in for <|eot_id|>


def fresh(cfg, params, prompt, n, sampling, seed=0):
    return collect(stream_tokens(cfg, params, [prompt], max_new_tokens=n, sampling=sampling, seed=seed))[0]


def turn(conversation, prompt, n, sampling, seed=0):
    """(tokens, finish reason) of one turn, and the prompt tokens it prefilled."""
    engine = conversation.engine
    before = 0 if engine is None else engine.counters["prefilled_tokens"]
    got = collect(conversation.stream(prompt, max_new_tokens=n, sampling=sampling, seed=seed))[0]
    return got, conversation.engine.counters["prefilled_tokens"] - before


def reusable(cached_ids, prompt):
    """The prompt tokens a turn finds in the cache: the full pages it shares with what the last turn
    fed (at least its last token is prefilled, for its logits)."""
    n = min(len(cached_ids), len(prompt) - 1)
    shared = next((i for i in range(n) if cached_ids[i] != prompt[i]), n)
    return shared // PAGE_SIZE * PAGE_SIZE


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SAMPLED])
def test_turns_equal_fresh_generation_and_prefill_only_new_tokens(tiny, sampling):
    cfg, params = decode_params(*tiny)
    conversation = Conversation(cfg, params)
    rng = np.random.default_rng(0)
    dialog = [1] + list(rng.integers(3, cfg.vocab_size, 12))
    # Prompts of 13, 43 and 164 tokens: the engine's context grows from 64 tokens to 256 (the whole context).
    for n_turn, (n_new, user_len) in enumerate([(20, 9), (20, 100), (12, 30)]):
        cached = list(conversation.cached_ids)
        got, prefilled = turn(conversation, dialog, n_new, sampling, seed=n_turn)
        assert got == fresh(cfg, params, dialog, n_new, sampling, seed=n_turn), n_turn
        assert prefilled == len(dialog) - reusable(cached, dialog), n_turn
        assert n_turn == 0 or prefilled < len(dialog) - len(cached) + PAGE_SIZE  # the earlier turns are cached
        assert conversation.cached_ids == dialog + got[0][:-1]
        dialog = dialog + got[0] + [END_OF_TURN] + list(rng.integers(3, cfg.vocab_size, user_len))
    assert conversation.engine.max_seq_len == 256 and conversation.engine.stats()["pages_used"] == 0


def test_an_edited_history_reuses_only_the_common_prefix(tiny):
    cfg, params = decode_params(*tiny)
    conversation = Conversation(cfg, params)
    greedy = SamplingParams(temperature=0.0)
    first = [1] + list(range(10, 45))
    turn(conversation, first, 5, greedy)
    edited = first[:20] + [7, 8, 9]
    got, prefilled = turn(conversation, edited, 5, greedy)
    assert got == fresh(cfg, params, edited, 5, greedy)
    assert prefilled == len(edited) - PAGE_SIZE  # the one full page before the edit


def test_a_prompt_too_long_leaves_the_conversation_usable(tiny):
    cfg, params = decode_params(*tiny)
    conversation = Conversation(cfg, params)
    greedy = SamplingParams(temperature=0.0)
    prompt = [1, 5, 6, 7]
    before = collect(conversation.stream(prompt, max_new_tokens=4, sampling=greedy))
    with pytest.raises(PromptTooLongError):
        list(conversation.stream([1] * cfg.max_seq_len, max_new_tokens=4, sampling=greedy))
    assert conversation.cached_ids == prompt + before[0][0][:-1]
    again = prompt + before[0][0] + [9]
    assert turn(conversation, again, 3, greedy)[0] == fresh(cfg, params, again, 3, greedy)


def test_a_turn_near_the_context_end_reuses_the_cached_pages(tiny):
    cfg, params = decode_params(*tiny)
    conversation = Conversation(cfg, params)
    greedy = SamplingParams(temperature=0.0)
    first = [1] + list(range(10, 159))  # 150 tokens
    reply = turn(conversation, first, 51, greedy)[0][0]
    second = first + reply + list(range(300, 349))  # 250 tokens of the 256-token context
    assert len(second) == 250 and len(conversation.cached_ids) == 200
    got, prefilled = turn(conversation, second, 4, greedy)
    assert got == fresh(cfg, params, second, 4, greedy)
    assert prefilled == 250 - 192  # 12 full pages of 16 cached


def test_a_turn_abandoned_midway_frees_its_pages(tiny):
    cfg, params = decode_params(*tiny)
    conversation = Conversation(cfg, params)
    greedy = SamplingParams(temperature=0.0)
    events = conversation.stream([1] + list(range(10, 40)), max_new_tokens=20, sampling=greedy)
    next(events)
    events.close()
    assert conversation.engine.stats()["pages_used"] == 0 and not conversation.engine.has_work()
    prompt = [1, 5, 6, 7]
    assert turn(conversation, prompt, 4, greedy)[0] == fresh(cfg, params, prompt, 4, greedy)
