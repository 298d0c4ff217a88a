"""bench/results.py: each script appends inside its own RESULTS.md section, keeping the others byte for
byte; the median timer times what it says."""

from bench import results
from bench.results import append_results, median_seconds, publish

SECTION = "## Attention kernels (bench/attention.py)"


def test_append_results_creates_then_appends_within_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    append_results(SECTION, "### run 1\n\n| a |\n", path)
    assert path.read_text() == f"# Benchmark results\n\n{SECTION}\n\n### run 1\n\n| a |\n"
    path.write_text(path.read_text() + "\n## Another script\n\n### theirs\n")
    append_results(SECTION, "### run 2\n\n| b |\n", path)
    assert path.read_text() == (f"# Benchmark results\n\n{SECTION}\n\n### run 1\n\n| a |\n\n### run 2\n\n| b |\n"
                                "\n## Another script\n\n### theirs\n")
    append_results("## Another script", "### mine", path)  # the last section, and nothing after it moves
    assert path.read_text().endswith("## Another script\n\n### theirs\n\n### mine\n")
    assert path.read_text().count("### run") == 2


def test_publish_prints_the_entry_and_appends_it_unless_told_not_to(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    entry = publish(SECTION, "### run", ["| a |", "| b |"], path=path)
    assert entry == "### run\n\n| a |\n| b |" and capsys.readouterr().out == entry + "\n"
    assert path.read_text().endswith(SECTION + "\n\n" + entry + "\n")
    publish(SECTION, "### not kept", ["| c |"], append=False, path=path)
    assert "not kept" not in path.read_text()


def test_median_seconds_is_the_median_of_the_timed_calls_after_the_warmup(monkeypatch):
    # A clock that advances by each call's duration: warm-ups take 100 s (never counted), then 3, 1, 2, 50, 4.
    durations = iter([100, 100, 3, 1, 2, 50, 4])
    clock, calls = [0.0], []

    def run():
        calls.append(clock[0])
        clock[0] += next(durations)

    monkeypatch.setattr(results.time, "perf_counter", lambda: clock[0])
    assert median_seconds(run, reps=5, warmup=2) == 3
    assert len(calls) == 7
