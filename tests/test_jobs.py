"""`ray job submit` on a multi-node cluster in a box: a head and two worker nodes on this machine, each a
`ray start` of its own (its own raylet, object store, temp dir and ports, as on separate machines), the
head with no CPUs, so all work goes to the workers. The demo CV of one fold is submitted as a job with this
repository as its working dir, its stages' DDP workers spread over the two nodes; everything it writes
lands in the one output_dir (the shared storage of a real cluster), nothing in any node's temp dir or the
job's working dir, and every worker runs somewhere else than the job's working dir. Then the nodes are
stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, small_config
from mlflow import MlflowClient

from gmpatl_ray.config import dump_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(*args: str, temp: Path, env: dict[str, str]) -> subprocess.Popen:
    """``ray start --block`` in its own process group, so stopping it leaves the test session's own
    local cluster alone (``ray stop`` would stop every Ray on the machine). Every port it would otherwise
    take at a fixed default is a free one (with the session's cluster holding the job agent's default
    port, a second agent never came up). Its temp dir is short: Ray's Unix sockets live there and their
    paths may not exceed 107 bytes."""
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            *args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_port(port: int, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{what} did not come up in {timeout} s")


@pytest.fixture
def cluster_in_a_box(tmp_path):
    """(GCS address, job API address, environment for `ray` commands and clients, the nodes' temp dirs).
    Token authentication is on, with a token of the fixture's own given to every node and client (as a
    real cluster's nodes must share one)."""
    gcs, dashboard = free_port(), free_port()
    temps = [Path(tempfile.mkdtemp(prefix=f"ray{name}", dir="/tmp")) for name in ("h", "a", "b")]
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env |= {"RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    head = [
        "--head",
        f"--port={gcs}",
        "--num-cpus=0",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
    ]
    nodes = [start_node(*head, temp=temps[0], env=env)]
    try:
        wait_for_port(gcs, "the head's GCS")
        nodes += [
            start_node(f"--address=127.0.0.1:{gcs}", "--num-cpus=2", temp=t, env=env) for t in temps[1:]
        ]
        wait_for_port(dashboard, "the head's job API")
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, temps
    finally:
        # Whole groups at once (GCS, raylets, dashboard, workers): `ray start --block` takes over 10 s to
        # stop on SIGTERM, and nothing of these throwaway nodes needs a clean shutdown.
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def wait_for_nodes(address: str, env: dict[str, str], count: int, timeout: float = 120) -> None:
    check = "import ray; ray.init(); n = sum(x['Alive'] for x in ray.nodes()); print('nodes', n)"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", check], env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True
        ).stdout
        if f"nodes {count}" in out:
            return
        time.sleep(2)
    pytest.fail(f"{count} nodes did not join in {timeout} s")


def submit_when_ready(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the head's job agent is still starting (the dashboard port opens
    first; Ray answers "No available agent to submit job, please try again later")."""
    for _ in range(30):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
        if result.returncode == 0 or "No available agent" not in result.stdout + result.stderr:
            return result
        time.sleep(2)
    return result


WRITTEN = ("*.parquet", "_COMPLETE.json", "manifest.csv", "mlflow.db", "*.safetensors", "heads.pt", "*.png")
"""What the run writes; none of it may be anywhere but the output_dir."""


def test_the_demo_cv_runs_as_a_job_on_several_nodes_and_writes_only_to_the_output_dir(
    cluster_in_a_box, small_corpus, tmp_path
):
    gcs, address, env, temps = cluster_in_a_box
    folder, _ = small_corpus
    shared = tmp_path / "shared"  # the one storage every node sees
    config = small_config(
        folder,
        f"experiment.output_dir={shared}",
        f"experiment.cache_dir={shared / 'cache'}",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.placement_strategy=SPREAD",  # PACK would put both on one 2-CPU node
        "train.max_failures=0",
        "train.val_fraction=0.25",
        "extract.actors=2",
        "stage1.optim={lr: 3.0e-3, batch_size: 8, epochs: 1}",
        "stage2.optim={lr: 1.0e-3, batch_size: 8, epochs: 1}",
        "stage3.optim={lr: 3.0e-3, batch_size: 8, epochs: 1}",
        "stage1.lstm_hidden=16",
        "stage1.proj_dim=16",
        "stage2.proj_dim=16",
        "tracking.experiment=job-test",
    )
    config_file = tmp_path / "job.yaml"
    config_file.write_text(dump_config(config))
    wait_for_nodes(gcs, env, 3)
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
            *[sys.executable, "jobs/cv.py", "--config", str(config_file), "--folds", "1"],
        ],
        env,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout and "fold 1: WAR" in submit.stdout, submit.stdout[-4000:]
    # The job ran in the head's copy of the working dir; each worker in its own node's.
    copies = temps[0].glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
    found = [p for p in copies if p.is_dir()]
    assert len(found) == 1, [(p, sorted(os.listdir(p))[:10]) for p in found]
    job_cwd = found[0]

    stages = {}
    for marker in shared.glob("cache/stage*/*/_COMPLETE.json"):
        stages[marker.parent.parent.name] = json.loads(marker.read_text())["meta"]
    assert sorted(stages) == ["stage1", "stage2", "stage3"]
    for stage, meta in stages.items():
        workers = meta["workers"]
        assert [w["rank"] for w in workers] == [0, 1] and {w["device"] for w in workers} == {"cpu"}, stage
        assert len({w["node_id"] for w in workers}) == 2, (stage, workers)  # one rank on each node
        homes = sorted(next(i for i, t in enumerate(temps) if w["cwd"].startswith(f"{t}/")) for w in workers)
        assert homes == [1, 2] and str(job_cwd) not in {w["cwd"] for w in workers}, (stage, workers)
    assert list(shared.glob("cache/features/*/parquet/*.parquet")) and list(
        shared.glob("cache/gmp/*/labels.parquet")
    )

    stray = [p for temp in temps for pattern in WRITTEN for p in temp.rglob(pattern)]
    assert stray == [], stray  # not in any node's temp dir, the job's working dir copy included

    client = MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("job-test").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert runs["cv-gmpatl-demo"].info.status == "FINISHED"
    assert runs["fold-1"].data.tags["mlflow.parentRunId"] == runs["cv-gmpatl-demo"].info.run_id
    assert runs["fold-1"].data.metrics["test_uar"] == pytest.approx(stages["stage3"]["test"]["uar"], abs=1e-4)
    assert len(runs["fold-1-stage1"].data.tags["gmpatl.workers"].split()) == 2
