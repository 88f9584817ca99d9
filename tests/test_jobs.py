"""A cluster in a box, started as the launcher starts one from cluster.yaml: a head and two worker nodes
on this machine, each its start command from cluster.yaml (`ray start` with token authentication), with a
HOME of its own holding only the token that file_mounts copies there, and its own raylet, object store, temp
dir and ports, as on separate machines; the head has no CPUs, so all work goes to the workers. It refuses
every caller without the token. The demo CV of one fold is submitted to it as a job with this repository
as its working dir, its stages' DDP workers spread over the two nodes; everything it writes lands in the
one output_dir (the shared storage of a real cluster), nothing in any node's temp dir or the job's working
dir, and every worker runs somewhere else than the job's working dir. Then the nodes are stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import REPO, small_config
from mlflow import MlflowClient
from processes import BIN, free_port, start_group

from gmpatl_ray.config import dump_config

pytestmark = pytest.mark.slow


def wait_for_port(port: int, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{what} did not come up in {timeout} s")


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


def start_commands(node_type: str) -> str:
    """The node's start commands from cluster.yaml, as one shell script, without its `ray stop` (which
    would stop every Ray on this machine, the suite's own cluster included)."""
    import yaml

    launcher = yaml.safe_load((REPO / "cluster.yaml").read_text())
    commands = launcher[f"{node_type}_start_ray_commands"]
    assert commands[0] == "ray stop"
    return "\n".join(commands[1:])


def ray_processes_of(temp: Path) -> list:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(temp) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def start_a_node(
    script: str, env: dict[str, str], timeout: float = 180
) -> tuple[subprocess.CompletedProcess, int]:
    """A start command, run in a session of its own; returns what it printed and the session, which every
    process `ray start` leaves behind keeps (the Ray Client server among them: its command line names no
    temp dir)."""
    proc = start_group(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def stop_nodes(sessions: list[int], temps: list[Path]) -> None:
    """SIGKILL every process the start commands left (by their sessions and their temp dirs), wait for
    them, and remove the temp dirs. Nothing of these throwaway nodes needs a clean shutdown, and `ray stop`
    would stop every Ray on the machine, the suite's own cluster included."""
    found = {p.pid: p for temp in temps for p in ray_processes_of(temp)}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) in sessions:
                found[process.pid] = process
    for process in found.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(found.values()), timeout=30)
    for temp in temps:
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class LaunchedCluster:
    gcs: str  # the head's GCS address
    job_api: str  # the head's job API (dashboard) address
    client: dict[str, str]  # the environment of a caller holding the token
    stranger: dict[str, str]  # the environment of a caller with no token anywhere
    temps: list[Path]  # the nodes' temp dirs: head, worker a, worker b
    token: str
    printed: str  # what the start commands printed


def start_script(node_type: str, temp: Path, *, gcs: int, dashboard: int = 0) -> str:
    """cluster.yaml's start command for ``node_type`` with this box's own ports and temp dir; every port
    it would otherwise take at a fixed default is a free one. (Temp dirs are short: Ray's Unix sockets
    live there and their paths may not exceed 107 bytes.)"""
    common = (
        f" --object-manager-port={free_port()} --dashboard-agent-listen-port={free_port()} --temp-dir={temp}"
        " --node-ip-address=127.0.0.1 --disable-usage-stats"
    )
    if node_type == "head":
        script = start_commands("head").replace("--port=6379", f"--port={gcs}")
        script = script.replace("--autoscaling-config=~/ray_bootstrap_config.yaml", "")  # no launcher here
        return (
            script.replace(" --object-manager-port=8076", "")
            + common
            + f" --dashboard-port={dashboard} --num-cpus=0"
        )
    script = start_commands("worker").replace("$RAY_HEAD_IP:6379", f"127.0.0.1:{gcs}")
    return script.replace(" --object-manager-port=8076", "") + common + " --num-cpus=2"


def token_path_on_a_node() -> Path:
    """Where file_mounts puts the token, relative to the container user's HOME."""
    import yaml

    mounts = yaml.safe_load((REPO / "cluster.yaml").read_text())["file_mounts"]
    (target,) = [t for t, source in mounts.items() if "auth-token" in source]
    return Path(target).relative_to("/home/ray")


