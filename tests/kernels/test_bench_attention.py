"""bench/attention.py keeps other scripts' results: it appends inside its own section."""

import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "attention.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_append_results_creates_then_appends_within_its_section(tmp_path):
    bench = _bench_module()
    path = tmp_path / "RESULTS.md"
    bench.append_results(path, "### run 1\n\n| a |\n")
    path.write_text(path.read_text() + "\n## Another script\n\n### theirs\n")
    bench.append_results(path, "### run 2\n\n| b |\n")
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert text.count(bench.SECTION) == 1
    assert text.index("run 1") < text.index("run 2") < text.index("## Another script")
    assert "### theirs" in text


def test_markdown_table_has_one_column_per_impl():
    bench = _bench_module()
    table = bench.markdown([["fwd TFLOP/s", "1024", "32", "1", "2", "3", "4"]])
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 3 + len(bench.IMPLS) + 1
