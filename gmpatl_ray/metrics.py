"""SER metrics: WAR (weighted average recall = accuracy) and UAR (unweighted average recall = the mean of
per-class recalls), and the confusion matrix, with a fixed class order so folds add up."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix


def war(truth: Sequence, predicted: Sequence) -> float:
    return float(np.mean(np.asarray(truth) == np.asarray(predicted)))


def uar(truth: Sequence, predicted: Sequence) -> float:
    """Mean recall over the classes present in ``truth`` (IEMOCAP's UAR)."""
    return float(balanced_accuracy_score(truth, predicted))


def confusion(truth: Sequence, predicted: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class, in ``classes`` order."""
    return confusion_matrix(truth, predicted, labels=list(classes))
