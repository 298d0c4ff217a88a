"""The serve CLI's re-exec with glibc's huge-page tunable (llama_jax/infer/huge_pages.py)."""

import json
import os
import subprocess
import sys

from llama_jax.infer import huge_pages


def run_probe(env_tunables=None):
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if env_tunables is not None:
        env["GLIBC_TUNABLES"] = env_tunables
    out = subprocess.run([sys.executable, "-m", "tests.infer.huge_pages_probe", "--flag", "a b"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_reexec_sets_the_tunable_once_and_keeps_the_arguments(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    applies = huge_pages.wanted()
    seen = run_probe("glibc.malloc.check=0")  # a tunable the user set is kept
    assert seen["argv"] == ["--flag", "a b"]
    if applies:  # Linux + glibc with THP not off: only the re-executed run prints
        assert seen["tunables"] == f"glibc.malloc.check=0:{huge_pages.TUNABLE}"
    else:
        assert seen["tunables"] == "glibc.malloc.check=0"


def test_no_reexec_when_the_user_chose_a_hugetlb_setting(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert not huge_pages.wanted()
    assert run_probe("glibc.malloc.hugetlb=0")["tunables"] == "glibc.malloc.hugetlb=0"
