import pytest

from llama_jax.tokenizer import Llama3Tokenizer, default_tokenizer_path, write_byte_tokenizer


def _llama3_tokenizer():
    try:
        return Llama3Tokenizer(default_tokenizer_path())
    except ValueError as e:  # the llama-models package (Meta's tokenizer.model) is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def grammar_tokenizers(tmp_path_factory):
    """name -> tokenizer, built once: the real Llama 3 vocabulary and the 512-token byte vocabulary."""
    return {"bytes": Llama3Tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("bytes") / "tokenizer.model"))}


@pytest.fixture(scope="session")
def compilers(grammar_tokenizers):
    """name -> GrammarCompiler over that vocabulary, created on first use (Llama 3's takes a second)."""
    from llama_jax.grammar import GrammarCompiler, grammar_vocabulary

    made = {}

    def get(name):
        if name not in made:
            if name == "llama3":
                grammar_tokenizers["llama3"] = _llama3_tokenizer()
            made[name] = GrammarCompiler(grammar_vocabulary(grammar_tokenizers[name]))
        return grammar_tokenizers[name], made[name]

    return get


@pytest.fixture(params=["llama3", "bytes"])
def vocab(request, compilers):
    """(tokenizer, compiler) over the real Llama 3 vocabulary, then the byte vocabulary."""
    return compilers(request.param)
