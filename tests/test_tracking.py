"""MLflow tracking: the run tree lands in a real store, secrets are not logged, and an unreachable
server neither stops the caller nor loses what it was asked to log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_config
from mlflow import MlflowClient
from test_cli import GMPATL, run

from gmpatl_ray.data.prepare import skipped_list_path
from gmpatl_ray.errors import InputError
from gmpatl_ray.pipeline import track_inputs
from gmpatl_ray.tracking import Tracker, flatten


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_parent_and_child_runs_in_a_real_store(tmp_path):
    tracker = Tracker("exp", None, tmp_path)
    parent = tracker.start("cv")
    tracker.params(parent, {"stage1.alpha_e": 0.9, "hf_token": "hunter2", "db.password": "x"})
    child = tracker.start("fold-1", parent=parent)
    tracker.metrics(child, {"test_uar": 0.5})
    (tmp_path / "reports" / parent).mkdir(parents=True)  # the run's own reports folder
    (tmp_path / "reports" / parent / "table.csv").write_text("fold,uar\n1,0.5\n")
    tracker.artifact(parent, tmp_path / "reports" / parent / "table.csv")
    tracker.end(child)
    tracker.end(parent)

    client = MlflowClient(tracking_uri=tracker.uri)
    runs = client.search_runs([tracker.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["fold-1"].data.tags["mlflow.parentRunId"] == parent
    assert by_name["fold-1"].data.metrics == {"test_uar": 0.5}
    assert by_name["cv"].data.params == {"stage1.alpha_e": "0.9"}  # no secrets
    assert [a.path for a in client.list_artifacts(parent)] == ["table.csv"]
    assert not (tmp_path / "tracking-offline").exists()
    # The MLflow UI opens the experiment on its runs, not its GenAI view (traces, token usage)
    assert (
        client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )


def test_an_unreachable_server_warns_and_keeps_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.warns(
        UserWarning, match=r"MLflow at http://127.0.0.1:9 failed .* waits in .*tracking-offline"
    ):
        tracker = Tracker("exp", "http://127.0.0.1:9", tmp_path)
    run = tracker.start("cv")
    tracker.metrics(run, {"test_uar": 0.75}, step=3)
    tracker.end(run)
    assert tracker.offline.parent == tmp_path / "tracking-offline"
    header, *lines = [json.loads(line) for line in tracker.offline.read_text().splitlines()]
    expected = {"experiment": "exp", "server": "http://127.0.0.1:9", "ids": {}, "parents": {}}
    assert header["tracker"] == expected
    assert [(line["seq"], line["call"]) for line in lines] == [(1, "start"), (2, "metrics"), (3, "end")]
    assert lines[1]["run"] == lines[0]["run"] == run and run.startswith("offline-")
    assert lines[1]["metrics"] == {"test_uar": 0.75} and lines[1]["step"] == 3


def queue_file(folder: Path, server: str, records: list[dict]) -> Path:
    """A tracking-offline file as a process that ended during an outage leaves it."""
    path = folder / "tracking-offline" / "20261202-000000-1-abcdef.jsonl"
    path.parent.mkdir(parents=True)
    lines = [{"tracker": {"experiment": "queue", "server": server}}]
    lines += [record | {"seq": seq} for seq, record in enumerate(records, start=1)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.faults
def test_refused_records_go_to_the_dead_letter_file_and_the_rest_still_arrive(tmp_path):
    """A planted file: a record MLflow refuses (an invalid key), an artifact that is gone, and ones naming
    a readable file outside the output folder, a link out of the run's reports and another run's reports,
    between good records, and a last line cut short. `tracking-sync` sends the good ones, keeps the five
    in the dead-letter file with why, and uploads nothing else; a missing file given beside it does not
    stop it."""
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    handle = "offline-0123"
    own = out / "reports" / handle  # the run's own reports folder
    own.mkdir(parents=True)
    (own / "table.csv").write_text("fold,uar\n1,0.5\n")
    secret = tmp_path / "elsewhere" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    (own / "link.txt").symlink_to(secret)  # a link out of the reports is outside too
    other = out / "reports" / "another-run" / "their.csv"  # another run's reports
    other.parent.mkdir()
    other.write_text("fold,uar\n1,0.9\n")

    def artifact(path: Path) -> dict:
        return {"call": "artifact", "run": handle, "path": str(path), "folder": None}

    records = [
        {"call": "start", "run": handle, "name": "cv", "parent": None, "tags": {}},
        {"call": "params", "run": handle, "params": {"bad key!?": "1"}},
        {"call": "metrics", "run": handle, "metrics": {"uar": 0.5}, "step": 0, "time": 1},
        artifact(own / "gone.csv"),
        artifact(secret),
        artifact(own / "link.txt"),
        artifact(other),
        artifact(own / "table.csv"),
        {"call": "end", "run": handle, "status": "FINISHED"},
    ]
    path = queue_file(out, uri, records)
    with path.open("a") as f:
        f.write('{"call": "metrics", "run": "offline-0123", "metr')  # an append cut short by a crash
    gone = path.with_name("gone.jsonl")
    sync = run(str(GMPATL), "tracking-sync", str(gone), str(path))
    assert sync.returncode == 2, sync.stderr  # one file refused (bad input), the other still sent
    assert f"{gone}: no such tracking-offline file" in sync.stderr
    assert f"{path}:11: ignoring a line cut short" in sync.stderr
    assert f"{path}: sending 9 record(s) to MLflow at {uri}" in sync.stdout
    assert f"{path}: sent 4 record(s) to {uri}; 5 refused, kept in " in sync.stdout
    dead_letter = out / "tracking-offline" / "dead-letter" / path.name
    assert sync.stderr.count(f"it is kept in {dead_letter} and the records after it go on") == 5

    client = MlflowClient(tracking_uri=uri)
    [sent] = client.search_runs([client.get_experiment_by_name("queue").experiment_id])
    assert sent.info.status == "FINISHED" and sent.data.metrics == {"uar": 0.5} and sent.data.params == {}
    assert [a.path for a in client.list_artifacts(sent.info.run_id)] == ["table.csv"]
    assert not path.exists() and not list(path.parent.glob("*.sending"))
    refused = [json.loads(line) for line in dead_letter.read_text().splitlines()]
    assert [r["record"]["seq"] for r in refused] == [2, 4, 5, 6, 7]
    assert 'Invalid value "bad key!?"' in refused[0]["error"]
    assert "the artifact file is gone" in refused[1]["error"]
    assert all("only a run's own reports and model are uploaded" in r["error"] for r in refused[2:])
    uploaded = [p.name for p in (out / "mlartifacts").rglob("*") if p.is_file()]
    assert uploaded == ["table.csv"]


@pytest.mark.faults
def test_a_file_is_sent_only_to_the_server_it_was_for_and_only_once_its_writer_is_gone(tmp_path, monkeypatch):
    """The server comes from the user (``--uri``, the environment, the default store), never from the
    file; a file whose writer still runs is refused; two syncs cannot both send a file."""
    out = tmp_path / "out"
    records = [{"call": "end", "run": "x", "status": "FINISHED"}]
    planted = queue_file(out, "https://mlflow.attacker.example", records)
    with pytest.raises(InputError, match="records are for MLflow at https://mlflow.attacker.example, not"):
        Tracker.from_offline_file(planted, None)
    assert planted.is_file()

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    live = Tracker("queue", "http://127.0.0.1:9", out / "live", retry_after_s=3600)  # server away: it queues
    live.metrics(live.start("cv"), {"uar": 0.5})
    with pytest.raises(InputError, match="held by a live process"):
        Tracker.from_offline_file(live.offline, "http://127.0.0.1:9")
    assert live.offline.is_file()

    ended = queue_file(tmp_path / "ended", f"sqlite:///{tmp_path / 'ended' / 'mlflow.db'}", records)
    first = Tracker.from_offline_file(ended, None)  # claimed: renamed, and locked while it sends
    assert first.offline == ended.with_name(ended.name + ".sending") and not ended.exists()
    with pytest.raises(InputError, match="no such tracking-offline file"):
        Tracker.from_offline_file(ended, None)
    with pytest.raises(InputError, match="held by a live process"):
        Tracker.from_offline_file(first.offline, None)


def test_a_run_records_its_config_and_the_utterances_prepare_skipped(tmp_path):
    config = small_config(tmp_path)
    skipped = skipped_list_path(Path(config.data.manifest))
    skipped.write_text("a.wav: empty file (0 bytes)\nb.wav: silent: every sample is 0\n")
    tracker = Tracker("inputs", None, tmp_path / "out")
    run = tracker.start("cv")
    resolved = config.model_dump(mode="json", exclude={"sweep"})
    track_inputs(tracker, run, config, resolved, tmp_path / "out" / "reports" / run)
    client = MlflowClient(tracking_uri=tracker.uri)
    assert {a.path for a in client.list_artifacts(run)} == {"config.yaml", "manifest.skipped.txt"}
    logged = client.get_run(run).data
    assert logged.metrics["skipped_utterances"] == 2 and logged.params["config_fingerprint"]


def test_runs_named_with_quotes_are_found_and_unsearchable_names_refused(tmp_path):
    """MLflow filters have no escape character: a quote of one kind goes inside the other kind."""
    from gmpatl_ray.errors import InputError
    from gmpatl_ray.tracking import filter_value

    tracker = Tracker("quotes", None, tmp_path)
    single, double = tracker.start("cv-it's"), tracker.start('cv-a "b"', tags={"gmpatl.trial": "it's"})
    assert tracker.find("cv-it's", None, {}) == (single, "RUNNING")
    assert tracker.find('cv-a "b"', None, {"gmpatl.trial": "it's"}) == (double, "RUNNING")
    assert tracker.find("cv-it", None, {}) is None
    with pytest.raises(InputError, match="both kinds of quote cannot be searched for"):
        filter_value('it\'s "both"')


@pytest.mark.faults
def test_a_run_deleted_in_the_ui_and_an_artifact_store_that_keeps_failing_do_not_jam_the_tracker(tmp_path):
    """In process, with the server up: records for a run deleted meanwhile are refused (a 4xx answer);
    an upload the artifact store fails every time while the server answers is tried 3 times in all, then
    refused. Records for other runs arrive, and nothing is left waiting."""
    tracker = Tracker("jam", None, tmp_path, max_attempts=3)
    client = MlflowClient(tracking_uri=tracker.uri)
    deleted, kept = tracker.start("deleted"), tracker.start("kept")
    client.delete_run(deleted)
    with pytest.warns(UserWarning, match=r"refused a record \(metrics: .*must be in the 'active' state"):
        tracker.metrics(deleted, {"uar": 0.1})
    artifacts = Path(client.get_run(kept).info.artifact_uri.removeprefix("file://"))
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    artifacts.symlink_to(artifacts)  # a broken store: every upload fails (an OSError, not a missing file)
    (tmp_path / "reports" / kept).mkdir(parents=True)
    (tmp_path / "reports" / kept / "table.csv").write_text("fold,uar\n1,0.5\n")
    failing = r"refused a record \(artifact: failed 3 times while MLflow answered"
    with pytest.warns(UserWarning, match=failing):
        tracker.artifact(kept, tmp_path / "reports" / kept / "table.csv")
    tracker.metrics(kept, {"uar": 0.5})
    tracker.end(kept)
    sent = client.get_run(kept)
    assert sent.data.metrics == {"uar": 0.5} and sent.info.status == "FINISHED"
    assert tracker.pending == [] and not tracker.offline.exists()
    dead = [json.loads(line) for line in tracker.queue.dead_letter.read_text().splitlines()]
    assert [d["record"]["call"] for d in dead] == ["metrics", "artifact"]
