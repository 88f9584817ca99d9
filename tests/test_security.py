"""Security defaults: loopback-only services, checkpoints that cannot run code, no remote code, another
config's checkpoint refused, and no secret from the environment in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TINY_TRAINING, small_config
from mlflow import MlflowClient
from processes import MlflowServer
from test_cli import GMPATL

from gmpatl_ray.atomic import atomic_write_text
from gmpatl_ray.config import ConfigError, dump_config, load_config
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


def test_secrets_from_the_environment_and_in_urls_are_never_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    tracker = Tracker("secrets", None, tmp_path)
    run = tracker.start("cv hf_abcdef123456", tags={"gmpatl.note": "wJalrXUtnFEMI/K7MDENG", "api_key": "k"})
    tracker.params(
        run,
        {
            "backbone.pretrained": "https://user:hf_abcdef123456@example.org/hubert",
            "tracking.uri": "https://alice:s3cret-pw@mlflow.example.org",
            "other.uri": "https://bob:p@ss/w0rd:x@mlflow.example.org/path",
            "storage": "s3://bucket?x_secret=wJalrXUtnFEMI/K7MDENG&region=eu",
            "db_password": "anything",
            "stage1.alpha_e": 0.9,
        },
    )
    tracker.tags(run, {"note": "token hf_abcdef123456", "fold": "1"})
    tracker.end(run)
    logged = MlflowClient(tracking_uri=tracker.uri).get_run(run)
    assert logged.data.params == {
        "backbone.pretrained": "https://***@example.org/hubert",
        "tracking.uri": "https://***@mlflow.example.org",
        "other.uri": "https://***@mlflow.example.org/path",
        "storage": "s3://bucket?x_secret=***&region=eu",
        "stage1.alpha_e": "0.9",
    }
    assert logged.info.run_name == "cv ***"
    assert logged.data.tags["gmpatl.note"] == "***" and "api_key" not in logged.data.tags
    assert logged.data.tags["note"] == "token ***" and logged.data.tags["fold"] == "1"


def test_a_tracking_uri_with_credentials_is_never_shown_or_queued(tmp_path, monkeypatch):
    """The server unreachable: the warning, the queue file and the command it suggests name the server
    without its password."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = "http://alice:s3cret-pw@127.0.0.1:9"
    with pytest.warns(UserWarning) as warned:
        tracker = Tracker("secrets", uri, tmp_path)
        tracker.params(tracker.start("cv"), {"tracking.uri": uri})
    shown = " ".join(str(w.message) for w in warned) + tracker.offline.read_text() + tracker.sync_command()
    assert "s3cret-pw" not in shown and "http://***@127.0.0.1:9" in shown
    assert "tracking-sync --uri 'http://***@127.0.0.1:9'" in tracker.sync_command()


def test_config_errors_do_not_echo_secrets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-1234567")
    with pytest.raises(ConfigError) as bad:
        load_config(
            None,
            [
                "tracking.uri=https://alice:s3cret-pw@mlflow.example.org",
                "tracking.password=hunter22",
                "experiment.name=tok-1234567",
                "stage1.alpha_e=2",
            ],
        )
    message = str(bad.value)
    assert "tracking.password" in message and "stage1.alpha_e" in message  # the fields are named
    for secret in ("s3cret-pw", "hunter22", "tok-1234567"):
        assert secret not in message
    with pytest.raises(ConfigError) as bad:
        load_config(None, ["https://alice:s3cret-pw@mlflow.example.org"])
    assert "expected FIELD=VALUE" in str(bad.value) and "s3cret-pw" not in str(bad.value)


RAY_GRPC_PROBES = [
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
    "/ray.rpc.ObjectManagerService/Pull",
    "/ray.rpc.ReporterService/GetTraceback",
    "/ray.rpc.LogService/ListLogs",
]
"""A harmless call of each of Ray's gRPC services: a server answers UNIMPLEMENTED for the services it does
not have, and for its own UNAUTHENTICATED without the token (or an answer, if it would serve anyone)."""


def grpc_codes(address: str) -> set[str]:
    """What a Ray gRPC server at ``address`` answers each probe sent without a token."""
    import grpc

    codes = set()
    with grpc.insecure_channel(address) as channel:
        for method in RAY_GRPC_PROBES:
            call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
            try:
                call(b"", timeout=5)
                codes.add("OK")
            except grpc.RpcError as err:
                codes.add(err.code().name)
    return codes


