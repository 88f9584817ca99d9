"""`ray job submit` end to end: a real Ray head (`ray start --head`, token authentication on, dashboard on
127.0.0.1), the demo CV of one fold submitted as a job with this repository as its working dir, the
results checked in MLflow; then the head is stopped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_TRAINING, small_config
from mlflow import MlflowClient

from gmpatl_ray.config import dump_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A separate Ray head in its own process group (``--block``), so stopping it leaves the test
    session's own local cluster alone (``ray stop`` would stop every Ray on the machine). Every port it
    would otherwise take at a fixed default is a free one: with the session's cluster already holding the
    job agent's default port (52365), the head's agent never came up ("No available agent"). Its temp dir
    is short: Ray's Unix sockets live there and their paths may not exceed 107 bytes."""
    dashboard = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rayhead", dir="/tmp"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", dashboard), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the Ray head's job API did not come up in 120 s")
        yield address, env
    finally:
        # The whole group at once (GCS, raylet, dashboard, workers): `ray start --block` takes over 10 s
        # to stop on SIGTERM, and nothing of this throwaway head needs a clean shutdown.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def submit_when_ready(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the head's job agent is still starting (the dashboard port opens
    first; Ray answers "No available agent to submit job, please try again later")."""
    for _ in range(30):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode == 0 or "No available agent" not in result.stdout + result.stderr:
            return result
        time.sleep(2)
    return result


def test_the_demo_cv_runs_as_a_submitted_job(ray_head, small_corpus, trained_fold, tmp_path):
    address, env = ray_head
    folder, _ = small_corpus
    cache, trained = trained_fold  # the stages have tests of their own; this one is about `ray job submit`
    config = small_config(
        folder,
        f"experiment.output_dir={tmp_path / 'out'}",
        f"experiment.cache_dir={cache}",
        f"train.storage_path={tmp_path / 'ray'}",
        "tracking.experiment=job-test",
        "tracking.log_model=false",
        *TINY_TRAINING,
    )
    config_file = tmp_path / "job.yaml"
    config_file.write_text(dump_config(config))
    submit = submit_when_ready(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            sys.executable,
            "jobs/cv.py",
            "--config",
            str(config_file),
            "--folds",
            "1",
        ],
        {**env, "RAY_AUTH_MODE": "token"},
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout and "fold 1: WAR" in submit.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("job-test").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert runs["cv-gmpatl-demo"].info.status == "FINISHED"
    assert runs["fold-1"].data.metrics["test_uar"] == pytest.approx(trained.uar, abs=1e-4)
    assert runs["fold-1"].data.tags["mlflow.parentRunId"] == runs["cv-gmpatl-demo"].info.run_id
