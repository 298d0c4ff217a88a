"""Generation: `generate(cfg, params, tokenizer, prompts, ...)`, and `python -m llama_jax.infer`.

batching.py continuous batching over a paged KV cache (BatchingEngine: requests join and leave the
            running batch at every step), the one decode path, with its own per-layer weights
            (`prepare`); the server's engine
engine.py   token ids in and out on BatchingEngine: stream_tokens over a list of prompts, and
            Conversation, which keeps its engine's pages between chat turns
pages.py    the KV page allocator and prefix cache of batching.py
sampling.py greedy / temperature / top-k / top-p as small pure functions
text.py     the text API: generate, streaming detokenizer, chat dialog, reply (one chat turn)
"""

from llama_jax.infer.batching import prepare
from llama_jax.infer.engine import Conversation, PromptTooLongError, stream_tokens
from llama_jax.infer.sampling import SamplingParams
from llama_jax.infer.text import Chat, Completion, GenerationResult, TextStream, generate, iter_completions, reply

__all__ = ["generate", "iter_completions", "reply", "GenerationResult", "Completion", "TextStream", "Chat",
           "Conversation", "SamplingParams", "stream_tokens", "prepare", "PromptTooLongError"]
