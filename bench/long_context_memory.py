"""Per-device memory of a long-context fine-tuning step, from the compiled step, nothing allocated.

    python -m bench.long_context_memory                       # Llama-3.1-8B, 131072-token rows, fsdp2,cp4
    python -m bench.long_context_memory --mesh fsdp2,cp4 fsdp8 --seq-len 32768

One row per data-parallel group: fsdp2,cp4 trains 2 rows, each split over 4 devices. Compiles the
real train step ahead of time (`lower(...).compile()` on ShapeDtypeStructs) for fake
CPU devices shaped like the target mesh, and reads XLA's memory_analysis: arguments (the state's
and batch's shards), temporaries, and outputs not aliased to donated inputs. bf16 compute, float32
master weights and AdamW moments, remat 'full'. Two attention variants per mesh:

    xla       the XLA attention as it is: under cp the blocked flash_xla (O(T) memory, like the
              kernels); without cp the dense reference, per head a [T, T] score block.
    O(T)      the same shard_map and K/V all-gather, but the attention itself replaced by a stand-in
              whose memory is linear in T and nothing else (its output only): the floor the rest of
              the step sets; the stand-in's numbers are not attention.

CPU buffer assignment is not a GPU's, so treat the numbers as estimates to a few GiB. Prints a
markdown table and appends it, with machine, date and commit, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from unittest import mock

from llama_jax.sharding.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.results import git_commit, machine, publish  # noqa: E402

SECTION = "## Long-context step memory (bench/long_context_memory.py)"
GiB = 2**30


def linear_footprint_attention(q_BTHE, k_BSKE, v_BSKE, *unused, scale=None):
    """Not attention: an O(T)-memory stand-in with attention's inputs, output shape and gradients."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    kv_BKE = jnp.mean(k_BSKE * v_BSKE, axis=1)
    return (q_BTHE.reshape(B, T, K, H // K, E) * kv_BKE[:, None, :, None, :]).reshape(B, T, H, E)


def step_memory(cfg, mesh, batch_shape) -> dict[str, float]:
    from llama_jax.train.optim import OptimConfig, make_optimizer
    from llama_jax.train.step import abstract_batch, make_train_step, sharded_abstract_state

    optimizer = make_optimizer(OptimConfig(lr=1e-5, warmup_steps=0, total_steps=1000))
    step = make_train_step(cfg, optimizer, mesh, batch_shape=batch_shape)
    m = step.lower(sharded_abstract_state(cfg, optimizer, mesh), abstract_batch(mesh, batch_shape)).compile() \
        .memory_analysis()
    return {"args": m.argument_size_in_bytes / GiB, "temp": m.temp_size_in_bytes / GiB,
            "total": (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                      - m.alias_size_in_bytes) / GiB}


def main(argv=None) -> str:
    from llama_jax.config import PRESETS
    from llama_jax.sharding import make_mesh, parse_mesh

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3.1-8b", help="preset (%(default)s)")
    p.add_argument("--mesh", nargs="+", default=["fsdp2,cp4"], help="meshes of 8 devices (%(default)s)")
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)

    cfg = dataclasses.replace(PRESETS[args.config], dtype="bfloat16", param_dtype="float32", remat="full",
                              attention_impl="xla", max_seq_len=max(args.seq_len, PRESETS[args.config].max_seq_len))
    lines = ["| mesh | attention | arguments (GiB) | temporaries (GiB) | per-device total (GiB) |",
             "|---|---|---|---|---|"]
    for spec in args.mesh:
        sizes = parse_mesh(spec, len(jax.devices()))
        mesh = make_mesh(spec)
        shape = (sizes["dp"] * sizes["fsdp"], args.seq_len)  # one row per data-parallel group
        for name, patch in (("xla", None), ("O(T) stand-in", linear_footprint_attention)):
            if patch is None:
                m = step_memory(cfg, mesh, shape)
            else:
                with mock.patch("llama_jax.kernels.context_parallel.flash_attention_xla", patch), \
                        mock.patch("llama_jax.kernels.attention_reference", patch):
                    m = step_memory(cfg, mesh, shape)
            lines.append(f"| {spec} | {name} | {m['args']:.1f} | {m['temp']:.1f} | {m['total']:.1f} |")
            print(lines[-1], flush=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"### {now}, {machine()}, commit {git_commit()}\n\n"
              f"{args.config} shapes ({cfg.num_params() / 1e9:.2f}B params), one row of {args.seq_len:,} tokens "
              f"per dp x fsdp group (each device holds seq-len / cp of a row), bf16 compute, float32 weights + AdamW, "
              f"remat full; compiled ahead of time "
              f"for 8 fake CPU devices (JAX {jax.__version__}), XLA memory_analysis per device.")
    return publish(SECTION, header, lines, append=not args.no_append)


if __name__ == "__main__":
    main(sys.argv[1:])
