"""`python -m llama_jax.infer --speculative ...`: the same greedy text as without, the acceptance in the
summary line on stderr, and one-line errors for flags that do not add up and a draft whose tokenizer
is not the target's. The Python API takes the same settings."""

import pytest

from llama_jax import save
from llama_jax.infer.draft import same_tokenizer
from llama_jax.infer.speculation import SpeculativeConfig
from llama_jax.infer.text import generate
from llama_jax.tokenizer import Llama3Tokenizer, write_byte_tokenizer
from tests.infer.common import random_params, run_cli
from tests.infer.conftest import LLAMA3_TINY

GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]
PROMPT = "one two three one two three one two"


def test_greedy_text_is_the_same_and_the_summary_counts_the_accepted_tokens(capsys, checkpoint_dir):
    summaries = []
    plain = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", PROMPT, *GREEDY, summary=summaries)
    # The target drafting for itself: every greedy guess holds.
    drafted = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", PROMPT, *GREEDY, "--speculative", "draft",
                      "--draft-checkpoint", checkpoint_dir, "--num-speculative-tokens", "3", summary=summaries)
    ngram = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", PROMPT, *GREEDY, "--speculative", "ngram",
                    summary=summaries)
    assert plain[0] == 0 and plain == drafted == ngram
    (generated, *none), (drafted_generated, accepted, proposed), _ = summaries
    assert generated == drafted_generated == 12 and none == [None, None]
    assert 0 < accepted == proposed  # a greedy draft of the same weights


@pytest.mark.parametrize("flags, message", [
    (["--speculative", "draft"], "--speculative draft needs --draft-checkpoint DIR"),
    (["--draft-checkpoint", "x"], "--draft-checkpoint needs --speculative draft"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens: the number of "
                                                                  "speculative tokens must be an integer in [1, 16]"),
])
def test_flags_that_do_not_add_up_are_one_line(capsys, checkpoint_dir, flags, message):
    status, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "x", *flags)
    assert (status, out) == (1, "") and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_a_draft_with_another_tokenizer_is_refused_before_any_weight_loads(capsys, checkpoint_dir, tmp_path):
    cfg = LLAMA3_TINY
    other = save(tmp_path / "bytes", cfg, random_params(cfg, 1),
                 tokenizer_path=write_byte_tokenizer(tmp_path / "bytes.model"))
    status, out, err = run_cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "x", "--speculative", "draft",
                               "--draft-checkpoint", other)
    assert (status, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(f"error: --draft-checkpoint {other}: its tokenizer is not the target's"), err
    assert not same_tokenizer(Llama3Tokenizer(write_byte_tokenizer(tmp_path / "b.model")), _llama3())


def _llama3():
    from llama_jax.tokenizer import default_tokenizer_path

    return Llama3Tokenizer(default_tokenizer_path())


def test_generate_takes_the_speculative_settings(llama3_tiny, tokenizer):
    cfg, params = llama3_tiny
    prompts = [PROMPT, "a b a b a b"]
    plain = generate(cfg, params, tokenizer, prompts, max_new_tokens=10, temperature=0)
    spec = SpeculativeConfig("draft", num_tokens=2, draft=(cfg, params))
    assert generate(cfg, params, tokenizer, prompts, max_new_tokens=10, temperature=0, speculative=spec) == plain
    assert same_tokenizer(tokenizer, _llama3())


def test_a_conversation_with_a_draft_keeps_its_turns_as_without(llama3_tiny, tokenizer):
    from llama_jax.infer.tokens import Conversation
    from llama_jax.infer.text import reply

    cfg, params = llama3_tiny
    spec = SpeculativeConfig("draft", num_tokens=3, draft=(cfg, params))
    turns = {}
    for speculative in (None, spec):
        conversation, ids, texts = Conversation(cfg, params, speculative=speculative), [], []
        for message in ("a b a b a b", "c d c d"):  # the second turn grows both engines' context
            ids = ids + tokenizer.encode(message, bos=not ids, eos=False)
            completion = reply(conversation, tokenizer, ids, max_new_tokens=12, temperature=0)
            texts.append(completion.text)
            ids = ids + completion.token_ids
        turns[speculative] = texts
        if speculative is not None:
            assert conversation.engine.counters["accepted_tokens"] == conversation.engine.counters["proposed_tokens"] > 0
            assert conversation.engine.draft_engine.max_seq_len == conversation.engine.max_seq_len
    assert turns[None] == turns[spec]
