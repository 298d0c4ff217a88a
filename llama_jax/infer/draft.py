"""Speculative decoding's draft model as the CLIs load it, and the flags the infer and serve CLIs share.

    draft = load_draft("ckpt/llama3.2-1b", target)          # same tokenizer as the target, or a ValueError
    spec = SpeculativeConfig("draft", num_tokens=4, draft=draft)
    engine = BatchingEngine(target.cfg, target.params, speculative=spec)

The engine runs the draft through speculation.DraftProposer (which says how).
"""

from __future__ import annotations

import argparse

from llama_jax.infer.speculation import METHODS, SpeculativeConfig


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every id to the same token: the same kind, size and special tokens,
    and each id's bytes (Llama 3's) or text (the others') equal."""
    if type(a) is not type(b) or a.vocab_size != b.vocab_size or dict(a.special_tokens) != dict(b.special_tokens):
        return False
    spell = (lambda tok, i: tok.token_bytes(i)) if hasattr(a, "token_bytes") else (lambda tok, i: tok.decode([i]))
    return all(spell(a, i) == spell(b, i) for i in range(a.vocab_size))


def check_draft_tokenizer(draft_dir, target_tokenizer) -> None:
    """A ValueError of one line unless the draft checkpoint's tokenizer is the target's (before either
    model's weights load)."""
    from llama_jax import checkpoint
    from llama_jax.infer.load import tokenizer_path
    from llama_jax.tokenizer import load_tokenizer

    path = checkpoint.find(draft_dir)
    draft_tokenizer = load_tokenizer(tokenizer_path(path))
    if not same_tokenizer(draft_tokenizer, target_tokenizer):
        raise ValueError(f"--draft-checkpoint {draft_dir}: its tokenizer is not the target's ({draft_tokenizer.vocab_size}"
                         f" and {target_tokenizer.vocab_size} tokens, or different tokens): a draft must share the "
                         f"target's tokenizer")


def load_draft(path, target, *, dtype: str | None = None):
    """The draft checkpoint loaded for inference on the target's mesh (an InferenceModel), after
    checking that it shares the target's tokenizer and vocabulary size."""
    from llama_jax.infer.load import load_for_inference

    check_draft_tokenizer(path, target.tokenizer)
    draft = load_for_inference(path, mesh=target.mesh, dtype=dtype)
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"--draft-checkpoint {path}: its vocabulary has {draft.cfg.vocab_size} ids, the target's "
                         f"{target.cfg.vocab_size}")
    return draft


# The CLIs' flags ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding (exact: the output is distributed as without it)")
    group.add_argument("--speculative", choices=METHODS, metavar="{ngram,draft}",
                       help="guess tokens and verify them in one step: 'ngram' (prompt lookup: what followed the "
                            "last few tokens earlier in the prompt or the output; no second model) or 'draft' (a "
                            "smaller model with the same tokenizer, --draft-checkpoint)")
    group.add_argument("--draft-checkpoint", metavar="DIR", help="the draft model of --speculative draft")
    group.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                       help="tokens guessed per step at most, 1..16 (default: %(default)s); a request's K adapts "
                            "down while its guesses fail")
    group.add_argument("--no-adaptive-speculation", dest="adaptive_speculation", action="store_false",
                       help="always propose K tokens (when the proposer has them)")


def check_arguments(args) -> SpeculativeConfig | None:
    """The flags as a SpeculativeConfig without its draft (loaded later), or None; a ValueError of one
    line for a combination that does not add up (before any weight loads)."""
    if args.speculative is None:
        if args.draft_checkpoint:
            raise ValueError("--draft-checkpoint needs --speculative draft")
        return None
    if args.speculative == "draft" and not args.draft_checkpoint:
        raise ValueError("--speculative draft needs --draft-checkpoint DIR (a smaller model with the same tokenizer)")
    if args.speculative == "ngram" and args.draft_checkpoint:
        raise ValueError("--draft-checkpoint is for --speculative draft, not ngram")
    try:
        return SpeculativeConfig(args.speculative, args.num_speculative_tokens, args.adaptive_speculation)
    except ValueError as e:
        raise ValueError(f"--num-speculative-tokens: {e}") from None


def with_draft(config: SpeculativeConfig | None, args, target) -> SpeculativeConfig | None:
    """The config with its draft model loaded (--speculative draft), beside the target."""
    if config is None or config.method != "draft":
        return config
    import dataclasses

    return dataclasses.replace(config, draft=load_draft(args.draft_checkpoint, target, dtype=getattr(args, "dtype", None)))


def summary(counters, seconds: float) -> str:
    """The line the infer CLI prints on stderr at the end: tokens, seconds, tokens/s, and the share of
    proposed tokens accepted when there were proposals."""
    tokens = counters.get("generated_tokens", 0)
    line = f"generated {tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)"
    proposed = counters.get("proposed_tokens", 0)
    if proposed:
        accepted = counters.get("accepted_tokens", 0)
        line += f"; speculative: {accepted} of {proposed} proposed tokens accepted ({100 * accepted / proposed:.0f}%)"
    return line


__all__ = ["same_tokenizer", "check_draft_tokenizer", "load_draft", "add_arguments",
           "check_arguments", "with_draft", "summary"]
