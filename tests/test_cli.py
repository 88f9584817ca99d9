"""The installed `gmpatl` command, `python -m gmpatl_ray` and the job entrypoint, run as a user runs them."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch

import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE, small_config
from transformers import HubertModel

from gmpatl_ray.config import BackboneSize, dump_config, load_config, with_absolute_paths
from gmpatl_ray.models.backbone import random_backbone

REPO = Path(__file__).parent.parent
GMPATL = Path(sys.executable).parent / "gmpatl"


def run(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def in_process(*args: str) -> subprocess.CompletedProcess:
    """`gmpatl ARGS` as the console script runs it (``gmpatl_ray.cli.main``), but in this process, its
    output captured: for commands that start neither Ray nor a run log (``report``), where a process's
    start-up and imports would be most of what the call costs."""
    from gmpatl_ray.cli import LOGGED, main

    assert args[0] not in LOGGED, f"gmpatl {args[0]} takes over the process's output: run it as a process"
    out, err = io.StringIO(), io.StringIO()
    with patch.dict(os.environ), redirect_stdout(out), redirect_stderr(err):  # main sets variables
        code = main(list(args))
    return subprocess.CompletedProcess(["gmpatl", *args], code, out.getvalue(), err.getvalue())


def table_run(stdout: str) -> str:
    """The run id naming the reports folder a `gmpatl cv` printed."""
    return Path(re.search(r"^tables and figures: (\S+)$", stdout, re.MULTILINE).group(1)).name


def test_console_script_and_module_agree():
    script = run(str(GMPATL), "--help")
    module = run(sys.executable, "-m", "gmpatl_ray", "--help")
    assert script.returncode == module.returncode == 0
    for command in ("prepare", "config"):
        assert command in script.stdout
    assert script.stdout == module.stdout


def test_prepare_demo_through_the_real_parser(tmp_path):
    result = run(str(GMPATL), "prepare", "demo", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"demo manifest {tmp_path / 'manifest.csv'}: 320 utterances")
    assert lines[1].split() == ["emotion", "ang", "80", "hap", "80", "neu", "80", "sad", "80"]
    assert lines[2].split() == ["gender", "F", "160", "M", "160"]
    assert lines[3].split() == ["session", "1", "64", "2", "64", "3", "64", "4", "64", "5", "64"]
    assert lines[4].startswith("  dropped ")  # labels outside the 4 classes went through the filter
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert manifest["duration_s"].between(1.0, 4.0).all()
    assert all(Path(p).is_relative_to(tmp_path / "IEMOCAP_demo") for p in manifest["path"])

    again = run(str(GMPATL), "prepare", "demo", "--out", str(tmp_path))  # reuses the generated corpus
    assert again.returncode == 0 and again.stdout == result.stdout


def test_config_command_prints_a_loadable_resolved_config(tmp_path, monkeypatch):
    """The config as every command runs it: defaults filled in, paths absolute (against the directory the
    command ran in)."""
    result = run(str(GMPATL), "config", "--config", "configs/demo.yaml", "--set", "stage3.margin=0.35")
    assert result.returncode == 0, result.stderr
    (tmp_path / "resolved.yaml").write_text(result.stdout)
    resolved = load_config(tmp_path / "resolved.yaml")
    monkeypatch.chdir(REPO)
    assert resolved == with_absolute_paths(load_config(REPO / "configs/demo.yaml", ["stage3.margin=0.35"]))
    assert resolved.data.manifest == str(REPO / "outputs" / "demo" / "manifest.csv")


def test_bad_config_exits_2_naming_the_field():
    result = run(str(GMPATL), "prepare", "--config", "configs/demo.yaml", "--set", "data.on_error=maybe")
    assert result.returncode == 2
    assert "data.on_error: Input should be 'fail' or 'skip'" in result.stderr


def test_job_entrypoint_runs_the_submitted_copy(tmp_path):
    result = run(
        sys.executable, str(REPO / "jobs" / "prepare.py"), "demo", "--out", str(tmp_path), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "manifest.csv").is_file()


@pytest.mark.slow
def test_gpu_extraction_waits_for_a_gpu_instead_of_falling_back_to_the_cpu(ray_cluster, tmp_path):
    """``extract.device: cuda`` on a cluster without a GPU now (GPU nodes scaled to zero): the command says
    so, its HuBERT actor waits for a GPU, and no CPU actor extracts anything meanwhile."""
    config_file = tmp_path / "small.yaml"
    config_file.write_text(dump_config(small_config(tmp_path, "extract.device=cuda")))
    proc = subprocess.Popen(
        [str(GMPATL), "extract", "--config", str(config_file)],
        cwd=REPO,
        env={**os.environ, **ray_cluster},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def run_log() -> str:  # Ray Data's progress is there, not on the console
        return "".join(path.read_text() for path in (tmp_path / "out" / "logs").glob("extract-*.log"))

    try:
        deadline = time.monotonic() + 120
        while "(pending: 1 CPU, 1 GPU)" not in run_log():
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "".join(lines)[-3000:] + run_log()[-3000:]
            time.sleep(0.5)
        time.sleep(5)
        assert proc.poll() is None  # still waiting for a GPU
        output = "".join(lines) + run_log()
        assert "features extracted" not in output and "running=1" not in output
        assert not list((tmp_path / "cache").glob("features/*/_COMPLETE.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_extract_cluster_and_report_through_a_local_ray_cluster(ray_cluster, tmp_path):
    """`cluster` extracts every layer in `extract.layers` and clusters `gmp.layer`; `gmp-report` over a
    sweep of `backbone.pretrained` then reuses those features and GMPs, clusters the other layer too, and
    reports the same layers for each backbone (the second family's features extracted, the first's reused)."""
    folders = {family: tmp_path / family for family in ("hubert", "wavlm")}
    for family, folder in folders.items():
        size = BackboneSize(family=family, large_layout=family == "wavlm", **TINY_SIZE)
        random_backbone(size).save_pretrained(folder)
    hubert, wavlm = folders.values()
    settings = ["extract.layers=[-1, -2]", f"backbone.pretrained={hubert}", "backbone.random_init=null"]
    config_file = tmp_path / "small.yaml"
    config_file.write_text(dump_config(small_config(tmp_path, *settings)))

    first = run(str(GMPATL), "cluster", "--config", str(config_file), env=ray_cluster)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "features extracted: 32 utterances" in first.stdout
    assert "audio seconds per second" in first.stdout
    assert "GMPs built for layer -2 (faiss" in first.stdout
    assert "k=4 " in first.stdout and "k=8 " in first.stdout

    backbones = f"sweep={{space: {{backbone.pretrained: {{grid: [{hubert}, {wavlm}]}}}}}}"
    config_file.write_text(dump_config(small_config(tmp_path, *settings, backbones)))
    report = run(str(GMPATL), "gmp-report", "--config", str(config_file), env=ray_cluster)
    assert report.returncode == 0, report.stderr[-3000:]
    said = report.stdout
    assert said.count("features reused") == 1 and said.count("features extracted") == 1, said  # HuBERT's kept
    assert said.count("GMPs reused for layer -2") == 1 and said.count("GMPs built for layer -1") == 2, said
    table = pd.read_csv(tmp_path / "out" / "reports" / "gmp_report.csv")
    rows = sorted(zip(table["backbone"], table["layer"], table["scale"], strict=True))
    assert rows == sorted((str(f), layer, k) for f in folders.values() for layer in (-1, -2) for k in (4, 8))
    assert (tmp_path / "out" / "reports" / "gmp_report.png").stat().st_size > 10_000
    assert re.search(r"\| +backbone +\| +layer +\|", said), said
    nmi = {
        name: rows.sort_values(["layer", "scale"])["nmi_emotion"].tolist()
        for name, rows in table.groupby("backbone")
    }
    assert nmi[str(hubert)] != nmi[str(wavlm)]  # each backbone's own features and labels


def test_impossible_scale_exits_2_naming_the_field(small_corpus, small_features, ray_cluster, tmp_path):
    """Found once the frames are counted: the features come from the session's store."""
    config_file = tmp_path / "small.yaml"
    cache = small_features[3].root
    overrides = [f"experiment.output_dir={tmp_path}", f"experiment.cache_dir={cache}"]
    overrides.append("gmp.scales=[4, 1000000]")
    config_file.write_text(dump_config(small_config(small_corpus[0], *overrides)))
    result = run(str(GMPATL), "cluster", "--config", str(config_file), env=ray_cluster)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "gmp.scales: k=1000000 is larger than the" in result.stderr


