"""Training-step throughput and memory: tokens/s, MFU and per-device memory of llama_jax's train
step on one or more meshes and row lengths, and (on CPU) Hugging Face transformers'
LlamaForCausalLM training step side by side.

    python -m bench.train                                  # the trainer's default model, CPU, 1 and 8 devices + torch
    python -m bench.train --config llama3.2-1b --mesh fsdp8 --batch-size 8 --seq-len 2048 --no-torch
    python -m bench.train --config tiny --batch-size 1 --seq-len 4096 8192 --mesh dp1 cp2 cp4 cp8 --no-torch
                                                           # long rows, context parallelism
    python -m bench.train --config tiny --batch-size 1 --seq-len 16384 65536 --mesh dp1 cp8 --memory-only
    python -m bench.train --config llama3.2-1b --mesh dp1 --batch-size 1 --seq-len 256 --lora 16 --memory-only \
        --no-torch                                         # full fine-tuning vs LoRA vs QLoRA, side by side

A mesh uses as many devices as it names ('cp2': 2 of the 8; '-1': all). Per-device memory is the
compiled step's own account (memory_analysis: arguments, i.e. state and batch shards, plus
temporaries plus outputs not aliased to donated inputs), so `--memory-only` compiles each setup
ahead of time without allocating anything: rows far too long to run on the host still get a number.

`--lora R` times three trainers on each mesh, side by side: full fine-tuning (float32 master
weights + AdamW), LoRA (rank R on every target; the frozen base held in --base-dtype, adapters and
their Adam moments float32) and QLoRA (the same with the base as int8). `--layers N` keeps a
preset's shapes with fewer layers, so a 1B-shaped step can be timed on a laptop CPU.

Both sides do the same work per step: forward, next-token cross-entropy over every position,
backward, global-norm clipping and an AdamW update of float32 weights, on the same random batch
(one document per row). MFU = model FLOPs (LlamaConfig.flops_per_token) per second over the peak:
the data-sheet bf16 peak of the chips, or on CPU the best measured matmul rate of this host in the
compute dtype (fake CPU devices share the same cores, so their peak is the host's, not 8x). Step
times are medians after warm-up. Prints a markdown table and appends it, with machine, date and
commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

from llama_jax.sharding.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.results import git_commit, machine, median_seconds, publish  # noqa: E402

SECTION = "## Training step throughput (bench/train.py)"


def model_config(name: str, dtype: str, seq_len: int):
    from llama_jax.config import PRESETS
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, dtype=dtype, param_dtype="float32", max_seq_len=max(cfg.max_seq_len, seq_len))


def mesh_for(spec: str):
    """The mesh over as many devices as `spec` names ('dp1': one device, 'cp2': two), all with -1."""
    from llama_jax.sharding import make_mesh, parse_mesh

    devices = jax.devices()
    if "-1" in spec:
        return make_mesh(spec)
    for n in range(1, len(devices) + 1):
        try:
            parse_mesh(spec, n)
        except ValueError:
            continue
        return make_mesh(spec, devices=devices[:n])
    return make_mesh(spec)  # raises, naming what is wrong


def random_batch(cfg, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch_size, seq_len), np.float32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
            "segment_ids": np.ones((batch_size, seq_len), np.int32)}


def bench_jax(cfg, mesh, batch: dict, steps: int, warmup: int, grad_accum: int,
              memory_only: bool, lora=None) -> tuple[float | None, dict[str, int]]:
    """(median step seconds, or None with memory_only; the compiled step's per-device bytes).
    lora: (LoraConfig, base dtype, 'int8' or None) to time a LoRA / QLoRA step instead."""
    from llama_jax.train.optim import OptimConfig, make_optimizer
    from llama_jax.train.step import abstract_batch, init_state, make_train_step, put_batch, sharded_abstract_state

    optimizer = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0, total_steps=10_000))
    shape = batch["inputs"].shape
    lora_args, frozen, trained = {}, (), None
    if lora is not None:
        from llama_jax.lora import init_adapters, sharded_adapter_shapes
        from llama_jax.train.lora import adapted

        spec, base_dtype, quantize = lora
        trained = sharded_adapter_shapes(cfg, spec, mesh)
        lora_args = dict(trained=trained, adapt=adapted(spec))
        frozen = (abstract_base(cfg, mesh, base_dtype, quantize),)
    step = make_train_step(cfg, optimizer, mesh, batch_shape=shape, grad_accum=grad_accum, **lora_args)
    compiled = step.lower(sharded_abstract_state(cfg, optimizer, mesh, trained), abstract_batch(mesh, shape),
                          *frozen).compile()
    m = compiled.memory_analysis()
    memory = {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
              "total": m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes}
    if memory_only:
        return None, memory
    params = None
    if lora is not None:
        params = init_adapters(cfg, spec, 0, mesh)
        frozen = (random_base(cfg, mesh, base_dtype, quantize),)
    holder = {"state": init_state(cfg, optimizer, mesh, seed=0, params=params, trained=trained)}
    on_mesh = put_batch(batch, mesh)

    def run():
        holder["state"], metrics = compiled(holder["state"], on_mesh, *frozen)
        jax.block_until_ready(metrics["loss"])

    return median_seconds(run, steps, warmup), memory


def random_base(cfg, mesh, dtype: str, quantize: str | None):
    """A random frozen base on `mesh`, held as LoRA training holds it: in `dtype`, or quantized."""
    from llama_jax.params import init_sharded_params

    base = init_sharded_params(dataclasses.replace(cfg, param_dtype=dtype), mesh, 0)
    if quantize:
        from llama_jax.quantize import quantize_params
        base = quantize_params(base, quantize)
    return base


def abstract_base(cfg, mesh, dtype: str, quantize: str | None):
    """random_base's shapes, dtypes and shardings, without allocating it (int8 values are split like
    their weight; a scale's reduced dims, of size 1, are replicated)."""
    from llama_jax.params import param_shardings

    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    shapes = jax.eval_shape(lambda: random_base(cfg, mesh, dtype, quantize))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        param_shardings(cfg, mesh, shapes))


