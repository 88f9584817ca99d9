"""Ray Tune sweeps on a real local Ray cluster: the paper's Table 3 as 4 trials that train stage 1 and
stage 2 once for the fold (counted as Ray Train runs), each trial in MLflow with its fold run, and
`gmpatl report --sweep` printing them; Table 4 on the stages Table 3 left; a sweep whose driver is killed
resumes, and a trial that always raises is retried, then listed as failed. A backbone sweep's report
stands beside the published frozen-backbone figures."""

from __future__ import annotations

import json
import os
import subprocess

import pandas as pd
import pytest
from conftest import REPO, TINY_TRAINING, small_config
from mlflow import MlflowClient
from processes import kill_group, start_group, wait_for
from test_cli import GMPATL, in_process, run
from test_faults import runs_by_name

from gmpatl_ray.config import ConfigError, dump_config, load_config
from gmpatl_ray.gmp_report import report_backbones
from gmpatl_ray.report import REFERENCE_COLUMN, format_sweep
from gmpatl_ray.sweep import DEVICES_FILE, run_sweep, sweep_devices, trial_config

SPACE = "sweep={space: {stage3.margin: {grid: [0.2, 0.3]}, stage3.scale: {grid: [10, 30]}}}"
STAGES = ("stage1", "stage2", "stage3")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One output folder (stage cache, Ray Train runs, MLflow store) for every sweep here, as on a cluster:
    later sweeps reuse the stages earlier ones built."""
    return tmp_path_factory.mktemp("sweeps")


def built_runs(shared) -> set[str]:
    """Ray Train runs of stages (their folders are kept in these sweeps: ``sweep_config``)."""
    return {run.name for run in (shared / "ray_train").glob("stage*-*")}


def count(runs: set[str]) -> dict[str, int]:
    return {stage: sum(run.startswith(f"{stage}-") for run in runs) for stage in STAGES}


def sweep_config(folder, shared, name: str, *overrides: str):
    return small_config(
        folder,
        f"experiment.output_dir={shared}",
        f"experiment.cache_dir={shared / 'cache'}",
        f"experiment.name={name}",
        "tracking.experiment=sweep-test",
        "tracking.log_model=false",
        "train.cpus_per_worker=1",  # two trials' stages side by side on the 2 CPUs
        "train.keep_run_folders=true",  # stage runs are counted by their Ray Train folders
        *TINY_TRAINING,
        *overrides,
    )


def test_a_trial_is_the_experiment_with_its_values(tmp_path):
    config = small_config(tmp_path, SPACE)
    trial = trial_config(config.model_dump(mode="json"), {"stage3.margin": 0.3, "stage3.scale": 10})
    assert trial.stage3.margin == 0.3 and trial.stage3.scale == 10 and trial.sweep is None
    assert trial.stage1 == config.stage1


def test_a_space_that_does_not_fit_the_config_fails_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.space.stage3.margn: value 0.1 gives stage3.margn"):
        small_config(tmp_path, "sweep={space: {stage3.margn: {grid: [0.1]}}}")
    with pytest.raises(ConfigError, match=r"sweep.space.stage1.alpha_e: value 1.5 gives stage1.alpha_e"):
        small_config(tmp_path, "sweep={space: {stage1.alpha_e: {uniform: [0.5, 1.5]}}}")
    with pytest.raises(ConfigError, match="give exactly one of grid, choice, uniform, loguniform"):
        small_config(tmp_path, "sweep={space: {gmp.layer: {grid: [-1], choice: [-2]}}}")
    with pytest.raises(
        ConfigError, match=r"train.num_workers 0 \(Ray Train's local mode\) does not run in a"
    ):
        small_config(tmp_path, "train.num_workers=0", SPACE)  # Tune's trial context breaks local mode


def test_a_sweep_config_extends_the_demo():
    sweep = load_config(REPO / "configs" / "sweep.yaml")
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert sweep.backbone == demo.backbone and sweep.stage1 == demo.stage1
    assert set(sweep.sweep.space) == {"stage3.margin", "stage3.scale"}


CHECKPOINTS = [
    "facebook/hubert-base-ls960",
    "facebook/hubert-large-ll60k",
    "microsoft/wavlm-base",
    "microsoft/wavlm-base-plus",
    "microsoft/wavlm-large",
    "facebook/wav2vec2-base",
    "facebook/wav2vec2-large-lv60",
    "facebook/data2vec-audio-base",
    "facebook/data2vec-audio-large",
]


def test_the_backbone_sweep_is_every_familys_base_and_large_checkpoint():
    config = load_config(REPO / "configs" / "backbones.yaml")
    assert config.sweep.space["backbone.pretrained"].grid == CHECKPOINTS  # the README's table
    compared = [c.backbone.pretrained for c in report_backbones(config)]  # what gmp-report compares
    assert compared == CHECKPOINTS
    assert config.extract.layers == list(range(-1, -13, -1))  # the base models' 12 layers, in every model
    assert (config.train.precision, config.train.gradient_checkpointing) == ("bf16", True)


def test_a_backbone_sweep_is_reported_beside_the_published_frozen_probe_figures():
    table = pd.DataFrame(
        {
            "trial": ["t0", "t1", "t2"],
            "backbone.pretrained": ["microsoft/wavlm-large", "/models/wav2vec2-base/", "/my/checkpoint"],
            "mean_val_uar": [0.71, 0.62, 0.5],
            "mean_uar": [0.752, 0.66, 0.4],
            "std_uar": [0.01, 0.02, 0.0],
            "mean_war": [0.741, 0.65, 0.4],
            "std_war": [0.01, 0.02, 0.0],
            "folds": [5, 5, 5],
            "status": ["FINISHED"] * 3,
        }
    )
    text = format_sweep(table)
    header, _, *lines = [[c.strip() for c in line.split("|")] for line in text.splitlines()[:5]]
    rows = {cells[2]: cells for cells in lines}
    column = header.index(REFERENCE_COLUMN)
    assert header[column - 1] == "WAR %"  # read beside the trial's WAR
    assert rows["microsoft/wavlm-large"][column - 1 : column + 1] == ["74.1 ± 1.0", "70.0"]
    assert rows["/models/wav2vec2-base/"][column] == "63.4"  # a local copy named as README says
    assert rows["/my/checkpoint"][column] == ""  # no published figure: none shown
    assert "linear probe" in text and "not GMP-ATL" in text
    assert REFERENCE_COLUMN not in format_sweep(table.drop(columns="backbone.pretrained").assign(x=[1, 2, 3]))


@pytest.mark.usefixtures("ray_cluster")
def test_a_resumed_sweep_keeps_the_devices_it_started_with(small_corpus, tmp_path, capsys):
    """``auto`` is resolved when a sweep starts and kept with it: a resume on a cluster whose GPUs came or
    went meanwhile continues with the first run's devices, so its trials still share GMPs and stages."""
    folder, _ = small_corpus
    config = small_config(folder)
    assert (config.extract.device, config.gmp.backend) == ("auto", "auto")
    first = sweep_devices(config, tmp_path, resume=False)
    assert (first.extract.device, first.gmp.backend) == ("cpu", "faiss")  # this cluster has no GPU
    # As if the first run had seen GPU nodes, which have scaled away since:
    (tmp_path / DEVICES_FILE).write_text(json.dumps({"device": "cuda", "backend": "cuml"}))
    resumed = sweep_devices(config, tmp_path, resume=True)
    assert (resumed.extract.device, resumed.gmp.backend) == ("cuda", "cuml")
    assert "(as when the sweep started)" in capsys.readouterr().out
    again = sweep_devices(config, tmp_path, resume=False)  # a new sweep of that name decides anew
    assert (again.extract.device, again.gmp.backend) == ("cpu", "faiss")


