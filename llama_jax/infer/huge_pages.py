"""Transparent huge pages for XLA:CPU's per-call scratch buffer, which a serving process on CPU
page-faults in at every decode step otherwise.

XLA:CPU allocates one temporary buffer per call of a compiled program, holding every intermediate
of it (a decode step's [rows, vocabulary] logits and what sampling derives from them). That is
above the largest mmap threshold glibc's malloc allows (32 MB), so each call maps it afresh and
touches it in 4 KiB pages. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) has malloc
advise transparent huge pages on its mappings, 2 MiB pages: far fewer faults and faster steps
(bench/RESULTS.md, "Huge pages"). Tunables are read when the process starts, so a CLI re-executes
itself once with it set, before it loads anything.

When it does (`wanted`), decided without starting a jax backend:
- not when LLAMA_JAX_HUGE_PAGES=0 (the off switch), nor when GLIBC_TUNABLES already names a
  glibc.malloc.hugetlb setting (the user's, or this function's before the re-exec);
- only on Linux with glibc, transparent huge pages not switched off ([never]);
- only for jax's CPU backend: JAX_PLATFORMS (or JAX_PLATFORM_NAME) set to cpu alone; where neither
  is set, only when no accelerator plugin is installed (jax-cuda / jax-rocm plugins, libtpu), since
  jax would pick that backend first: set JAX_PLATFORMS=cpu to have it there. A GPU or TPU process
  gains nothing from it, and its allocator is not one to change unasked;
- only when this process was started as `python [interpreter flags] -m MODULE ARGS`, which it
  starts again the same way (sys.orig_argv: -X, -W, -O and the like kept).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import pkgutil
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
OFF_SWITCH = "LLAMA_JAX_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
HELP = (f"On jax's CPU backend the process starts itself again once with GLIBC_TUNABLES={TUNABLE} (faster "
        f"decode steps: llama_jax/infer/huge_pages.py says when); {OFF_SWITCH}=0 turns that off.")


def decide(environ: Mapping[str, str], *, glibc: bool, thp_enabled: bool, accelerator_installed: bool) -> bool:
    """The rule of the module docstring, on the environment and the facts of this host."""
    if environ.get(OFF_SWITCH, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False  # set already: before the re-exec, or by the user
    if not (glibc and thp_enabled):
        return False
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    if platforms.strip():
        return {p.strip().lower() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not accelerator_installed


def reexec_argv(module: str, orig_argv: Sequence[str], argv: Sequence[str], executable: str) -> list[str] | None:
    """`executable [the interpreter's flags] -m module ARGS`, as `orig_argv` (sys.orig_argv) started
    this process; None where it was not started as `-m module` with these `argv` (sys.argv): run
    some other way (runpy, an embedding program), it could not be started again the same way."""
    tail = ["-m", module, *argv[1:]]
    if not executable or len(orig_argv) <= len(tail) or list(orig_argv[-len(tail):]) != tail:
        return None
    return [executable, *orig_argv[1:-len(tail)], *tail]


def glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def thp_enabled() -> bool:
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def accelerator_installed() -> bool:
    """A PJRT plugin jax would try before its CPU backend, found as jax finds them (the jax_plugins
    namespace package and entry point group; libtpu) without importing jax."""
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return True
    plugins = importlib.util.find_spec("jax_plugins")  # a namespace package that only plugins install
    return plugins is not None and any(True for _ in pkgutil.iter_modules(plugins.submodule_search_locations))


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """`decide` on this process's environment and host."""
    environ = os.environ if environ is None else environ
    return decide(environ, glibc=glibc(), thp_enabled=thp_enabled(), accelerator_installed=accelerator_installed())


def reexec_with_huge_pages(module: str) -> None:
    """Re-execute `python [flags] -m module <same arguments>` with the tunable set (same process id,
    so signals and a supervisor's view are unchanged); returns without doing anything where it does
    not apply (the module docstring). Call it first thing under `if __name__ == "__main__":`."""
    if not wanted():
        return
    argv = reexec_argv(module, sys.orig_argv, sys.argv, sys.executable)
    if argv is None:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


__all__ = ["reexec_with_huge_pages", "wanted", "decide", "reexec_argv", "TUNABLE", "OFF_SWITCH", "HELP"]
