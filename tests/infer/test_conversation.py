"""Conversation: a KV cache kept between chat turns gives the tokens a fresh generation gives, while
prefilling only what the cache does not hold."""

import numpy as np
import pytest

from llama_jax.infer import engine
from llama_jax.infer.engine import Conversation, SamplingParams, stream_tokens
from tests.infer.common import collect

SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.95)
END_OF_TURN = 2  # stands in for <|eot_id|>


@pytest.fixture
def prefills(monkeypatch):
    """(prompt tokens given to prefill, offset) of every prefill call."""
    calls = []
    real = engine.prefill_jit

    def spy(params, tokens, lengths, *args, **kw):
        offset = int(args[4]) if len(args) > 4 else 0  # (last, keys, stop_ids, cache, offset)
        calls.append((int(lengths[0]) - offset, offset))
        return real(params, tokens, lengths, *args, **kw)

    monkeypatch.setattr(engine, "prefill_jit", spy)
    return calls


def fresh(cfg, params, prompt, n, sampling, seed=0):
    return collect(stream_tokens(cfg, params, [prompt], max_new_tokens=n, sampling=sampling, seed=seed))[0]


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SAMPLED])
def test_turns_equal_fresh_generation_and_prefill_only_new_tokens(tiny, prefills, sampling):
    cfg, params = tiny
    cfg, params = engine.prepare(cfg, params)
    conversation = Conversation(cfg, params)
    rng = np.random.default_rng(0)
    dialog = [1] + list(rng.integers(3, cfg.vocab_size, 12))
    cached = 0
    # Prompts of 13, 43 and 164 tokens: the cache grows from 64 slots to 256 (the whole context).
    for turn, (n_new, user_len) in enumerate([(20, 9), (20, 100), (12, 30)]):
        got = collect(conversation.stream(dialog, max_new_tokens=n_new, sampling=sampling, seed=turn))[0]
        assert got == fresh(cfg, params, dialog, n_new, sampling, seed=turn), turn
        prefilled, offset = prefills[-2]  # [-1] is the fresh generation's
        assert (offset, prefilled) == (cached, len(dialog) - cached)
        cached = len(dialog) + len(got[0]) - 1  # the prompt and the reply, but its last token (never fed)
        dialog = dialog + got[0] + [END_OF_TURN] + list(rng.integers(3, cfg.vocab_size, user_len))
    assert conversation.cache.max_len == 256


def test_an_edited_history_reuses_only_the_common_prefix(tiny, prefills):
    cfg, params = engine.prepare(*tiny)
    conversation = Conversation(cfg, params)
    greedy = SamplingParams(temperature=0.0)
    first = [1] + list(range(10, 40))
    collect(conversation.stream(first, max_new_tokens=5, sampling=greedy))
    edited = first[:20] + [7, 8, 9]
    assert collect(conversation.stream(edited, max_new_tokens=5, sampling=greedy))[0] == fresh(
        cfg, params, edited, 5, greedy)
    assert prefills[-2] == (3, 20)


def test_a_prompt_too_long_leaves_the_conversation_usable(tiny):
    cfg, params = engine.prepare(*tiny)
    conversation = Conversation(cfg, params)
    greedy = SamplingParams(temperature=0.0)
    prompt = [1, 5, 6, 7]
    before = collect(conversation.stream(prompt, max_new_tokens=4, sampling=greedy))
    with pytest.raises(engine.PromptTooLongError):
        list(conversation.stream([1] * cfg.max_seq_len, max_new_tokens=4, sampling=greedy))
    assert conversation.cached_ids == prompt + before[0][0][:-1]


def test_a_suffix_whose_bucket_would_pass_the_context_starts_over(tiny, prefills):
    cfg, params = engine.prepare(*tiny)
    conversation = Conversation(cfg, params)
    greedy = SamplingParams(temperature=0.0)
    first = [1] + list(range(10, 159))  # 150 tokens
    reply = collect(conversation.stream(first, max_new_tokens=51, sampling=greedy))[0][0]
    # 200 tokens cached; 50 more would pad to a 64-token bucket ending past the 256-token context.
    second = first + reply + list(range(300, 349))
    assert len(second) == 250 and len(conversation.cached_ids) == 200
    assert collect(conversation.stream(second, max_new_tokens=4, sampling=greedy))[0] == fresh(
        cfg, params, second, 4, greedy)
    assert prefills[-2] == (250, 0)
