"""One fold of GMP-ATL, stage by stage, every stage reused from the artifact cache when its inputs match:

    split -> stage 1 -> stage-1 HuBERT features of the training folds -> GMPs -> stage 2 -> stage 3 -> test

The k-means and stage 2 see the training folds only (train + validation utterances), never the test fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .artifacts import ArtifactCache
from .config import Config
from .cv import split_fold
from .features import extract_features
from .gmp import build_gmps_on_cluster
from .stages.stage1 import run_stage1
from .stages.stage2 import run_stage2
from .stages.stage3 import run_stage3


@dataclass
class FoldResult:
    fold: Any
    war: float
    uar: float
    confusion: list[list[int]]
    test_utterances: int
    built: dict[str, bool]
    """Which stages this call computed (False: reused from the cache)."""


def run_fold(config: Config, manifest: pd.DataFrame, fold: Any, cache: ArtifactCache) -> FoldResult:
    split = split_fold(manifest, fold, config.train.val_fraction, config.experiment.seed)
    stage1, built1 = run_stage1(config, split, cache)

    seen = pd.concat([split.train, split.val])  # the training folds: no test audio in k-means or stage 2
    stage1_features = config.model_copy(
        update={
            "backbone": config.backbone.model_copy(
                update={"pretrained": str(stage1.path / "backbone"), "random_init": None}
            ),
            "extract": config.extract.model_copy(update={"layers": [config.gmp.layer]}),
        }
    )
    features, built_features = extract_features(stage1_features, seen, cache)
    gmps, built_gmps = build_gmps_on_cluster(
        features, config.gmp.layer, config.gmp, config.experiment.seed, seen["utt_id"], cache
    )
    stage2, built2 = run_stage2(config, split, stage1.path / "backbone", gmps, cache)
    stage3, built3 = run_stage3(config, split, stage2.path / "backbone", cache)
    test = stage3.meta["test"]
    return FoldResult(
        fold=fold,
        war=test["war"],
        uar=test["uar"],
        confusion=test["confusion"],
        test_utterances=test["utterances"],
        built={
            "stage1": built1,
            "features": built_features,
            "gmps": built_gmps,
            "stage2": built2,
            "stage3": built3,
        },
    )


def run_cv(
    config: Config, manifest: pd.DataFrame, folds: list, cache: ArtifactCache, tracker
) -> pd.DataFrame:
    """Every fold, tracked in MLflow (a parent run, a child per fold); returns the per-fold table."""
    import numpy as np

    from .artifacts import fingerprint
    from .plots import confusion_plot
    from .tracking import flatten

    emotions = config.data.emotions
    reports = Path(config.experiment.output_dir) / "reports"
    resolved = config.model_dump(mode="json")
    parent = tracker.start(f"cv-{config.experiment.name}", tags={"gmpatl.kind": "cv"})
    tracker.params(parent, flatten(resolved) | {"config_fingerprint": fingerprint(resolved)})
    rows, total = [], np.zeros((len(emotions), len(emotions)), dtype=int)
    for fold in folds:
        child = tracker.start(
            f"fold-{fold}", parent=parent, tags={"gmpatl.kind": "fold", "gmpatl.fold": str(fold)}
        )
        result = run_fold(config, manifest, fold, cache)
        tracker.metrics(child, {"test_war": result.war, "test_uar": result.uar})
        plot = confusion_plot(
            result.confusion,
            emotions,
            f"fold {fold}: UAR {result.uar:.1%}",
            reports / f"confusion_fold{fold}.png",
        )
        tracker.artifact(child, plot)
        tracker.end(child)
        total += np.asarray(result.confusion)
        rows.append(
            {
                "fold": fold,
                "war": result.war,
                "uar": result.uar,
                "test_utterances": result.test_utterances,
                "reused": ",".join(k for k, built in result.built.items() if not built),
            }
        )
        print(f"fold {fold}: WAR {result.war:.1%}  UAR {result.uar:.1%}", flush=True)
    table = pd.DataFrame(rows)
    summary = {
        "mean_war": table["war"].mean(),
        "mean_uar": table["uar"].mean(),
        "std_war": table["war"].std(ddof=0),
        "std_uar": table["uar"].std(ddof=0),
    }
    tracker.metrics(parent, summary)
    reports.mkdir(parents=True, exist_ok=True)
    table.to_csv(reports / "cv_results.csv", index=False, float_format="%.4f")
    tracker.artifact(parent, reports / "cv_results.csv")
    tracker.artifact(
        parent,
        confusion_plot(
            total, emotions, f"all folds: UAR {summary['mean_uar']:.1%}", reports / "confusion_all.png"
        ),
    )
    tracker.end(parent)
    return table