@pytest.mark.slow
def test_cv_runs_the_folds_and_tracks_them_in_mlflow(trained_fold, tracked_cv, tmp_path):
    """`gmpatl cv` on the session's cluster, its stages reused from the session's trained fold (training
    has tests of its own): the table, the MLflow run tree with its artifacts, and `gmpatl report`."""
    from mlflow import MlflowClient

    _, trained = trained_fold
    config_file, out, result = tracked_cv["config"], tracked_cv["out"], tracked_cv["result"]
    assert "fold 1: WAR" in result.stdout and "mean UAR" in result.stdout
    table = pd.read_csv(out / "reports" / table_run(result.stdout) / "cv_results.csv")
    assert table["fold"].tolist() == [1] and table["uar"].tolist() == pytest.approx([trained.uar], abs=1e-4)
    assert table["reused"].tolist() == ["stage1,features,gmps,stage2,stage3"]

    client = MlflowClient(tracking_uri=tracked_cv["uri"])
    experiment = client.get_experiment_by_name("cv-test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs["cv-gmpatl-demo"]
    assert table_run(result.stdout) == parent.info.run_id  # the run's reports are in a folder of its own
    # The link opens the runs table, not MLflow 3.17's GenAI view (which the experiment tag does not change)
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert f"MLflow UI: {link} after: mlflow ui --backend-store-uri {tracked_cv['uri']}" in result.stdout
    # Every stage was reused, so the progress view says so for each, and nothing else of Ray's is shown
    assert [
        line.split(" · ")[1] for line in result.stdout.splitlines() if "reused from the cache" in line
    ] == [
        "stage1",
        "features",
        "gmps",
        "stage2",
        "stage3",
    ]
    assert sorted(runs) == ["cv-gmpatl-demo", "fold-1", "fold-1-stage1", "fold-1-stage2", "fold-1-stage3"]
    assert runs["fold-1"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["mean_uar"] == pytest.approx(table["uar"].mean())
    assert parent.data.params["stage3.margin"] == "0.2" and "config_fingerprint" in parent.data.params
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "config.yaml",
        "cv_results.csv",
        "cv_results.md",
        "confusion_all.png",
    }
    fold1 = runs["fold-1"].info.run_id
    fold1_artifacts = {a.path for a in client.list_artifacts(fold1)}
    assert fold1_artifacts == {"confusion_fold1.png", "curves_fold1.png", "predictions_fold1.csv", "model"}
    model = Path(client.download_artifacts(fold1, "model", str(tmp_path / "downloaded")))
    assert (model / "MLmodel").is_file()  # an MLflow pyfunc model (tests/test_predict.py uses it)
    assert HubertModel.from_pretrained(model / "artifacts" / "weights" / "backbone").config.hidden_size == 32
    predicted = pd.read_csv(client.download_artifacts(fold1, "predictions_fold1.csv", str(tmp_path)))
    assert len(predicted) == table["test_utterances"][0]
    assert set(predicted["predicted"]) <= {"ang", "hap", "neu", "sad"}
    assert runs["fold-1"].data.metrics["test_uar"] == pytest.approx(table["uar"][0])

    stage2 = runs["fold-1-stage2"]  # a run per stage under its fold, with per-epoch metrics
    assert stage2.data.tags["mlflow.parentRunId"] == fold1 and stage2.data.tags["gmpatl.reused"] == "true"
    assert stage2.data.params["stage2.mask_length"] == "10"
    stage1_loss = client.get_metric_history(runs["fold-1-stage1"].info.run_id, "train_loss")
    assert [m.step for m in stage1_loss] == [0, 1, 2]

    report = in_process("report", "--config", str(config_file), "--csv", str(tmp_path / "report.csv"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"CV run {parent.info.run_id}" in report.stdout
    assert f"mean UAR {table['uar'].mean():.1%}" in report.stdout
    reported = pd.read_csv(tmp_path / "report.csv")
    assert reported["fold"].tolist() == [1]
    assert reported["uar"].tolist() == pytest.approx(table.sort_values("fold")["uar"].tolist(), abs=1e-4)


def test_unknown_fold_exits_2(small_corpus, tmp_path):
    config_file = tmp_path / "small.yaml"
    config_file.write_text(dump_config(small_config(small_corpus[0], f"experiment.output_dir={tmp_path}")))
    result = run(str(GMPATL), "cv", "--config", str(config_file), "--folds", "1,7")
    assert result.returncode == 2
    assert "--folds 1,7: no fold ['7']; the manifest's folds are [1, 2]" in result.stderr


@pytest.mark.parametrize("job", ["prepare", "extract", "cluster", "cv", "train", "predict", "report"])
def test_every_job_entrypoint_wraps_its_command(job):
    result = run(sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: gmpatl {job}")


def test_report_without_runs_exits_2_naming_what_is_missing(tmp_path):
    config_file = tmp_path / "small.yaml"
    config_file.write_text(dump_config(small_config(tmp_path, "tracking.experiment=nothing-here")))
    result = in_process("report", "--config", str(config_file))
    assert result.returncode == 2
    assert "no MLflow experiment 'nothing-here'" in result.stderr
    swept = in_process("report", "--config", str(config_file), "--sweep", "none")
    assert swept.returncode == 2 and "no MLflow experiment 'nothing-here'" in swept.stderr


def test_sweep_needs_a_sweep_section():
    result = run(str(GMPATL), "sweep", "--config", str(REPO / "configs" / "demo.yaml"))
    assert result.returncode == 2
    assert "gmpatl sweep needs a config with a sweep section" in result.stderr


def test_tracking_sync_of_a_missing_file_exits_2_naming_it(tmp_path):
    missing = tmp_path / "tracking-offline" / "gone.jsonl"
    result = run(str(GMPATL), "tracking-sync", str(missing))
    assert result.returncode == 2
    assert f"{missing}: no such tracking-offline file (already sent?)" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine it measures (tests/test_gpu.py)")
def test_gpu_check_says_there_is_no_gpu_and_exits_0():
    result = run("make", "gpu-check")
    assert result.returncode == 0, result.stderr
    assert "gpu-check: no CUDA GPU here, so nothing to measure" in result.stdout
