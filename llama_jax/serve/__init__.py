"""An OpenAI-compatible HTTP server over the continuous-batching engine: `python -m llama_jax.serve`."""
