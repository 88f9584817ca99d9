"""Real faults, injected for real: a Ray Train worker SIGKILLed mid-stage, a `gmpatl cv` driver killed with
its whole local Ray cluster, and a real MLflow server stopped mid-run. Each must end as if nothing had
happened: the same epochs and steps, one MLflow run per fold and stage, nothing that was logged lost.
(A killed sweep driver and a failing trial: tests/test_sweep.py; truncated and concurrently built
artifacts: tests/test_artifacts.py; all marked ``faults``.)"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
import torch
from conftest import DDP_TRAINING, TINY_TRAINING, cv_results, small_config
from mlflow import MlflowClient
from processes import MlflowServer, kill_group, start_group, wait_for
from test_cli import GMPATL, run

from gmpatl_ray.artifacts import ArtifactCache, file_sha256
from gmpatl_ray.config import dump_config
from gmpatl_ray.cv import fold_split
from gmpatl_ray.gmp import GMPStore
from gmpatl_ray.pipeline import run_fold
from gmpatl_ray.stages.stage1 import run_stage1
from gmpatl_ray.stages.stage2 import run_stage2
from gmpatl_ray.tracking import Tracker
from gmpatl_ray.training import saved_weights

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TRAIN_WORKER = "RayTrainWorker"


def checkpoints(storage: Path, stage: str) -> list[str]:
    """Checkpoints Ray Train has registered (not merely written) for the runs of ``stage`` under
    ``storage``: a worker killed before its checkpoint is registered restarts from the one before."""
    found = []
    for snapshot in storage.glob(f"{stage}-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except ValueError:  # being rewritten
            continue
        found += [f"{snapshot.parent.name}/{r['checkpoint_dir_name']}" for r in results]
    return found


def train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of this session's local cluster (its raylet is our child, the workers
    its children), never those of another Ray on the machine."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(TRAIN_WORKER in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def kill_a_worker_after_the_first_checkpoint(
    storage: Path, stage: str, killed: list[int]
) -> threading.Thread:
    """A thread that SIGKILLs a Ray Train worker process as soon as ``stage`` has a checkpoint."""

    def killer() -> None:
        wait_for(f"a {stage} checkpoint", lambda: checkpoints(storage, stage))
        worker = wait_for("a Ray Train worker process", train_workers, timeout=30)[0]
        worker.send_signal(signal.SIGKILL)
        killed.append(worker.pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def assert_resumed_to_the_end(artifact, epochs: int, steps_per_epoch: int) -> None:
    """The stage resumed from a checkpoint (not from scratch) and still ran every epoch and step once."""
    meta = artifact.meta
    assert len(meta["resumed_at_epochs"]) == 1 and 1 <= meta["resumed_at_epochs"][0] < epochs, meta
    assert [row["epoch"] for row in meta["history"]] == list(range(epochs))
    assert [row["steps"] for row in meta["history"]] == [steps_per_epoch * (e + 1) for e in range(epochs)]
    assert meta["steps"] == epochs * steps_per_epoch


@pytest.fixture(scope="module")
def fault_cache(tmp_path_factory):
    """One stage cache for the fault tests: the cv-driver test reuses the stage 1 the first one built."""
    return tmp_path_factory.mktemp("fault_cache")


FAULT_TRAINING = [*TINY_TRAINING, "train.max_failures=1"]
"""The session's trained fold (tests/conftest.py) with one restart allowed: the same stage fingerprints, so
an interrupted stage here can be compared with the uninterrupted one there."""

TIMING = {"train_seconds", "train_utterances_per_s"}


def assert_same_as_uninterrupted(artifact, uninterrupted) -> None:
    """Bit for bit the stage that ran without a fault: every saved tensor, and the history but for timing."""
    assert artifact.path.name == uninterrupted.path.name  # the same inputs, so the same fingerprint
    for name in ("backbone/model.safetensors", "heads.pt"):
        assert file_sha256(artifact.path / name) == file_sha256(uninterrupted.path / name), name
    resumed, whole = saved_weights(artifact.path), saved_weights(uninterrupted.path)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)

    def untimed(meta):
        return [{k: v for k, v in row.items() if k not in TIMING} for row in meta["history"]]

    assert untimed(artifact.meta) == untimed(uninterrupted.meta)
    assert artifact.meta["best_epoch"] == uninterrupted.meta["best_epoch"]


def run_folders(storage: Path) -> list[str]:
    return sorted(p.name for p in storage.iterdir()) if storage.exists() else []


@pytest.mark.usefixtures("ray_cluster")
def test_a_worker_killed_in_stage1_is_replaced_and_the_stage_ends_as_if_it_was_not(
    small_corpus, trained_fold, fault_cache
):
    folder, manifest = small_corpus
    config = small_config(folder, f"train.storage_path={fault_cache / 'ray'}", *FAULT_TRAINING)
    split = fold_split(config, manifest, 1)
    killed: list[int] = []
    killer = kill_a_worker_after_the_first_checkpoint(fault_cache / "ray", "stage1", killed)
    artifact, built = run_stage1(config, split, ArtifactCache(fault_cache / "cache"))
    killer.join(timeout=5)
    assert built and killed, "no worker was killed"
    assert not psutil.pid_exists(killed[0])
    assert_resumed_to_the_end(artifact, 3, math.ceil(len(split.train) / 8))
    assert_same_as_uninterrupted(artifact, trained_fold[1].artifacts["stage1"])
    assert run_folders(fault_cache / "ray") == []  # its checkpoints go once the artifact is in the cache


@pytest.mark.usefixtures("ray_cluster")
def test_a_worker_killed_under_ddp_is_replaced_and_the_stage_ends_as_if_it_was_not(
    small_corpus, ddp_stage1, tmp_path
):
    """2 gloo workers, bf16, gradient checkpointing: one is killed after the first checkpoint, the worker
    group restarts, and both ranks go on with their own shards and generators where the checkpoint left
    them, ending bit for bit where the session's uninterrupted run did."""
    folder, manifest = small_corpus
    _, split, uninterrupted, _ = ddp_stage1
    config = small_config(folder, f"train.storage_path={tmp_path / 'ray'}", *DDP_TRAINING)
    killed: list[int] = []
    killer = kill_a_worker_after_the_first_checkpoint(tmp_path / "ray", "stage1", killed)
    artifact, built = run_stage1(config, split, ArtifactCache(tmp_path / "cache"))
    killer.join(timeout=5)
    assert built and killed, "no worker was killed"
    assert_resumed_to_the_end(artifact, 3, math.ceil(math.ceil(len(split.train) / 2) / 2))
    assert_same_as_uninterrupted(artifact, uninterrupted)