def bench_torch(cfg, batch: dict, steps: int, warmup: int, threads: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    hf = cfg.to_hf_config(dtype="float32")
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    model = transformers.LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.from_numpy(batch["inputs"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    autocast = cfg.dtype != "float32"

    def run():
        with torch.autocast("cpu", dtype=getattr(torch, cfg.dtype), enabled=autocast):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, cfg.vocab_size), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(run, steps, warmup)


def main(argv=None) -> str:
    from llama_jax.config import REMAT_POLICIES
    from llama_jax.train.run_config import DEFAULT_MODEL
    from llama_jax.train.metrics import peak_flops

    on_cpu = jax.devices()[0].platform == "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_MODEL, help="preset, or the trainer's default model (%(default)s)")
    p.add_argument("--mesh", nargs="+", default=["dp1", "fsdp8"] if on_cpu else ["fsdp-1"],
                   help="meshes to time, each over the devices it names ('dp1': a single device); default %(default)s")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, nargs="+", default=[256], help="row lengths to sweep (%(default)s)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16", help="compute dtype (%(default)s)")
    p.add_argument("--remat", choices=tuple(REMAT_POLICIES), help="(default: the config's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setup")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--memory-only", action="store_true",
                   help="compile each setup ahead of time for its per-device memory; time nothing")
    p.add_argument("--no-torch", action="store_true", help="skip the HF transformers (PyTorch CPU) step")
    p.add_argument("--lora", type=int, metavar="R",
                   help="also LoRA and QLoRA (int8 base) steps of rank R, side by side")
    p.add_argument("--base-dtype", help="the frozen LoRA base's dtype (default: the compute dtype, as the trainer "
                   "holds it)")
    p.add_argument("--layers", type=int, help="the preset's shapes with this many layers")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)

    cfg = model_config(args.config, args.dtype, max(args.seq_len))
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    trainers = [("full fine-tuning", None)]
    if args.lora:
        from llama_jax.lora import LoraConfig

        args.base_dtype = args.base_dtype or cfg.dtype

        lora_spec = LoraConfig(rank=args.lora)
        trainers += [(f"LoRA r={args.lora}, {args.base_dtype} base", (lora_spec, args.base_dtype, None)),
                     (f"QLoRA r={args.lora}, int8 base", (lora_spec, args.base_dtype, "int8"))]
    if args.remat:
        cfg = dataclasses.replace(cfg, remat=args.remat)
    B = args.batch_size
    peak, peak_source = peak_flops(jax.devices(), cfg.compute_dtype)
    platform = jax.devices()[0].platform

    def fmt(x):
        return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"

    lines = ["| framework | trainer | devices | tokens/row | tokens/s | MFU | step (ms) | per-device memory (MiB) | "
             "of which arguments (MiB) | of which temporaries (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for T in args.seq_len:
        batch = random_batch(cfg, B, T)
        flops_per_step = cfg.flops_per_token(T) * B * T
        rows = []
        for spec in args.mesh:
            mesh = mesh_for(spec)
            for trainer, lora in trainers:
                seconds, memory = bench_jax(cfg, mesh, batch, args.steps, args.warmup, args.grad_accum,
                                            args.memory_only, lora)
                rows.append((f"llama_jax (JAX {jax.__version__})", trainer, f"{spec} ({mesh.size} {platform})",
                             seconds, memory))
        if not args.no_torch and not args.memory_only and on_cpu:
            import torch
            import transformers
            seconds = bench_torch(cfg, batch, args.steps, args.warmup, args.torch_threads)
            rows.append((f"HF transformers {transformers.__version__} (torch {torch.__version__})",
                         "full fine-tuning", f"{args.torch_threads} threads", seconds, None))
        for name, trainer, where, seconds, memory in rows:
            mib = ("n/a",) * 3 if memory is None else tuple(
                fmt(memory[k] / 2**20) for k in ("total", "arguments", "temp"))
            if seconds is None:
                timing = ("not run", "", "")
            else:
                # A LoRA step does fewer FLOPs than the model's 6N per token (no weight gradients).
                full = trainer == "full fine-tuning"
                mfu = f"{100 * flops_per_step / seconds / peak:.1f}%" if peak and full else "n/a"
                timing = (fmt(B * T / seconds), mfu, f"{seconds * 1e3:.0f}")
            lines.append(f"| {name} | {trainer} | {where} | {T:,} | " + " | ".join(timing + mib) + " |")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    peak_text = f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else peak_source
    what = ("compiled ahead of time for memory only, nothing run" if args.memory_only
            else f"median of {args.steps} steps after {args.warmup}")
    header = (f"### {now}, {machine()}, commit {git_commit()}\n\n"
              f"{args.config}: {cfg.num_params() / 1e6:.2f}M params, {cfg.n_layers} layers, dim {cfg.dim}, "
              f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv heads, vocab {cfg.vocab_size}; batch {B} rows, "
              f"{cfg.dtype} compute, float32 weights + AdamW, remat {cfg.remat}, attention {cfg.attention_impl}, grad "
              f"accum {args.grad_accum}; peak {peak_text}; {what}."
              + (f" LoRA: rank {args.lora} on {','.join(lora_spec.targets)}, float32 adapters + AdamW, frozen base "
                 f"{args.base_dtype} (QLoRA: int8 + per-channel scales), scale {lora_spec.alpha:g}/{lora_spec.rank}."
                 if args.lora else ""))
    return publish(SECTION, header, lines, append=not args.no_append)


if __name__ == "__main__":
    main(sys.argv[1:])
