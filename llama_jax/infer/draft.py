"""Speculative decoding's draft model, and the speculative flags the infer and serve CLIs share.

    draft = load_draft("ckpt/llama3.2-1b", target)          # same tokenizer as the target, or a ValueError
    spec = SpeculativeConfig("draft", num_tokens=4, draft=draft)
    engine = BatchingEngine(target.cfg, target.params, speculative=spec)

The draft runs in an engine of its own (the target's shapes, its own paged cache and prefix cache):
each step, every decode row that proposes becomes a draft request whose prompt is the row's tokens
so far, decoded greedily for k tokens. Its prefix cache holds the pages of the tokens it saw in the
step before, so a request prefills only the tokens since then (the accepted ones and the last page's
rest); nothing of the draft's cache has to follow the target's preemptions or rejections, since
every request rebuilds its state from the tokens. Greedy proposals are a deterministic function of
the tokens, a point mass, so the target's verification rule (speculative.verify) keeps its output
distribution exact at any temperature.
"""

from __future__ import annotations

import argparse
import itertools

from llama_jax.infer.requests import RequestParams
from llama_jax.infer.speculation import METHODS, SpeculativeConfig


class DraftProposer:
    """Greedy proposals of a draft model's engine (a BatchingEngine over the draft's weights)."""

    def __init__(self, engine):
        self.engine = engine
        self._ids = itertools.count()

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        requests = []
        for seq, k in zip(seqs, ks):
            k = min(k, self.engine.max_seq_len - len(seq.tokens))  # a draft of a shorter context
            requests.append(f"draft-{next(self._ids)}" if k > 0 else None)
            if k > 0:
                self.engine.add(requests[-1], seq.tokens, RequestParams(k, temperature=0.0))
        proposals = {request_id: [] for request_id in requests}
        while self.engine.has_work():
            for out in self.engine.step():
                proposals[out.request_id].append(out.token_id)
        return [proposals[request_id] if request_id else [] for request_id in requests]


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


__all__ = ["DraftProposer", "same_tokenizer", "check_draft_tokenizer", "load_draft", "add_arguments",
           "check_arguments", "with_draft", "summary"]
