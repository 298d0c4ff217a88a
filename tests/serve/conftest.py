import pytest

from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path


@pytest.fixture(scope="session")
def tokenizer():
    return Llama3Tokenizer(default_tokenizer_path())
