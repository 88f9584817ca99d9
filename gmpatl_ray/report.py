"""Results of past CV runs and sweeps, read back from MLflow (the record every run writes, wherever it ran).

``gmpatl report`` finds a CV parent run (the latest of the experiment, or one given by id), reads its fold
runs and prints the per-fold WAR/UAR table with the mean and standard deviation over folds. With
``--sweep NAME`` it prints one row per trial of that sweep: the swept values and the means over folds; a
sweep over ``backbone.pretrained`` (``configs/backbones.yaml``) gets the published frozen-backbone figure of
each checkpoint beside its row.
"""

from __future__ import annotations

import pandas as pd

from .errors import InputError
from .tracking import filter_value

PARAM_TAG = "gmpatl.param."
"""Tag prefix of a sweep trial's swept values (set by :mod:`gmpatl_ray.sweep`)."""


REFERENCE_COLUMN = "frozen probe WA %"
FROZEN_PROBE_WA = {
    "facebook/wav2vec2-base": 63.4,
    "facebook/hubert-base-ls960": 64.9,
    "microsoft/wavlm-base": 65.9,
    "microsoft/wavlm-base-plus": 68.0,
    "facebook/hubert-large-ll60k": 67.6,
    "microsoft/wavlm-large": 70.0,
}
"""IEMOCAP 4-class leave-one-session-out weighted accuracy of each checkpoint frozen, with a linear probe on
its layers (the SUPERB ER protocol), as tabulated in the emotion2vec paper (Ma et al., 2023, Table 2): what
the backbone gives without any of GMP-ATL's training, a floor to read a trial's WAR against, not a result of
this method. Checkpoints without a figure there show none."""
REFERENCE_NOTE = (
    f"{REFERENCE_COLUMN}: the checkpoint frozen with a linear probe (SUPERB ER, IEMOCAP 4 classes, leave one "
    "session out; emotion2vec paper, Table 2), not GMP-ATL: compare with WAR %"
)


def frozen_probe_wa(checkpoint: str) -> float | None:
    """The figure of a hub id, or of a local copy named as the hub id's last part (``hf download
    microsoft/wavlm-large --local-dir /models/wavlm-large``); None for any other checkpoint."""
    if checkpoint in FROZEN_PROBE_WA:
        return FROZEN_PROBE_WA[checkpoint]
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    return next((wa for hub_id, wa in FROZEN_PROBE_WA.items() if hub_id.rsplit("/", 1)[-1] == name), None)


class ReportError(InputError):
    """No such experiment or run in the tracking store."""