def http_get(url: str) -> tuple[int | str, str]:
    """(status, content type) of a GET without a token; the exception's name if it is not HTTP."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", "")
    except Exception as err:
        return type(err).__name__, ""


@pytest.mark.slow
def test_a_local_ray_cluster_refuses_every_caller_without_its_token_beyond_loopback(tmp_path):
    """The cluster `gmpatl` starts when no RAY_ADDRESS is set, on a fresh HOME. Its dashboard and job API
    listen on 127.0.0.1 only. Ray 2.60 binds its gRPC servers to every interface (and turns a loopback
    node IP into the machine's own), so every other listener of the cluster's processes is tried without
    the token: each gRPC server refuses (UNAUTHENTICATED), each HTTP API answers 401, and what is left
    serves Prometheus metrics and nothing else. One that would serve anyone fails the test."""
    script = (
        "import sys, ray; from gmpatl_ray.runtime import init_ray; init_ray(); "
        "worker = ray.remote(lambda: 1); ray.get(worker.remote()); node = ray._private.worker._global_node; "
        "print(ray._private.worker.get_dashboard_url(), node.get_session_dir_path(), node.node_ip_address, "
        "flush=True); sys.stdin.read()"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        url, session, node_ip = proc.stdout.readline().split()
        assert (tmp_path / ".ray" / "auth_token").is_file()  # ray.init made this cluster's token
        cluster = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        for other in psutil.process_iter(["cmdline"]):  # Ray's own daemons, started outside the tree
            if session in " ".join(other.info["cmdline"] or []):
                cluster.add(other.pid)
        listening = {
            (c.laddr.ip, c.laddr.port, c.pid)
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in cluster
        }
        dashboard_port = int(url.rsplit(":", 1)[1])
        assert url.startswith("127.0.0.1:")
        assert {ip for ip, port, _ in listening if port == dashboard_port} == {"127.0.0.1"}
        kinds, open_ones = {}, []
        for ip, port, pid in sorted(listening):
            if ip in ("127.0.0.1", "::1"):
                continue
            host = node_ip if ip in ("0.0.0.0", "::") else ip
            status, content = http_get(f"http://{host}:{port}/api/jobs/")
            if status == 401:
                kind = "HTTP, 401 without the token"
            elif status == 200 and "version=0.0.4" in content:  # Prometheus' text format, for any path
                kind = "Prometheus metrics"
            elif isinstance(status, str) and "UNAUTHENTICATED" in (codes := grpc_codes(f"{host}:{port}")):
                kind = "gRPC, UNAUTHENTICATED without the token" if "OK" not in codes else "open"
            else:
                kind = "open"
            kinds[(ip, port, psutil.Process(pid).name())] = kind
            if kind == "open":
                open_ones.append((ip, port, psutil.Process(pid).name(), status))
        assert open_ones == [], kinds
        assert "gRPC, UNAUTHENTICATED without the token" in kinds.values(), kinds  # the probes reach them
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


PASSWORD = "s3cret-pw-42"
ENV_TOKEN = "hf_planted_token_0042"


@pytest.fixture(scope="module")
def side_by_side(small_corpus, trained_fold, ray_cluster, tmp_path_factory):
    """Two `gmpatl cv` runs at once on one output folder with different configs (``experiment.name``),
    as two sweep trials or two users run them, their stages reused from the session's trained fold. Both
    track to a real MLflow server through a URI with a password in it, given with ``--set`` as a user
    would, with a token in the environment, under umask 027 (a group shares the storage). Returns the
    folder, the server, and each run's config and finished process."""
    import ray

    here = tmp_path_factory.mktemp("side_by_side")
    server = MlflowServer(here)
    server.start()
    uri = server.uri.replace("http://", f"http://alice:{PASSWORD}@")
    started, runs = time.time(), {}
    for name in ("side-a", "side-b"):
        config = small_config(
            small_corpus[0],
            f"experiment.output_dir={here / 'out'}",
            f"experiment.cache_dir={trained_fold[0]}",
            f"train.storage_path={here / 'ray'}",
            f"experiment.name={name}",
            "tracking.experiment=side-by-side",
            *TINY_TRAINING,
        )
        (here / f"{name}.yaml").write_text(dump_config(config))
        command = [str(GMPATL), "cv", "--config", str(here / f"{name}.yaml"), "--folds", "1"]
        runs[name] = subprocess.Popen(
            [*command, "--set", f"tracking.uri={uri}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **ray_cluster, "HF_TOKEN": ENV_TOKEN},
            preexec_fn=lambda: os.umask(0o027),
        )
    done = {name: (proc, *proc.communicate(timeout=600)) for name, proc in runs.items()}
    for name, (proc, _, err) in done.items():
        assert proc.returncode == 0, (name, err[-3000:])
    yield {
        "here": here,
        "server": server,
        "runs": done,
        "started": started,
        "ray_logs": Path(ray._private.worker._global_node.get_session_dir_path()) / "logs",
    }
    server.stop_all()


@pytest.mark.slow
def test_no_secret_reaches_the_console_mlflow_or_any_file(side_by_side):
    """The password and the environment's token, looked for in everything the two runs printed, every
    file they wrote (MLflow's artifacts, models, reports, queue files), the server's database and the Ray
    session's logs written meanwhile. The server is named without the password, and still used."""
    here, server = side_by_side["here"], side_by_side["server"]
    for name, (_, out, err) in side_by_side["runs"].items():
        for secret in (PASSWORD, ENV_TOKEN):
            assert secret not in out + err, (name, secret)
        assert f"MLflow: http://***@127.0.0.1:{server.port}" in out
        assert "View run" not in out  # MLflow's per-run URL lines are not printed
        assert f"tracking.uri=http://***@127.0.0.1:{server.port}" in out  # the predict command it printed
    logs = [p for p in side_by_side["ray_logs"].rglob("*") if p.is_file()]
    since = side_by_side["started"]
    written = [p for p in [*here.rglob("*"), *logs] if p.is_file() and p.stat().st_mtime >= since]
    assert server.store in written and any(p.name == "MLmodel" for p in written)
    for path in written:
        data = path.read_bytes()
        for secret in (PASSWORD, ENV_TOKEN):
            assert secret.encode() not in data, (path, secret)
    client = MlflowClient(tracking_uri=server.uri)
    [parent, *_] = client.search_runs(
        [client.get_experiment_by_name("side-by-side").experiment_id], "attributes.run_name = 'cv-side-a'"
    )
    assert parent.data.params["tracking.uri"] == f"http://***@127.0.0.1:{server.port}"


@pytest.mark.slow
def test_runs_side_by_side_on_one_output_folder_log_their_own_reports(side_by_side):
    """Each CV's reports are in a folder of its own, and each run's artifacts are its own files: its config
    (not the other run's), its results table."""
    here, server = side_by_side["here"], side_by_side["server"]
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("side-by-side").experiment_id
    folders = set()
    for name, (_, out, _) in side_by_side["runs"].items():
        [parent] = client.search_runs([experiment], f"attributes.run_name = 'cv-{name}'")
        run = parent.info.run_id
        reports = here / "out" / "reports" / run
        assert f"tables and figures: {reports}" in out
        folders.add(reports)
        logged = Path(client.download_artifacts(run, "config.yaml", str(here / "downloads" / run)))
        assert load_config(logged).experiment.name == name
        assert logged.read_text() == (reports / "config.yaml").read_text()
        table = client.download_artifacts(run, "cv_results.csv", str(here / "downloads" / run))
        assert Path(table).read_text() == (reports / "cv_results.csv").read_text()
    assert len(folders) == 2


@pytest.mark.slow
def test_what_a_run_writes_is_readable_by_its_group_and_nobody_else(side_by_side):
    """Under umask 027 every file the two CVs wrote (reports, models, MLflow's artifacts, the atomically
    written ones included) is readable by the group and not by others: as a plain ``open`` would make it,
    not owner-only as a temporary file is born."""
    here = side_by_side["here"] / "out"
    files = [p for p in here.rglob("*") if p.is_file() and p.stat().st_mtime >= side_by_side["started"]]
    assert any(p.name == "cv_results.csv" for p in files) and any(p.name == "MLmodel" for p in files)
    modes = {str(p.relative_to(here)): oct(p.stat().st_mode & 0o777) for p in files}
    assert {m for m in modes.values()} <= {"0o640", "0o750"}, modes


def test_atomic_writes_get_the_mode_a_plain_open_would_give(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    modes = [(tmp_path / name).stat().st_mode & 0o777 for name in ("a.txt", "b.txt")]
    assert modes == [0o664, 0o664]
