"""One of two processes in test_train_data: join jax.distributed over localhost (4 CPU devices each),
put three global batches on a dp2,fsdp2,tp2 mesh from this process's rows only, and save what this
process holds (each device shard's row range and inputs) and how many rows it read."""

import os
import sys

from tests.processes import cpu_env

os.environ.update(cpu_env(4))

MESH, SEQ, BATCH, STEPS = "dp2,fsdp2,tp2", 32, 8, 3


def main(data: str, tokenizer: str, out: str, port: str, process_id: str) -> None:
    from pathlib import Path

    import jax
    import numpy as np

    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    from llama_jax.sharding import make_mesh
    from llama_jax.train.data import TrainData

    data = TrainData(Path(data), tokenizer, SEQ, BATCH, seed=0, mesh=make_mesh(MESH))
    held = {}
    for step in range(STEPS):
        batch = next(data)
        for shard in batch["inputs"].addressable_shards:
            rows = shard.index[0].indices(BATCH)
            held[f"{step}_{rows[0]}_{rows[1]}"] = np.asarray(shard.data)
    np.savez(out, rows=np.asarray(data.rows), rows_read=data.data.rows_read, **held)


if __name__ == "__main__":
    main(*sys.argv[1:])
