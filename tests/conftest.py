"""Tests run on CPU with 8 fake devices so mesh tests work anywhere; set before jax is imported."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two thirds of this suite's time was XLA:CPU compiling tiny programs, most of it LLVM optimizing
# code that then runs for milliseconds: tests (and the processes they start, which inherit
# XLA_FLAGS) compile without LLVM's optimizations. XLA's own passes and the sharding are as in use,
# and every comparison with a reference keeps its tolerance.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# torch (the HF references) would start an OpenMP pool of a thread per core in each of the two xdist
# workers, spinning against each other and XLA on a 2-core host for its tiny matmuls: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests rebuild the same small programs in fresh jit closures, other workers and child processes:
# one compilation cache for this run (made by the first process to import this file, whose
# environment the xdist workers and children inherit; it removes the cache at the end).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama_jax_tests_compiled_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from llama_jax.sharding.mesh import use_cpu_devices  # noqa: E402 (imports jax; devices come later)

use_cpu_devices(8)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_chat_model(tmp_path_factory):
    """A tiny SmolLM2-style HF model directory (tests/hf_chat_model.py), built once per session."""
    from tests import hf_chat_model

    return hf_chat_model.build(tmp_path_factory.mktemp("hf_chat_model"))


def pytest_sessionfinish(session):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