@pytest.mark.usefixtures("ray_cluster")
def test_a_worker_killed_in_stage2_is_replaced_and_the_stage_ends_as_if_it_was_not(
    small_corpus, trained_fold, tmp_path
):
    """Stage 2 of the trained fold again, from its stage 1 and GMPs, into a cache of its own; a worker
    killed after its first checkpoint. Its masks and dropout continue where the checkpoint left them."""
    folder, manifest = small_corpus
    trained = trained_fold[1].artifacts
    config = small_config(folder, f"train.storage_path={tmp_path / 'ray'}", *FAULT_TRAINING)
    split = fold_split(config, manifest, 1)
    killed: list[int] = []
    killer = kill_a_worker_after_the_first_checkpoint(tmp_path / "ray", "stage2", killed)
    artifact, built = run_stage2(
        config, split, trained["stage1"].path / "backbone", GMPStore(trained["gmps"]), ArtifactCache(tmp_path)
    )
    killer.join(timeout=5)
    assert built and killed, "no worker was killed"
    assert_resumed_to_the_end(artifact, 3, math.ceil(len(split.train) / 8))
    assert_same_as_uninterrupted(artifact, trained["stage2"])
    assert run_folders(tmp_path / "ray") == []


def runs_by_name(client: MlflowClient, experiment: str) -> dict[str, list]:
    found = client.get_experiment_by_name(experiment)
    by_name: dict[str, list] = {}
    for r in client.search_runs([found.experiment_id]) if found else []:
        by_name.setdefault(r.info.run_name, []).append(r)
    return by_name


