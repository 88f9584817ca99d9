"""Figures people would rather look at than numbers: confusion matrices (counts and row-normalised) and
training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path


def confusion_plot(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    plt = _pyplot()
    matrix = np.asarray(matrix)
    recall = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}\n{recall[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if recall[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def training_curves(histories: dict[str, list[dict]], title: str, path: Path) -> Path:
    """One panel per stage against the epoch: losses on the left axis, validation scores (UAR, WAR) on the
    right (throughput and timings are left to MLflow's metric plots)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3.2), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items(), strict=True):
        epochs = [row["epoch"] for row in history]
        names = history[0] if history else {}
        scores = ax.twinx()
        shown = [n for n in names if n.endswith("loss") or n in ("val_uar", "val_war")]
        for i, name in enumerate(shown):  # one colour per line across both axes; scores dashed
            target, style = (ax, "-") if name.endswith("loss") else (scores, "--")
            values = [row[name] for row in history]
            target.plot(epochs, values, style, marker="o", color=f"C{i}", label=name)
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        scores.set_ylim(0, 1)
        lines = ax.get_lines() + scores.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)
    return path
