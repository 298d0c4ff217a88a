"""Reward models: a Llama that scores a whole sequence with one number (model.py), trained on
preference pairs with `python -m llama_jax.train --objective reward` (train/reward.py)."""
