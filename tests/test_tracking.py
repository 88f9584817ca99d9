"""MLflow tracking: the run tree lands in a real store, secrets are not logged, and an unreachable
server neither stops the caller nor loses what it was asked to log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_config
from mlflow import MlflowClient

from gmpatl_ray.data.prepare import skipped_list_path
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
    (tmp_path / "table.csv").write_text("fold,uar\n1,0.5\n")
    tracker.artifact(parent, tmp_path / "table.csv")
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
    assert header["tracker"] == {"experiment": "exp", "uri": "http://127.0.0.1:9", "ids": {}}
    assert [line["call"] for line in lines] == ["start", "metrics", "end"]
    assert lines[1]["run"] == lines[0]["run"] == run and run.startswith("offline-")
    assert lines[1]["metrics"] == {"test_uar": 0.75} and lines[1]["step"] == 3


def test_a_run_records_its_config_and_the_utterances_prepare_skipped(tmp_path):
    config = small_config(tmp_path)
    skipped = skipped_list_path(Path(config.data.manifest))
    skipped.write_text("a.wav: empty file (0 bytes)\nb.wav: silent: every sample is 0\n")
    tracker = Tracker("inputs", None, tmp_path / "out")
    run = tracker.start("cv")
    resolved = config.model_dump(mode="json", exclude={"sweep"})
    track_inputs(tracker, run, config, resolved, tmp_path / "reports")
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
        filter_value("it's \"both\"")
