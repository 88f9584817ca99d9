"""Security defaults: loopback-only services, checkpoints that cannot run code, no remote code, another
config's checkpoint refused, and no secret from the environment in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient

from gmpatl_ray.tracking import Tracker
from gmpatl_ray.training import CheckpointMismatch, load_state, save_state

PACKAGE = Path(__file__).parent.parent / "gmpatl_ray"


class RunsCode:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_of_another_fingerprint_is_refused(tmp_path):
    save_state(tmp_path, {"model": {"w": torch.ones(2)}, "fingerprint": "stage1-aaaa"})
    assert load_state(tmp_path, "stage1-aaaa")["model"]["w"].tolist() == [1.0, 1.0]
    with pytest.raises(
        CheckpointMismatch, match=r"state.pt: written by stage run 'stage1-aaaa', not 'stage1-bbbb'"
    ):
        load_state(tmp_path, "stage1-bbbb")


def test_a_checkpoint_that_would_run_code_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": RunsCode(marker), "fingerprint": "x"}, tmp_path / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_state(tmp_path, "x")
    assert not marker.exists()


def test_no_remote_code_is_ever_trusted():
    offenders = [p.name for p in PACKAGE.rglob("*.py") if "trust_remote_code" in p.read_text()]
    assert offenders == []
    for path in PACKAGE.rglob("*.py"):  # every torch.load in the package refuses pickled code
        calls = path.read_text().split("torch.load(")[1:]
        assert all("weights_only=True" in call.split(")")[0] for call in calls), path


def test_secrets_from_the_environment_are_never_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    tracker = Tracker("secrets", None, tmp_path)
    run = tracker.start("cv")
    tracker.params(
        run,
        {
            "backbone.pretrained": "https://user:hf_abcdef123456@example.org/hubert",
            "storage": "s3://bucket?secret=wJalrXUtnFEMI/K7MDENG",
            "db_password": "anything",
            "stage1.alpha_e": 0.9,
        },
    )
    tracker.tags(run, {"note": "token hf_abcdef123456", "fold": "1"})
    tracker.end(run)
    logged = MlflowClient(tracking_uri=tracker.uri).get_run(run).data
    assert logged.params == {"stage1.alpha_e": "0.9"}
    assert "note" not in logged.tags and logged.tags["fold"] == "1"


@pytest.mark.slow
def test_a_local_ray_cluster_serves_its_dashboard_and_job_api_on_loopback_only():
    """The cluster `gmpatl` starts when no RAY_ADDRESS is set: its dashboard (and job API) port listens
    on 127.0.0.1 and nowhere else."""
    script = (
        "import sys, ray; from gmpatl_ray.runtime import init_ray; init_ray(); "
        "print(ray._private.worker.get_dashboard_url(), flush=True); sys.stdin.read()"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        url = proc.stdout.readline().strip()
        host, port = url.rsplit(":", 1)
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)
        }
        assert host == "127.0.0.1" and listening == {"127.0.0.1"}, (url, listening)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