def cv_report(uri: str, experiment: str, run_id: str | None = None) -> tuple[str, pd.DataFrame]:
    """``(parent run id, table)``: one row per fold (fold, war, uar, test_utterances), in fold order."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no MLflow experiment {experiment!r} at {uri}")
    if run_id is None:
        latest = client.search_runs(
            [found.experiment_id],
            "tags.`gmpatl.kind` = 'cv'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not latest:
            raise ReportError(f"experiment {experiment!r} at {uri} has no CV run (gmpatl cv)")
        run_id = latest[0].info.run_id
    folds = client.search_runs(
        [found.experiment_id],
        f"tags.`mlflow.parentRunId` = {filter_value(run_id)} and tags.`gmpatl.kind` = 'fold'",
    )
    rows = [
        {
            "fold": run.data.tags["gmpatl.fold"],
            "war": run.data.metrics.get("test_war"),
            "uar": run.data.metrics.get("test_uar"),
            "best_val_uar": run.data.metrics.get("best_val_uar"),
            "status": run.info.status,
        }
        for run in folds
    ]
    if not rows:
        raise ReportError(f"run {run_id} in experiment {experiment!r} has no fold runs")
    table = pd.DataFrame(rows)
    table = table.iloc[sorted(range(len(table)), key=lambda i: _fold_order(table["fold"][i]))]
    return run_id, table.reset_index(drop=True)


def sweep_report(uri: str, experiment: str, sweep: str) -> pd.DataFrame:
    """One row per trial of ``sweep``, in trial order: its swept values, mean validation UAR, mean and std
    of test UAR and WAR over its folds, folds finished, status."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no MLflow experiment {experiment!r} at {uri}")
    trials = client.search_runs(
        [found.experiment_id], f"tags.`gmpatl.sweep` = {filter_value(sweep)} and tags.`gmpatl.kind` = 'cv'"
    )
    if not trials:
        raise ReportError(f"experiment {experiment!r} at {uri} has no trials of sweep {sweep!r}")
    rows = []
    for run in trials:
        tags, metrics = run.data.tags, run.data.metrics
        params = {k.removeprefix(PARAM_TAG): v for k, v in tags.items() if k.startswith(PARAM_TAG)}
        folds = client.search_runs(
            [found.experiment_id],
            f"tags.`mlflow.parentRunId` = {filter_value(run.info.run_id)} and tags.`gmpatl.kind` = 'fold'",
        )
        rows.append(
            {
                "trial": tags.get("gmpatl.trial", run.info.run_name),
                **params,
                "mean_val_uar": metrics.get("mean_val_uar"),
                "mean_uar": metrics.get("mean_uar"),
                "std_uar": metrics.get("std_uar"),
                "mean_war": metrics.get("mean_war"),
                "std_war": metrics.get("std_war"),
                "folds": sum(f.info.status == "FINISHED" for f in folds),
                "status": run.info.status,
            }
        )
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)  # Tune numbers trials in grid order


def format_sweep(table: pd.DataFrame) -> str:
    """The paper's layout: one row per setting, UAR and WAR in % as mean ± std over folds, then the
    validation UAR that ranks the trials (the best one marked)."""
    shown = table.drop(columns=["mean_uar", "std_uar", "mean_war", "std_war"])
    shown.insert(len(shown.columns) - 3, "UAR %", _mean_std(table["mean_uar"], table["std_uar"]))
    shown.insert(len(shown.columns) - 3, "WAR %", _mean_std(table["mean_war"], table["std_war"]))
    best = table["mean_val_uar"].idxmax() if table["mean_val_uar"].notna().any() else None
    shown["best"] = ["*" if i == best else "" for i in table.index]
    if "backbone.pretrained" not in table.columns:
        return shown.to_markdown(index=False, floatfmt=".4f")
    reference = [frozen_probe_wa(name) for name in table["backbone.pretrained"]]
    shown.insert(shown.columns.get_loc("WAR %") + 1, REFERENCE_COLUMN, pd.Series(reference, dtype=object))
    formats = [".1f" if column == REFERENCE_COLUMN else ".4f" for column in shown.columns]
    return shown.to_markdown(index=False, floatfmt=formats, missingval="") + "\n" + REFERENCE_NOTE


def _mean_std(mean: pd.Series, std: pd.Series) -> list[str]:
    return [
        "" if pd.isna(m) else f"{100 * m:.1f} ± {100 * (0 if pd.isna(s) else s):.1f}"
        for m, s in zip(mean, std, strict=True)
    ]


def format_report(table: pd.DataFrame) -> str:
    """The table as Markdown, then mean and std (over finished folds) of WAR and UAR."""
    done = table.dropna(subset=["war", "uar"])
    return (
        table.to_markdown(index=False, floatfmt=".4f")
        + f"\nmean WAR {done['war'].mean():.1%} (std {done['war'].std(ddof=0):.1%})"
        + f"  mean UAR {done['uar'].mean():.1%} (std {done['uar'].std(ddof=0):.1%})"
        + f"  over {len(done)} fold(s)"
    )


def _fold_order(fold: str) -> tuple[int, int | str]:
    return (0, int(fold)) if fold.isdigit() else (1, fold)
