"""Transparent huge pages for XLA:CPU's per-call scratch buffer, which a serving process on CPU
page-faults in at every decode step otherwise.

XLA:CPU allocates one temporary buffer per call of a compiled program, holding every intermediate
of it: 47 MB for a 16-row decode step of bench/serve.py's quick model (the [rows, vocabulary]
logits and what sampling derives from them), more with more rows. That is above the largest mmap
threshold glibc's malloc allows (32 MB), so each call maps it afresh and touches it in 4 KiB
pages: measured here ~4,100 page faults and ~13 ms of kernel time a step. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) has malloc advise transparent huge pages on its mappings,
2 MiB pages: ~270 faults, and the step went from 31 to 24 ms. Tunables are read when the process
starts, so a CLI re-executes itself once with it set, before it loads anything.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted() -> bool:
    """Linux with glibc, transparent huge pages not switched off, and the tunable not yet set."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # set already: by this function before the re-exec, or by the user
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def reexec_with_huge_pages(module: str) -> None:
    """Re-execute `python -m module <same arguments>` with the tunable set (same process id, so
    signals and a supervisor's view are unchanged); returns without doing anything where it does not
    apply. Call it first thing under `if __name__ == "__main__":`."""
    if not wanted():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


__all__ = ["reexec_with_huge_pages", "wanted", "TUNABLE"]