@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_cv_driver_reruns_into_the_same_runs_and_resumes_the_stage(
    small_corpus, fault_cache, tmp_path
):
    """Kill `gmpatl cv` (and its Ray cluster) in fold 2's stage 1, run it again: fold 1 is reused, stage 1
    of fold 2 resumes from its checkpoint, and MLflow holds one parent and one run per fold and stage.
    On disk, the unfinished stage holds one checkpoint and nothing else, and after the rerun nothing is
    left. (Fold 1 is in the cache before the first run: its stage 1 from the worker-kill tests, its stage 3
    trained here in local mode, the same fingerprint; so the only stages the driver trains are fold 2's.)"""
    folder, manifest = small_corpus
    config = small_config(
        folder,
        f"experiment.output_dir={tmp_path / 'out'}",
        f"experiment.cache_dir={fault_cache / 'cache'}",
        f"train.storage_path={tmp_path / 'ray'}",
        "tracking.experiment=crash",
        "tracking.log_model=false",
        "stage2.enabled=false",
        *FAULT_TRAINING,
    )
    local = config.train.model_copy(update={"num_workers": 0, "storage_path": str(fault_cache / "ray")})
    fold1 = run_fold(
        config.model_copy(update={"train": local}), manifest, 1, ArtifactCache(fault_cache / "cache")
    )
    config_file = tmp_path / "crash.yaml"
    config_file.write_text(dump_config(config))
    command = [str(GMPATL), "cv", "--config", str(config_file), "--folds", "1,2"]
    driver = start_group(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_for("fold 2's stage 1 to checkpoint", lambda: checkpoints(tmp_path / "ray", "stage1"), timeout=400)
    kill_group(driver)
    assert "fold 1: WAR" in driver.stdout.read()
    (unfinished,) = run_folders(tmp_path / "ray")
    assert unfinished.startswith("stage1-") and len(checkpoints(tmp_path / "ray", "stage1")) == 1
    # (on disk one more only if the kill came just as a newer one was written, before the older went)
    assert len([c for c in (tmp_path / "ray" / unfinished).glob("checkpoint_*") if c.is_dir()]) <= 2

    result = run(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    table = cv_results(tmp_path / "out")
    assert table["reused"].tolist() == ["stage1,stage3", ""]  # fold 1 is not recomputed
    assert run_folders(tmp_path / "ray") == []

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = runs_by_name(client, "crash")
    assert sorted(runs) == [
        "cv-gmpatl-demo",
        "fold-1",
        "fold-1-stage1",
        "fold-1-stage3",
        "fold-2",
        "fold-2-stage1",
        "fold-2-stage3",
    ]
    assert all(len(found) == 1 and found[0].info.status == "FINISHED" for found in runs.values()), runs
    for stage in ("stage1", "stage3"):  # fold 1's are the ones in the cache before the first run
        assert runs[f"fold-1-{stage}"][0].data.params["fingerprint"] == fold1.artifacts[stage].path.name
    assert runs["cv-gmpatl-demo"][0].data.tags["gmpatl.resumed"] == "true"
    assert runs["fold-2"][0].data.tags["gmpatl.resumed"] == "true"
    assert "gmpatl.resumed" not in runs["fold-1"][0].data.tags  # finished before the crash: left as it was

    cache = ArtifactCache(fault_cache / "cache")
    stage1 = cache.load("stage1", runs["fold-2-stage1"][0].data.params["fingerprint"])
    split = fold_split(config, manifest, 2)
    assert_resumed_to_the_end(stage1, 3, math.ceil(len(split.train) / 8))
    resumed_at = str(stage1.meta["resumed_at_epochs"][0])
    assert runs["fold-2-stage1"][0].data.tags["gmpatl.resumed_at_epochs"] == resumed_at


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 that the test can stop and start again."""
    server = MlflowServer(tmp_path)
    yield server.uri, server.start, server.stop
    server.stop_all()


def test_what_is_logged_while_the_tracking_server_is_down_reaches_it_later(
    small_corpus, trained_fold, ray_cluster, tmp_path, mlflow_server, monkeypatch
):
    """The server stops mid-run. In process, a tracker keeps logging and sends what waited once the
    server is back. A `gmpatl cv` that outlives the outage finishes its fold, names the file where its
    records wait, and `gmpatl tracking-sync` delivers them: the server ends with the whole run tree.
    (The CV reuses the session's stage 1 and trains stage 3 on it in Ray Train's local mode, during which
    the server is down.)"""
    uri, start, stop = mlflow_server
    fail_fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    for name, value in fail_fast.items():
        monkeypatch.setenv(name, value)
    start()
    client = MlflowClient(tracking_uri=uri)
    tracker = Tracker("in-process", uri, tmp_path / "in-process", retry_after_s=0)
    run_id = tracker.start("run")
    tracker.metrics(run_id, {"loss": 3.0}, step=0)

    config = small_config(
        small_corpus[0],
        f"experiment.output_dir={tmp_path / 'out'}",
        f"experiment.cache_dir={trained_fold[0]}",
        f"train.storage_path={tmp_path / 'ray'}",
        f"tracking.uri={uri}",
        "tracking.experiment=outage",
        "tracking.log_model=false",
        "stage2.enabled=false",
        *TINY_TRAINING,
        "train.num_workers=0",  # local mode: stage 3 in `gmpatl cv` itself (what fails here is MLflow)
    )
    config_file = tmp_path / "outage.yaml"
    config_file.write_text(dump_config(config))
    cv = start_group(
        [str(GMPATL), "cv", "--config", str(config_file), "--folds", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **fail_fast, **ray_cluster},
    )
    wait_for("the fold's run on the server", lambda: "fold-1" in runs_by_name(client, "outage"), timeout=300)
    stop()

    with pytest.warns(UserWarning, match=rf"MLflow at {uri} failed .* waits in {tracker.offline}"):
        tracker.metrics(run_id, {"loss": 2.0}, step=1)
    child = tracker.start("child", parent=run_id)  # started while the server is away: a local handle
    tracker.metrics(child, {"acc": 0.5})
    assert child.startswith("offline-") and tracker.offline.is_file()

    out, err = cv.communicate(timeout=600)
    assert cv.returncode == 0, err[-3000:]
    assert "fold 1: WAR" in out
    waiting = Path(re.search(r"waits in (\S+\.jsonl)", err).group(1))
    assert waiting.is_file()

    start()
    with pytest.warns(UserWarning, match="is reachable again: sent 3 records"):
        tracker.metrics(run_id, {"loss": 1.0}, step=2)
    tracker.end(child)
    tracker.end(run_id)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [3.0, 2.0, 1.0]
    [sent_child] = runs_by_name(client, "in-process")["child"]
    assert sent_child.data.tags["mlflow.parentRunId"] == run_id and sent_child.data.metrics == {"acc": 0.5}
    assert not tracker.offline.exists()

    stop()  # a second outage: a new queue file, whose records name the child by its old handle
    grandchild = tracker.start("grandchild", parent=child)
    tracker.metrics(grandchild, {"acc": 0.75})
    os.close(tracker.queue.fd)  # the process dies
    start()
    again = Tracker.from_offline_file(tracker.offline, uri)
    assert again.flush() and again.refused == 0
    [sent_grandchild] = runs_by_name(client, "in-process")["grandchild"]
    assert sent_grandchild.data.tags["mlflow.parentRunId"] == sent_child.info.run_id

    refused = run(str(GMPATL), "tracking-sync", str(waiting), env=fail_fast)  # to the default store: no
    assert refused.returncode == 2 and waiting.is_file()
    assert f"{waiting}: its records are for MLflow at {uri}, not sqlite:///" in refused.stderr
    sync = run(str(GMPATL), "tracking-sync", "--uri", uri, str(waiting), env=fail_fast)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    sending = re.search(rf"sending (\d+) record\(s\) to MLflow at {uri}\n", sync.stdout)
    assert sending and f": sent {sending.group(1)} record(s) to {uri}\n" in sync.stdout, sync.stdout
    assert "View run" not in sync.stdout  # MLflow's per-run URL lines are not printed
    assert not waiting.exists() and not list(waiting.parent.glob("*.sending"))
    runs = runs_by_name(client, "outage")
    assert sorted(runs) == ["cv-gmpatl-demo", "fold-1", "fold-1-stage1", "fold-1-stage3"]
    assert all(len(found) == 1 and found[0].info.status == "FINISHED" for found in runs.values()), runs
    table = cv_results(tmp_path / "out")
    assert runs["fold-1"][0].data.metrics["test_uar"] == pytest.approx(table["uar"][0], abs=1e-4)
    assert runs["cv-gmpatl-demo"][0].data.metrics["mean_uar"] == pytest.approx(table["uar"][0], abs=1e-4)
    stage1_loss = client.get_metric_history(runs["fold-1-stage1"][0].info.run_id, "train_loss")
    assert [m.step for m in stage1_loss] == [0, 1, 2]
