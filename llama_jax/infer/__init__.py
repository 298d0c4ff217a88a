"""Generation: `generate(cfg, params, tokenizer, prompts, ...)`, and `python -m llama_jax.infer`.

The decoding engine, by job (as vLLM v1 splits it, at our scale):
requests.py  what a request asks (RequestParams) and gets (TokenOutput); plain Python
scheduler.py waiting queue, admission, prefix cache, page reservation, preemption: a StepPlan per
             step; plain Python (no jax)
pages.py     the page allocator and prefix cache the scheduler uses; plain Python
weights.py   the engine's weight layout (DecodeParams: a buffer per layer)
kv_cache.py  the page pools on the device and the views attention writes and reads through
step.py      the jitted step: StepInputs -> the model's embed / Block / unembed -> StepOutputs
sampling.py  greedy / temperature / top-k / top-p, masks, biases, logprobs as pure functions
engine.py    BatchingEngine: the scheduler's plans run as steps
tokens.py    token ids in and out: stream_tokens over a list of prompts, Conversation across turns
load.py      a checkpoint loaded for inference (the CLIs and the Python API)
text.py      the text API: generate, streaming detokenizer, chat dialog, reply (one chat turn)

Names are imported lazily, so the plain-Python modules load without jax.
"""

from llama_jax.lazy import lazy_getattr

_EXPORTS = {
    "generate": "text", "iter_completions": "text", "reply": "text", "GenerationResult": "text",
    "Completion": "text", "TextStream": "text", "Chat": "text",
    "Conversation": "tokens", "stream_tokens": "tokens", "PromptTooLongError": "tokens",
    "SamplingParams": "sampling", "decode_params": "weights", "BatchingEngine": "engine",
    "RequestParams": "requests", "load_for_inference": "load", "InferenceModel": "load",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
