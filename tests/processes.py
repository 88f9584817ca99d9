"""Helpers for tests that run real processes: free ports, waiting, process groups, an MLflow server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float = 240) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def start_group(args: list[str], **kwargs) -> subprocess.Popen:
    """A process in its own process group: killing the group is the machine going away under it (the
    driver and the local Ray cluster it started)."""
    return subprocess.Popen(args, start_new_session=True, text=True, **kwargs)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group and every process descended from its leader: Ray starts some of its
    processes (the train workers among them) outside the group, and those would otherwise go on training
    and checkpointing after "the machine went away", racing the rerun."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


class MlflowServer:
    """A real MLflow tracking server on 127.0.0.1 over a SQLite store in ``folder``, which a test can stop
    and start again (same port, same store). Runs' artifacts go where the client puts them."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.store = folder / "server.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.running: list[subprocess.Popen] = []

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def start(self) -> None:
        args = ["server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        args += ["--backend-store-uri", f"sqlite:///{self.store}"]
        self.running.append(
            start_group([str(BIN / "mlflow"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        wait_for("the MLflow server", self.healthy, timeout=120)

    def stop(self) -> None:
        kill_group(self.running.pop())

    def stop_all(self) -> None:
        while self.running:
            self.stop()
