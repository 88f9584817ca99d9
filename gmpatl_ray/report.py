"""Results of past CV runs, read back from MLflow (the record every run writes, wherever it ran).

``gmpatl report`` finds a CV parent run (the latest of the experiment, or one given by id), reads its fold
runs and prints the per-fold WAR/UAR table with the mean and standard deviation over folds.
"""

from __future__ import annotations

import pandas as pd

from .errors import InputError


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
        f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`gmpatl.kind` = 'fold'",
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
