"""Training data prepared once, read by index.

    python -m llama_jax.data prepare --data PATH... --tokenizer T --seq-len N --out DATA

    sources.py   text / JSONL / Parquet / datasets directories -> documents, in order
    tokens.py    documents -> token ids, targets and loss weights (chat: assistant turns only)
    pack.py      examples -> rows of seq_len: tokens, targets, positions, segment ids, weights
    store.py     ArrayRecord shards + manifest.json; PreparedData reads rows by index
    prepare.py   all of the above over worker processes, deterministic, written atomically
    reader.py    GlobalBatches: the rows of step s's global batch that this process holds

Nothing here touches a device: preparing runs on any machine, once, before training.
"""

from llama_jax.data.prepare import prepare
from llama_jax.data.reader import GlobalBatches
from llama_jax.data.store import PreparedData, is_prepared, read_manifest

__all__ = ["prepare", "PreparedData", "GlobalBatches", "is_prepared", "read_manifest"]
