"""bench/device_check.py --quick on CPU: every kernel path checked against the reference (interpreted),
every section in the table, and nothing imported that the GPU image lacks."""

import json
import subprocess
import sys

from bench import device_check


def test_quick_run_passes_every_correctness_check_and_reports_every_section(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    results_md = tmp_path / "RESULTS.md"
    # Budgets sized for an H200 would skip checks on a busy CPU: scaled out of the way.
    results = device_check.main(["--quick", "--results", str(results_md), "--budget-scale", "20"])

    correctness = [r for r in results if r.section == "correctness" and r.status != "SKIP"]
    assert len(correctness) >= 8
    assert all(r.status == "PASS" for r in correctness), [(r.check, r.shape, r.value) for r in correctness]
    assert {r.section for r in results} == set(device_check.SECTIONS)
    assert not [r for r in results if r.status == "ERROR"]
    flash_f32 = next(r for r in correctness if r.check.startswith("flash_attention") and "float32" in r.shape)
    assert flash_f32.value.startswith("max ")
    assert {"paged_attention (triton, ours)", "paged_attention(impl=pallas)"} <= {r.check for r in correctness}
    paged_decode = next(r for r in results if r.check == "paged decode pallas (ours)")
    assert paged_decode.status == "INFO" and paged_decode.value.endswith("GB/s")
    speculative = next(r for r in results if r.check == "speculative decode (ngram) vs plain")
    assert speculative.status == "INFO" and "guesses kept" in speculative.compare, speculative
    assert "flash_attention by positions, cp shard (ours)" in {r.check for r in correctness}

    table = results_md.read_text()
    assert device_check.SECTION in table
    for section in device_check.SECTIONS:
        assert f"| {section} |" in table
    saved = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert len(saved["results"]) == len(results)
    assert "correctness: done" in (tmp_path / "out" / "device_check.log").read_text()


def test_budget_skips_the_rest_of_a_section():
    results = []
    phase = device_check.Phase("timing", 0.0, device_check.Log(), results)
    phase.start -= 1.0
    phase.run("never run", "-", lambda: 1 / 0)
    assert results[0].status == "SKIP"


def test_a_failing_check_is_recorded_and_the_next_still_runs():
    results = []
    phase = device_check.Phase("correctness", 60.0, device_check.Log(), results)
    phase.run("raises", "-", lambda: (_ for _ in ()).throw(RuntimeError("line 1\nline 2")))
    phase.run("passes", "-", lambda: ("PASS", "ok", ""))
    assert [r.status for r in results] == ["ERROR", "PASS"]
    assert results[0].value == "RuntimeError: line 1"
    assert "line 2" in results[0].error


def test_imports_neither_grain_nor_llama_models():
    # The GPU image has neither; a fresh interpreter, as other tests may have imported them here.
    code = ("import sys; import bench.device_check; "
            "print([m for m in sys.modules if m.startswith(('grain', 'llama_models'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
