"""The infer and serve CLIs' re-exec with glibc's huge-page tunable (llama_jax/infer/huge_pages.py):
when it happens (jax's CPU backend alone, not switched off), the command line it starts again (the
interpreter's own flags kept), and once end to end in a child process."""

import json
import os
import subprocess
import sys

import pytest

from llama_jax.infer import huge_pages
from llama_jax.infer.huge_pages import OFF_SWITCH, TUNABLE, decide, reexec_argv

HOST = dict(glibc=True, thp_enabled=True, accelerator_installed=False)


@pytest.mark.parametrize("env, host, expected", [
    ({}, {}, True),  # a CPU-only install: jax can only pick its CPU backend
    ({"JAX_PLATFORMS": "cpu"}, {}, True),
    ({"JAX_PLATFORMS": "cpu"}, {"accelerator_installed": True}, True),  # cpu named: the plugin is not used
    ({}, {"accelerator_installed": True}, False),  # jax would pick the GPU / TPU first
    ({"JAX_PLATFORMS": "cuda"}, {}, False),
    ({"JAX_PLATFORMS": "gpu"}, {}, False),
    ({"JAX_PLATFORMS": "tpu"}, {}, False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, {}, False),
    ({"JAX_PLATFORM_NAME": "gpu"}, {}, False),
    ({OFF_SWITCH: "0"}, {}, False),
    ({OFF_SWITCH: "0", "JAX_PLATFORMS": "cpu"}, {}, False),
    ({OFF_SWITCH: "1"}, {}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}, False),  # the user's choice, or the re-exec done
    ({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, {}, True),
    ({}, {"glibc": False}, False),  # musl, macOS: no such tunable
    ({}, {"thp_enabled": False}, False),  # transparent huge pages [never]
])
def test_the_decision(env, host, expected):
    assert decide(env, **{**HOST, **host}) is expected


def test_the_command_line_started_again_keeps_the_interpreters_flags():
    args = ["--checkpoint", "ckpt", "--prompt", "a b"]
    orig = ["python3", "-X", "dev", "-W", "error::DeprecationWarning", "-O", "-m", "llama_jax.infer", *args]
    assert reexec_argv("llama_jax.infer", orig, ["/src/llama_jax/infer/__main__.py", *args], "/usr/bin/python3") == [
        "/usr/bin/python3", "-X", "dev", "-W", "error::DeprecationWarning", "-O", "-m", "llama_jax.infer", *args]
    assert reexec_argv("llama_jax.infer", ["python3", "-m", "llama_jax.infer"], ["x"], "/usr/bin/python3") == [
        "/usr/bin/python3", "-m", "llama_jax.infer"]
    # Not started as `-m llama_jax.infer ARGS` (runpy from another program): nothing to start again.
    assert reexec_argv("llama_jax.infer", ["python3", "tool.py", "--x"], ["x", "--x"], "/usr/bin/python3") is None
    assert reexec_argv("llama_jax.infer", orig, ["x", "--other"], "/usr/bin/python3") is None
    assert reexec_argv("llama_jax.infer", orig, ["x", *args], "") is None


def run_probe(**env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OFF_SWITCH, "JAX_PLATFORM_NAME")}
    env.update({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.check=0", **env_vars})  # a user's tunable
    out = subprocess.run([sys.executable, "-X", "utf8", "-W", "ignore::ResourceWarning", "-m",
                          "tests.infer.huge_pages_probe", "--flag", "a b"], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


needs_huge_pages = pytest.mark.skipif(not (huge_pages.glibc() and huge_pages.thp_enabled()),
                                      reason="needs Linux with glibc and transparent huge pages not [never]")


@needs_huge_pages
def test_a_cpu_process_starts_again_once_with_the_tunable_and_its_flags():
    seen = run_probe()
    assert seen["tunables"] == f"glibc.malloc.check=0:{TUNABLE}"  # only the started-again process has it
    assert seen["argv"] == ["--flag", "a b"]
    assert seen["orig_argv"] == ["-X", "utf8", "-W", "ignore::ResourceWarning", "-m", "tests.infer.huge_pages_probe",
                                 "--flag", "a b"]
    assert "ignore::ResourceWarning" in seen["warnoptions"] and "utf8" in seen["xoptions"]


@needs_huge_pages
@pytest.mark.parametrize("env", [{OFF_SWITCH: "0"}, {"JAX_PLATFORMS": "cuda"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}])
def test_no_start_again_when_switched_off_on_an_accelerator_or_chosen(env):
    seen = run_probe(**env)
    assert seen["tunables"] == env.get("GLIBC_TUNABLES", "glibc.malloc.check=0")
    assert seen["argv"] == ["--flag", "a b"]
