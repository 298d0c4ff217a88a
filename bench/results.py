"""What the bench scripts share: bench/RESULTS.md, where each script owns a `## ...` section and
appends its runs at the section's end (with the machine and commit), and the median timer."""

from __future__ import annotations

import os
import pathlib
import platform
import statistics
import subprocess
import time

import psutil

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def append_results(section: str, entry: str, path: pathlib.Path = RESULTS) -> None:
    """Add `entry` at the end of `section`, creating the file or the section if missing."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    start = text.index(section) + len(section)
    following = text.find("\n## ", start)
    end = len(text) if following < 0 else following + 1
    body = text[start:end].rstrip("\n") + "\n\n" + entry.strip("\n") + "\n"
    path.write_text(text[:start] + body + ("\n" + text[end:] if end < len(text) else ""))


def publish(section: str, header: str, lines: list[str], *, append: bool = True,
            path: pathlib.Path = RESULTS) -> str:
    """Print one run's entry (`header`, a blank line, its table `lines`) and, unless told not to,
    append it to `section` of bench/RESULTS.md; returns the entry."""
    entry = header + "\n\n" + "\n".join(lines)
    print(entry)
    if append:
        append_results(section, entry, path)
    return entry


def git_commit(*paths: str) -> str:
    """HEAD's short hash, with '-dirty' when `paths` (relative to the repository root) have changes."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """CPU model, cores and memory of this host, as one phrase."""
    cpu = platform.processor() or platform.machine()
    try:  # psutil knows no CPU model name; Linux says it in /proc/cpuinfo
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def median_seconds(run, reps: int, warmup: int = 0) -> float:
    """Median wall seconds of `reps` calls of run() after `warmup` untimed ones; run() must block
    until its work is done."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
