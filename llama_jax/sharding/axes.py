"""Logical axis names: the only vocabulary the model uses to describe how arrays may be split.

The model tags every parameter, activation boundary and KV-cache array with these names; the
rules table in this package (the only place that names mesh axes) maps them onto a mesh.
"""

# Parameters.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
LORA_RANK = "lora_rank"  # the rank r of a LoRA adapter (llama_jax/lora.py)

# Activations, constrained at block boundaries.
ACTIVATION_BATCH = "activation_batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
ACTIVATION_VOCAB = "activation_vocab"
