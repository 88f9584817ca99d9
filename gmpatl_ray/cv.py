"""Leave-one-fold-out splits: fold k tests on its own utterances and trains on every other fold; the
validation set for model selection is carved out of the training folds, never the test fold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data.manifest import fold_column, folds
from .errors import InputError


@dataclass(frozen=True)
class FoldSplit:
    fold: object
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def split_fold(manifest: pd.DataFrame, fold, val_fraction: float, seed: int) -> FoldSplit:
    """Train/validation/test for ``fold``; the validation share is drawn per emotion (stratified), seeded."""
    column = fold_column(manifest)
    available = folds(manifest)
    if fold not in available:
        raise InputError(
            f"fold {fold!r} has no test utterances: the manifest's {column} values are {available}"
        )
    test = manifest[manifest[column] == fold]
    rest = manifest[manifest[column] != fold]
    if rest.empty:
        raise InputError(f"fold {fold!r} leaves no training utterances: the manifest has one {column} only")
    rng = np.random.default_rng(seed)
    val_index = []
    for _, group in rest.groupby("emotion", sort=True):
        n = int(round(len(group) * val_fraction))
        val_index += list(rng.choice(group.index.to_numpy(), size=min(n, len(group) - 1), replace=False))
    val = rest.loc[sorted(val_index)]
    train = rest.drop(index=val.index)
    return FoldSplit(
        fold, train.reset_index(drop=True), val.reset_index(drop=True), test.reset_index(drop=True)
    )
