"""Leave-one-fold-out splits: fold k tests on its own utterances and trains on every other fold; the
validation set for model selection is carved out of the training folds, never the test fold: a seeded share
of each emotion (``stratified``, the same speakers as training) or the whole next fold (``session``, speakers
whose labels training never sees)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .data.manifest import fold_column, folds
from .errors import InputError

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class FoldSplit:
    fold: object
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def fold_split(config: Config, manifest: pd.DataFrame, fold) -> FoldSplit:
    """The split that ``config`` trains and selects fold ``fold``'s models on."""
    train = config.train
    return split_fold(manifest, fold, train.val_fraction, config.experiment.seed, train.validation)


def split_fold(
    manifest: pd.DataFrame, fold, val_fraction: float, seed: int, validation: str = "stratified"
) -> FoldSplit:
    """Train/validation/test for ``fold``. ``stratified``: ``val_fraction`` of each emotion of the training
    folds, drawn with ``seed``. ``session``: the fold after ``fold`` (in sorted order, wrapping round)."""
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
    if validation == "session":
        return _session_split(manifest, column, available, fold, test)
    train, val = _stratified(rest, val_fraction, seed)
    return FoldSplit(fold, train, val, test.reset_index(drop=True))


FINAL = "all"
"""The fold name of a final model's split: every utterance trains or validates, none is tested."""


def final_split(config: Config, manifest: pd.DataFrame) -> FoldSplit:
    """The split of a final model (``gmpatl train``): validation carved out of the whole corpus as in CV
    (a seeded share of each emotion, or for ``session`` the last fold whole), the rest trains; no test."""
    train = config.train
    column = fold_column(manifest)
    if train.validation == "session":
        available = folds(manifest)
        if len(available) < 2:
            raise InputError(
                f"train.validation=session needs 2 {column}s or more; the manifest has {available}"
            )
        held_out = manifest[column] == available[-1]
        parts = manifest[~held_out].reset_index(drop=True), manifest[held_out].reset_index(drop=True)
    else:
        parts = _stratified(manifest, train.val_fraction, config.experiment.seed)
    return FoldSplit(FINAL, *parts, manifest.iloc[0:0].reset_index(drop=True))


def _stratified(rest: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation): ``val_fraction`` of each emotion of ``rest`` validates, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    val_index = []
    for _, group in rest.groupby("emotion", sort=True):
        n = int(round(len(group) * val_fraction))
        val_index += list(rng.choice(group.index.to_numpy(), size=min(n, len(group) - 1), replace=False))
    val = rest.loc[sorted(val_index)]
    if val.empty:  # no epoch could be picked (the validation pass would crash at the first epoch)
        per_emotion = rest.groupby("emotion").size().to_dict()
        raise InputError(
            f"train.val_fraction {val_fraction} of the training utterances per emotion {per_emotion} rounds "
            "to no validation utterance; raise train.val_fraction or use train.validation=session"
        )
    return rest.drop(index=val.index).reset_index(drop=True), val.reset_index(drop=True)


def _session_split(
    manifest: pd.DataFrame, column: str, available: list, fold, test: pd.DataFrame
) -> FoldSplit:
    if len(available) < 3:
        raise InputError(
            f"train.validation=session holds out a whole {column} besides the test one, so it needs at least "
            f"3 of them; the manifest has {available}. Use train.validation=stratified."
        )
    held_out = available[(available.index(fold) + 1) % len(available)]
    val = manifest[manifest[column] == held_out]
    train = manifest[~manifest[column].isin([fold, held_out])]
    return FoldSplit(
        fold, train.reset_index(drop=True), val.reset_index(drop=True), test.reset_index(drop=True)
    )
