"""The child process of test_meshes: `python -m llama_jax.train` (its main(), in this one process)
on each mesh given, the default model and a small text, a few steps each; one JSON line per mesh
with its losses, so the parent can tell which mesh stalled if one does."""

import json
import sys
from pathlib import Path

STEPS = 3
# Rows of 128 tokens, not fewer: on e93c254 fsdp2,tp4 trained 3 steps of rows of 64 but aborted on
# rows of 128 (every run we made; why the length matters was not pinned down).
SEQ_LEN = 128


def main(data: str, out: str, *meshes: str) -> None:
    from llama_jax.train.__main__ import main as train_cli

    for mesh in meshes:
        run = Path(out) / mesh.replace(",", "_")
        code = train_cli(["--mesh", mesh, "--data", data, "--out", str(run), "--steps", str(STEPS), "--seq-len", str(SEQ_LEN),
                          "--batch-size", "8", "--log-every", "1", "--save-every", "1000", "--no-progress"])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
        print("RESULT", json.dumps({"mesh": mesh, "exit": code, "losses": [r["loss"] for r in rows]}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
