"""Best-of-N (rejection sampling) throughput: K answers per prompt sampled and scored by a reward model,
three ways on the same weights: ours as best-of-n runs it (one n = K request per prompt: the prompt
prefilled once, its pages shared by the K samples; the reward model reads it once too, the answers on
its cached pages), K independent requests per prompt (prefix cache off: each prefills the prompt;
every prompt + answer scored whole), and HF transformers (`generate` with num_return_sequences = K,
then LlamaForSequenceClassification on each prompt + answer).

    python -m bench.rejection_sampling            # 4 prompts of 512 tokens, K = 8, 32 new tokens
    python -m bench.rejection_sampling --quick    # 2 prompts of 256 tokens, 16 new tokens

The policy is bench/decode.py's quick shapes untied (4 layers of dim 512, a 32k vocabulary), random
weights; the reward model the same shapes with a random score head. Sampling at temperature 1, no
stop tokens (every answer gets all its tokens). Every program is compiled first (one untimed run
each); runs alternate; samples/s are medians. Prints one markdown table and appends it, with machine,
date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.decode import model_config
from bench.results import git_commit, machine, publish
from llama_jax import init_params
from llama_jax.infer.engine import BatchingEngine
from llama_jax.infer.requests import RequestParams
from llama_jax.infer.tokens import PAGE_SIZE
from llama_jax.reward.model import from_causal_lm, score_sequences
from llama_jax.reward.shared_prefix import SharedPrefixScorer

SECTION = "## Rejection sampling (bench/rejection_sampling.py)"
CHUNK = (4, 256)


class Ours:
    """Our engine: `run(prompts) -> seconds` for K samples of each prompt, then their scores."""

    def __init__(self, name, cfg, params, reward, *, k: int, new_tokens: int, context: int, shared: bool):
        self.name, self.k, self.shared, self.reward = name, k, shared, reward
        rows = k * 2
        self.engine = BatchingEngine(cfg, params, max_batch=rows, max_seq_len=context, page_size=PAGE_SIZE,
                                     decode_batches=[rows], chunk_shapes=[CHUNK], prefix_caching=shared,
                                     max_waiting=1024)
        self.params = RequestParams(new_tokens, temperature=1.0, seed=0)
        self.scorer = SharedPrefixScorer(*reward, max_seq_len=context + 1, max_batch=k) if shared else None

    def run(self, prompts) -> float:
        start = time.perf_counter()
        answers = {}
        for p, prompt in enumerate(prompts):
            if self.shared:
                self.engine.add(str(p), prompt, dataclasses.replace(self.params, n=self.k), stream=p * self.k)
            else:
                for i in range(self.k):
                    self.engine.add(f"{p}/{i}", prompt, self.params, stream=p * self.k + i)
        while self.engine.has_work():
            for out in self.engine.step():
                answers.setdefault((out.request_id, out.index), []).append(out.token_id)
        groups = {}
        for (request_id, _), tokens in answers.items():
            p = int(request_id.split("/")[0])
            groups.setdefault(p, []).append(prompts[p] + tokens)
        if self.shared:  # the reward model reads each prompt once, as best-of-n does
            self.scorer(list(groups.values()))
        else:
            cfg, params = self.reward
            score_sequences(cfg, params, [s for group in groups.values() for s in group], batch_size=self.k)
        return time.perf_counter() - start


class HF:
    """HF transformers: generate(num_return_sequences=K, do_sample) per prompt, then the reward model on
    every prompt + answer, batched K at a time."""

    def __init__(self, cfg, params, reward, *, k: int, new_tokens: int):
        import torch
        import transformers

        from bench.decode import hf_model

        self.torch, self.k, self.new_tokens = torch, k, new_tokens
        self.name = f"HF transformers {transformers.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
        self.policy = hf_model(cfg, params)
        rm_cfg, rm_params = reward
        lm = hf_model(rm_cfg, {**{k: v for k, v in rm_params.items() if k != "score"},
                               "output": jnp.zeros((rm_cfg.dim, rm_cfg.vocab_size), rm_params["tok_embeddings"].dtype)})
        hf = rm_cfg.to_hf_config()
        config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")},
                                          num_labels=1, pad_token_id=0)
        self.reward = transformers.LlamaForSequenceClassification(config).to(getattr(torch, rm_cfg.dtype)).eval()
        self.reward.model.load_state_dict(lm.model.state_dict())
        with torch.no_grad():
            self.reward.score.weight.copy_(torch.from_numpy(np.asarray(rm_params["score"], np.float32))[None])

    def run(self, prompts) -> float:
        torch = self.torch
        start = time.perf_counter()
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([prompt])
                out = self.policy.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                           num_return_sequences=self.k, max_new_tokens=self.new_tokens,
                                           min_new_tokens=self.new_tokens, pad_token_id=0)
                self.reward(out).logits  # K rows of prompt + answer, all of equal length
        return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 prompts of 256 tokens, 16 new tokens")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed runs of every system, alternating")
    p.add_argument("--no-hf", action="store_true", help="leave out HF transformers")
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args()
    prompts_n, prompt_len, new_tokens = (2, 256, 16) if args.quick else (4, 512, 32)
    cfg = dataclasses.replace(model_config(True, "", "float32"), tie_embeddings=False,
                              max_seq_len=max(1024, prompt_len + new_tokens))
    context = prompt_len + new_tokens
    params = init_params(cfg, 0)
    reward = (cfg, {**from_causal_lm(cfg, init_params(cfg, 1)),
                    "score": jnp.asarray(np.random.default_rng(2).normal(0, 0.02, cfg.dim), jnp.float32)})
    load_before = os.getloadavg()[0]
    common = dict(k=args.k, new_tokens=new_tokens, context=context)
    systems = [Ours(f"ours, one n = {args.k} request a prompt", cfg, params, reward, shared=True, **common),
               Ours(f"ours, {args.k} requests a prompt", cfg, params, reward, shared=False, **common)]
    if not args.no_hf:
        systems.append(HF(cfg, params, reward, k=args.k, new_tokens=new_tokens))
    rng = np.random.default_rng(0)
    draw = lambda: [rng.integers(3, cfg.vocab_size, prompt_len).tolist() for _ in range(prompts_n)]  # noqa: E731
    for system in systems:
        system.run(draw())  # untimed: the first call of every program
    times = {s.name: [] for s in systems}
    for _ in range(args.reps):
        prompts = draw()
        for system in systems:
            times[system.name].append(system.run(prompts))
    samples = prompts_n * args.k
    base = statistics.median(times[systems[1].name])
    rows = ["| system | seconds (median) | samples/s | vs K independent requests |", "|---|---|---|---|"]
    for system in systems:
        seconds = statistics.median(times[system.name])
        rows.append(f"| {system.name} | {seconds:.2f} | {samples / seconds:.1f} | {base / seconds:.2f}x |")
    commit = git_commit("llama_jax/infer", "llama_jax/reward", "llama_jax/model.py", "bench/rejection_sampling.py")
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"{jax.devices()[0].device_kind}, commit {commit}{', --quick' if args.quick else ''}\n\n"
              f"{prompts_n} prompts of {prompt_len} tokens, K = {args.k} samples of {new_tokens} tokens each "
              f"(temperature 1), every sample scored; policy and reward model {cfg.num_params() / 1e6:.0f}M params "
              f"(4 x 512, 32k vocabulary, float32), random weights; our engine: {2 * args.k} rows, pages of "
              f"{PAGE_SIZE}, chunks of {CHUNK[0]} x {CHUNK[1]}; medians of {args.reps} alternating runs; load average "
              f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after.")
    publish(SECTION, header, rows, append=not args.no_append)


if __name__ == "__main__":
    main()
