"""`python [flags] -m tests.infer.huge_pages_probe ARGS`: re-executes itself as the infer and serve
CLIs do, then prints what the final process sees (test_huge_pages.py)."""

import json
import os
import sys

from llama_jax.infer.huge_pages import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages("tests.infer.huge_pages_probe")
    print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                      "orig_argv": sys.orig_argv[1:], "warnoptions": sys.warnoptions,
                      "xoptions": sorted(sys._xoptions)}))
