"""SER metrics: WAR (weighted average recall = accuracy) and UAR (unweighted average recall = the mean of
per-class recalls), and the confusion matrix, with a fixed class order so folds add up.

Plain numpy, the same numbers as scikit-learn's ``balanced_accuracy_score`` and ``confusion_matrix``
(tests/test_models.py compares them): every Ray Train worker scores its validation split, and importing
scikit-learn there costs about half a second a worker."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def war(truth: Sequence, predicted: Sequence) -> float:
    return float(np.mean(np.asarray(truth) == np.asarray(predicted)))


def uar(truth: Sequence, predicted: Sequence) -> float:
    """Mean recall over the classes present in ``truth`` (IEMOCAP's UAR)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)]))


def confusion(truth: Sequence, predicted: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class, in ``classes`` order (pairs with a class not
    in ``classes`` are not counted)."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        if t in index and p in index:
            matrix[index[t], index[p]] += 1
    return matrix