def shipped_space(table: str) -> str:
    """The ``sweep`` override that runs a shipped sweep's space on fold 1."""
    space = load_config(REPO / "configs" / f"{table}.yaml").sweep.space
    values = json.dumps({k: v.model_dump(exclude_none=True) for k, v in space.items()})
    return f"sweep={{space: {values}, folds: [1]}}"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_the_papers_table3_is_four_trials_that_share_stages_1_and_2_per_fold(small_corpus, shared, capsys):
    """Table 3's shipped space (GMPs on/off x CE/AM-Softmax) on the demo corpus: stage 1 once for the fold,
    stage 2 once (for "on"), stage 3 per trial. Its (on, AM-Softmax) trial is the config's defaults: the
    Table 4 and resume sweeps below reuse that trial's stages."""
    folder, manifest = small_corpus
    config = sweep_config(folder, shared, "table3", shipped_space("table3"))
    assert set(config.sweep.space) == {"stage2.enabled", "stage3.loss"}
    before = built_runs(shared)
    table = run_sweep(config, manifest, [1])
    assert len(table) == 4 and (table["folds_done"] == 1).all()
    assert sorted(zip(table["stage2.enabled"], table["stage3.loss"], strict=True)) == [
        (False, "amsoftmax"),
        (False, "ce"),
        (True, "amsoftmax"),
        (True, "ce"),
    ]
    assert table["mean_val_uar"].is_monotonic_decreasing  # ranked by validation, never by test
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert len(said) == 4 and all(": 1 fold(s), mean val UAR " in line for line in said)  # a line per trial

    trained = count(built_runs(shared) - before)
    assert trained == {"stage1": 1, "stage2": 1, "stage3": 4}  # stage 1 once for the fold, stage 2 once

    client = MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    trials = client.search_runs([experiment], "tags.`gmpatl.sweep` = 'table3'")
    assert len(trials) == 4
    # ``auto`` was resolved once, by the sweep, for every trial (the config said auto)
    assert config.extract.device == "auto" and config.gmp.backend == "auto"
    devices = {(t.data.params["extract.device"], t.data.params["gmp.backend"]) for t in trials}
    assert devices == {("cpu", "faiss")}
    for trial in trials:
        folds = client.search_runs(
            [experiment], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}' and tags.`gmpatl.kind` = 'fold'"
        )
        assert [f.data.tags["gmpatl.fold"] for f in folds] == ["1"]

    config_file = shared / "table3.yaml"
    config_file.write_text(dump_config(config))
    report = in_process("report", "--config", str(config_file), "--sweep", "table3")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "sweep 'table3' in experiment 'sweep-test'" in report.stdout and ": 4 trial(s)" in report.stdout
    rows = [line for line in report.stdout.splitlines() if line.startswith("| trial_")]
    assert len(rows) == 4 and all("FINISHED" in row for row in rows)  # one row per trial, each finished
    header = next(line for line in report.stdout.splitlines() if line.startswith("| trial"))
    assert all(f" {key} " in header for key in config.sweep.space) and "UAR %" in header and "WAR %" in header


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_the_papers_table4_runs_as_a_sweep_and_reports(small_corpus, shared):
    """The GMP layer: the tiny HuBERT has 3 layers, so -1 and -2 stand for the paper's -1 .. -8. Layer -2's
    stages come from Table 3's sweep (hence "at most"); -1 gets its own GMPs, stage 2 and stage 3."""
    folder, manifest = small_corpus
    assert set(load_config(REPO / "configs" / "table4.yaml").sweep.space) == {"gmp.layer"}
    config = sweep_config(
        folder, shared, "table4", "sweep={space: {gmp.layer: {grid: [-1, -2]}}, folds: [1]}"
    )
    before = built_runs(shared)
    table_rows = run_sweep(config, manifest, [1])
    assert len(table_rows) == 2 and (table_rows["folds_done"] == 1).all()  # every trial ran
    trained = count(built_runs(shared) - before)
    at_most = {"stage1": 1, "stage2": 2, "stage3": 2}
    assert all(trained[stage] <= at_most[stage] for stage in STAGES), trained

    config_file = shared / "table4.yaml"
    config_file.write_text(dump_config(config))
    report = in_process("report", "--config", str(config_file), "--sweep", "table4")
    assert report.returncode == 0, report.stderr[-3000:]
    header = next(line for line in report.stdout.splitlines() if line.startswith("| trial"))
    assert " gmp.layer " in header and "UAR %" in header and "WAR %" in header
    assert report.stdout.count("FINISHED") == 2  # one row per trial, each finished


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_sweep_resumes_without_rerunning_and_a_failing_trial_is_marked_failed(
    small_corpus, shared, ray_cluster
):
    """Two trials, one at a time: scales [4, 8] works, [100000] raises (more clusters than frames) on
    every try. The driver is killed as soon as the first trial's CV has finished (before Tune may have
    recorded it); `--resume` recomputes nothing and logs nothing twice for it, retries the other up to
    sweep.max_failures into one MLflow run and lists it as failed, and the sweep ends."""
    folder, _ = small_corpus
    config = sweep_config(
        folder,
        shared,
        "crash-sweep",
        "tracking.experiment=crash-sweep",
        "sweep={space: {gmp.scales: {grid: [[4, 8], [100000]]}}, folds: [1], max_concurrent_trials: 1, "
        "max_failures: 1}",
    )
    config_file = shared / "crash-sweep.yaml"
    config_file.write_text(dump_config(config))
    command = [str(GMPATL), "sweep", "--config", str(config_file)]
    client = MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")

    def trial_runs(scales: str) -> list:
        return [
            r
            for r in runs_by_name(client, "crash-sweep").values()
            for r in r
            if r.data.tags.get("gmpatl.param.gmp.scales") == scales
        ]

    environment = {**os.environ, **ray_cluster}  # the driver joins the session's cluster, as a job does
    driver = start_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    finished_runs = lambda: [r for r in trial_runs("[4, 8]") if r.info.status == "FINISHED"]  # noqa: E731
    [first] = wait_for("the first trial's CV to finish", finished_runs, timeout=400)
    assert driver.poll() is None  # the second trial is still to come: this kill is mid-sweep
    kill_group(driver)
    trained = built_runs(shared)

    result = run(*command, "--resume", env=ray_cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 2 trial(s) failed" in result.stdout
    assert result.stdout.count("failed (its error is in the run log)") == 1  # the trial line, after a restore
    finished = [line for line in result.stdout.splitlines() if "| finished" in line]
    failed = [line for line in result.stdout.splitlines() if "| failed: " in line]
    assert len(finished) == 1 and "[4, 8]" in finished[0]
    assert len(failed) == 1 and "100000" in failed[0] and "gmp.scales" in failed[0]

    assert built_runs(shared) == trained  # no stage trained again
    kept = trial_runs("[4, 8]")
    assert [(r.info.run_id, r.info.status) for r in kept] == [(first.info.run_id, "FINISHED")]  # not rerun
    retried = trial_runs("[100000]")
    assert len(retried) == 1 and retried[0].info.status == "FAILED"  # every try logged into one run
    assert retried[0].data.tags["gmpatl.resumed"] == "true"
