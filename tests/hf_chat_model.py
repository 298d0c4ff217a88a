"""A tiny SmolLM2-style Hugging Face model directory: a Llama-architecture model whose tokenizer is
not Llama 3's. transformers' LlamaForCausalLM with random weights, and a GPT-2-style byte-level BPE
trained here by the `tokenizers` library with ChatML special tokens, its chat template (SmolLM2's
own) in tokenizer_config.json, all written by save_pretrained as the Hub's models are."""

from __future__ import annotations

import json
from pathlib import Path

# SmolLM2-135M-Instruct's chat template, as its tokenizer_config.json holds it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
BPE_VOCAB = 600
TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was 3:14 p.m.; nobody noticed!",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "naïve café — 日本語のテキスト 🙂 and ÜBER straße, Съешь же ещё этих мягких булок.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "Numbers: 1234567 3.14159 2024-01-01 1,000,000.",
]


def train_tokenizer():
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) trained on a few texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXTS * 20, trainer)
    return tokenizer


def build(directory: Path, *, seed: int = 0, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          ffn: int = 192, max_positions: int = 256) -> Path:
    """save_pretrained of the model and its tokenizer into `directory`; returns it. The defaults are
    the tests' tiny shapes; bench/dpo.py asks for larger ones."""
    import torch
    import transformers

    tokenizer = train_tokenizer()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                                pad_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # ~N(0, 0.1), norms ~1 +- 0.2: logits O(1-10), so layout errors show
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    # As the Hub's SmolLM2: its class named, its template inside tokenizer_config.json (transformers
    # >= 4.43 saves a chat_template.jinja beside it instead, which llama_jax reads too).
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_file = directory / "tokenizer_config.json"
    tokenizer_config = {k: v for k, v in json.loads(config_file.read_text()).items() if k != "backend"}
    config_file.write_text(json.dumps(
        {**tokenizer_config, "tokenizer_class": "GPT2Tokenizer", "chat_template": CHATML_TEMPLATE}, indent=2))
    return directory
