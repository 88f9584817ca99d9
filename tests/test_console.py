"""The console and the run log: what a long command writes (Python, native code, other libraries'
warnings) goes to the log named on the console's first line, gmpatl's own lines and warnings reach the
console, and a failure shows the log before its traceback; the progress view's lines and times."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gmpatl_ray.console import Progress, clock

SCRIPT = """
import os, sys, warnings
from gmpatl_ray import console

with console.run_log(sys.argv[1], "demo") as log:
    print("from python", flush=True)
    os.write(1, b"native stdout\\n")
    os.write(2, b"native stderr\\n")
    warnings.warn("a library's warning")
    warnings.warn_explicit("kept for the console", UserWarning, console.__file__, 1)  # as gmpatl's own
    console.say("said to the person")
    if len(sys.argv) > 2:
        raise RuntimeError("it broke")
print("after the log", flush=True)
"""


def run_script(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_run_log_takes_everything_but_what_gmpatl_says(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    [log] = (tmp_path / "out" / "logs").glob("demo-*.log")
    assert first == f"log: {log} (Ray's and the workers' output)"
    assert rest == ["said to the person", "after the log"]  # nothing else reached the console's stdout
    assert result.stderr == "warning: kept for the console\n"  # gmpatl's warning; not the library's
    written = log.read_text()
    for line in (
        "from python",
        "native stdout",
        "native stderr",
        "a library's warning",
        "said to the person",
    ):
        assert line in written, line
    assert "after the log" not in written


def test_a_failure_shows_the_log_then_goes_on(tmp_path):
    result = run_script(tmp_path, "fail")
    assert result.returncode == 1
    [log] = (tmp_path / "out" / "logs").glob("demo-*.log")
    shown = result.stderr.split(f"---- the run log {log} ----\n")[1]
    body, after = shown.split(f"---- end of the run log {log} ----\n")
    assert body == log.read_text()  # the whole log (it is short)
    assert "native stderr" in body and "RuntimeError: it broke" in after


def test_progress_lines_and_times(monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    view = Progress("cv demo", ["fold 1", "fold 2"], {"stage1": 2, "features": 1, "stage3": 1})
    assert view.total == 8
    with view.step("fold 1", "stage1"):
        now[0] += 30
        state = {"epochs": 2, "batch": 0, "batches": 4}
        view.epoch("fold 1", "stage1", state | {"history": [{"epoch": 0, "train_loss": 1.5, "val_uar": 0.4}]})
        view.epoch("fold 1", "stage1", state | {"history": [{"epoch": 0, "train_loss": 1.5, "val_uar": 0.4}]})
        assert view.done() == 1  # one epoch of two, and the second read changed nothing
        now[0] += 30
        history = [
            {"epoch": 0, "train_loss": 1.5, "val_uar": 0.4},
            {"epoch": 1, "train_loss": 1.0, "val_uar": 0.5},
        ]
        view.epoch("fold 1", "stage1", state | {"history": history})
    with view.step("fold 1", "features") as step:
        step.reused = True
    assert view.done() == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[1/2] fold 1 · stage1 · epoch 1/2 · loss 1.500 · val UAR 40.0% · 0:30 elapsed, ~3:30 left",
        "[1/2] fold 1 · stage1 · epoch 2/2 · loss 1.000 · val UAR 50.0% · 1:00 elapsed, ~3:00 left",
        "[1/2] fold 1 · features · reused from the cache · 1:00 elapsed, ~1:40 left",
    ]
    with view.step("fold 2", "stage1"):
        view.epoch("fold 2", "stage1", {"epochs": 2, "batch": 2, "batches": 4, "history": []})
        assert view.status() == "cv demo: fold 2 stage1 epoch 1/2 batch 2/4 · 1:00 elapsed, ~1:17 left"


@pytest.mark.parametrize(("seconds", "shown"), [(5, "0:05"), (65, "1:05"), (3725, "1:02:05")])
def test_clock(seconds, shown):
    assert clock(seconds) == shown
