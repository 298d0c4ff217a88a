"""Tests run on CPU with 8 fake devices so mesh tests work anywhere; set before jax is imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two thirds of this suite's time was XLA:CPU compiling tiny programs, most of it LLVM optimizing
# code that then runs for milliseconds: tests (and the processes they start, which inherit
# XLA_FLAGS) compile without LLVM's optimizations. HLO passes, sharding and numerics are as in use.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from llama_jax.sharding.mesh import use_cpu_devices  # noqa: E402 (imports jax; devices come later)

use_cpu_devices(8)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_chat_model(tmp_path_factory):
    """A tiny SmolLM2-style HF model directory (tests/hf_chat_model.py), built once per session."""
    from tests import hf_chat_model

    return hf_chat_model.build(tmp_path_factory.mktemp("hf_chat_model"))
