import pytest

from llama_jax import LlamaConfig, save
from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path
from tests.infer.common import random_params

# Tiny dims with the real Llama 3 vocabulary, so the real tokenizer drives it.
LLAMA3_TINY = LlamaConfig(vocab_size=128256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                          max_seq_len=64, dtype="float32")


@pytest.fixture(scope="session")
def tokenizer():
    return Llama3Tokenizer(default_tokenizer_path())


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return save(tmp_path_factory.mktemp("ckpt") / "tiny-llama3", LLAMA3_TINY, random_params(LLAMA3_TINY, 0),
                tokenizer_path=default_tokenizer_path())
