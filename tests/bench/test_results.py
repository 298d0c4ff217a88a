"""bench/results.py: each script appends inside its own RESULTS.md section, keeping the others."""

from bench.results import append_results, publish

SECTION = "## Attention kernels (bench/attention.py)"


def test_append_results_creates_then_appends_within_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    append_results(SECTION, "### run 1\n\n| a |\n", path)
    path.write_text(path.read_text() + "\n## Another script\n\n### theirs\n")
    append_results(SECTION, "### run 2\n\n| b |\n", path)
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert text.count(SECTION) == 1
    assert text.index("run 1") < text.index("run 2") < text.index("## Another script")
    assert "### theirs" in text


def test_publish_prints_the_entry_and_appends_it_unless_told_not_to(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    entry = publish(SECTION, "### run", ["| a |", "| b |"], path=path)
    assert entry == "### run\n\n| a |\n| b |" and capsys.readouterr().out == entry + "\n"
    assert path.read_text().endswith(SECTION + "\n\n" + entry + "\n")
    publish(SECTION, "### not kept", ["| c |"], append=False, path=path)
    assert "not kept" not in path.read_text()
