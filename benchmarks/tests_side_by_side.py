"""Two test runs one after the other against the same two side by side: does pytest-xdist pay on this box?

Each pytest process is the suite as CI runs it, limited to one test (its own session fixtures, its own local
Ray cluster); the pair runs twice, first sequentially, then both processes at once. If the side-by-side
wall time is not well under the sequential one, the cores are already busy and parallel test processes
would only add each session's fixtures.

    .venv/bin/python benchmarks/tests_side_by_side.py [TEST_A TEST_B]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = [
    "tests/test_sweep.py::test_the_papers_table4_runs_as_a_sweep_and_reports",
    "tests/test_faults.py::test_a_worker_killed_in_stage1_is_replaced_and_the_stage_ends_as_if_it_was_not",
]


def pytest(test: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finished(process: subprocess.Popen, test: str) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{test} failed (exit {process.returncode}); rerun it alone to see why")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="*", default=DEFAULT)
    tests = parser.parse_args().tests
    alone = []
    for test in tests:
        started = time.perf_counter()
        finished(pytest(test), test)
        alone.append(time.perf_counter() - started)
        print(f"alone        {alone[-1]:6.1f} s  {test}", flush=True)
    started = time.perf_counter()
    processes = [pytest(test) for test in tests]
    for process, test in zip(processes, tests, strict=True):
        finished(process, test)
    together = time.perf_counter() - started
    print(f"sequential   {sum(alone):6.1f} s")
    print(f"side by side {together:6.1f} s  ({together / sum(alone):.2f}x the sequential time)")


if __name__ == "__main__":
    main()
