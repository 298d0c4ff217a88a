"""bench/attention.py: its table has a column per attention implementation."""

import importlib


def _bench_module():
    return importlib.import_module("bench.attention")


def test_markdown_table_has_one_column_per_impl():
    bench = _bench_module()
    table = bench.markdown([["fwd TFLOP/s", "1024", "32", "1", "2", "3", "4"]])
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 3 + len(bench.IMPLS) + 1