@pytest.fixture(scope="module")
def launched_cluster(tmp_path_factory):
    """The head's and then each worker's start command, as the launcher runs them, each node's HOME
    holding the token; yields once all three nodes have joined; then every process of the three nodes
    is killed (nothing of these throwaway nodes needs a clean shutdown, and `ray stop` would stop every
    Ray on the machine, the suite's own cluster included)."""
    here = tmp_path_factory.mktemp("launched")
    gcs, dashboard = free_port(), free_port()
    temps = [Path(tempfile.mkdtemp(prefix=f"ray{name}", dir="/tmp")) for name in ("h", "a", "b")]
    token = secrets.token_hex(32)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "PATH": f"{BIN}:{os.environ['PATH']}"
    }
    homes = [here / name for name in ("head", "worker-a", "worker-b")]
    for home in homes:
        (home / token_path_on_a_node()).parent.mkdir(parents=True)
        (home / token_path_on_a_node()).write_text(token)
    stranger = {**base, "HOME": str(here / "stranger")}
    client = {
        **stranger,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(homes[0] / token_path_on_a_node()),
    }
    printed, sessions = "", []

    def start(script: str, home: Path) -> None:
        nonlocal printed
        started, session = start_a_node(script, {**base, "HOME": str(home)})
        sessions.append(session)
        assert started.returncode == 0, started.stderr[-3000:]
        printed += started.stdout + started.stderr

    try:
        start(start_script("head", temps[0], gcs=gcs, dashboard=dashboard), homes[0])
        wait_for_port(dashboard, "the head's job API")
        for temp, home in zip(temps[1:], homes[1:], strict=True):
            start(start_script("worker", temp, gcs=gcs), home)
        wait_for_nodes(f"127.0.0.1:{gcs}", client, 3)
        yield LaunchedCluster(
            f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", client, stranger, temps, token, printed
        )
    finally:
        stop_nodes(sessions, temps)


def test_the_cluster_refuses_callers_without_the_token_and_its_nodes_refuse_to_start_without_it(
    launched_cluster, tmp_path
):
    """The job API refuses `ray job list` and a plain HTTP request without the token, and the GCS a driver
    without it; with the token the job API answers. The token is never printed. Without the token file
    either start command stops before Ray starts, naming what is missing."""
    cluster = launched_cluster
    refused = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", cluster.job_api],
        env=cluster.stranger,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0, refused.stdout
    assert "Missing authentication token" in refused.stderr, refused.stderr[-2000:]
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{cluster.job_api}/api/jobs/", timeout=10)
    assert http.value.code in (401, 403)
    for _ in range(30):  # the job agent comes up after the port opens
        allowed = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", cluster.job_api],
            env=cluster.client,
            capture_output=True,
            text=True,
        )
        if allowed.returncode == 0:
            break
        time.sleep(2)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    driver = "import ray; ray.init(); print(len(ray.nodes()))"
    refused_driver = subprocess.run(
        [sys.executable, "-c", driver],
        # (it gives up after 3 refused tries instead of Ray's 20 at a second each)
        env={**cluster.stranger, "RAY_ADDRESS": cluster.gcs, "RAY_NUM_REDIS_GET_RETRIES": "3"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused_driver.returncode != 0, refused_driver.stdout
    assert "auth" in refused_driver.stderr.lower(), refused_driver.stderr[-2000:]  # refused, not broken
    output = cluster.printed + refused.stdout + refused.stderr + allowed.stdout + allowed.stderr
    assert cluster.token not in output + refused_driver.stdout + refused_driver.stderr  # never printed

    temp, sessions = Path(tempfile.mkdtemp(prefix="rayn", dir="/tmp")), []
    try:
        (tmp_path / ".ray").mkdir()  # a fresh node's HOME, the token not copied there
        head = start_script("head", temp, gcs=free_port(), dashboard=free_port())
        for script in (head, start_script("worker", temp, gcs=free_port())):
            missing, session = start_a_node(script, {**cluster.stranger, "HOME": str(tmp_path)}, timeout=60)
            sessions.append(session)
            assert missing.returncode == 1 and "no Ray token at ~/.ray/auth_token" in missing.stderr
        assert not ray_processes_of(temp)
    finally:
        stop_nodes(sessions, [temp])  # whatever a start command that went ahead left


def test_the_demo_cv_runs_as_a_job_on_several_nodes_and_writes_only_to_the_output_dir(
    launched_cluster, small_corpus, tmp_path
):
    temps = launched_cluster.temps
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
    submit = submit_when_ready(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            launched_cluster.job_api,
            "--working-dir",
            str(REPO),
            "--",
            *[sys.executable, "jobs/cv.py", "--config", str(config_file), "--folds", "1"],
        ],
        launched_cluster.client,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout and "fold 1: WAR" in submit.stdout, submit.stdout[-4000:]
    assert_a_readable_console(submit.stdout, shared)
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


NOT_FOR_THE_CONSOLE = re.compile(
    r"core_worker\.cc| E \d+ \d+\]|will hang|Traceback|WARNING|ERROR|\(\w+ pid=\d+"
)
"""Ray's error-level and warning lines, tracebacks, and lines forwarded from Ray's actors and workers."""


def assert_a_readable_console(console: str, output_dir: Path) -> None:
    """A demo fold's console, as `ray job submit` shows it: gmpatl's progress lines and results, a few
    dozen lines in all, none of Ray's own; those are in the run log the first line names."""
    lines = console.splitlines()
    assert len(lines) <= 60, console
    assert not [line for line in lines if NOT_FOR_THE_CONSOLE.search(line)], console
    [log] = (output_dir / "logs").glob("cv-*.log")
    assert f"log: {log} (Ray's and the workers' output)" in lines
    for step in ("stage1 · epoch 1/1", "features · ", "gmps · ", "stage2 · epoch 1/1", "stage3 · epoch 1/1"):
        assert sum(f"[1/1] fold 1 · {step}" in line for line in lines) == 1, (step, console)
    written = log.read_text()
    assert "(RayTrainWorker" in written and "(TrainController" in written  # the workers' output is kept
