"""How much emotion and gender the GMPs carry: frame-level purity and NMI, per layer and scale.

Every frame takes its utterance's emotion and gender. Purity is the share of frames whose cluster's
majority class is their own class; NMI is scikit-learn's normalised mutual information between frame
labels and classes. It is the cheap diagnostic behind the paper's choice of layer -3: no training needed.
A config that sweeps ``backbone.pretrained`` (``configs/backbones.yaml``) gets the same layers and scales
for each of its backbones, one table and one plot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score

from .atomic import atomic_path
from .config import Config
from .gmp import GMPStore

BACKBONE_FIELD = "backbone.pretrained"


def purity(labels: np.ndarray, classes: np.ndarray) -> float:
    """Share of items in their cluster's majority class."""
    _, class_codes = np.unique(classes, return_inverse=True)
    n_classes = class_codes.max() + 1
    table = np.bincount(
        labels.astype(np.int64) * n_classes + class_codes, minlength=(labels.max() + 1) * n_classes
    )
    return float(table.reshape(-1, n_classes).max(axis=1).sum() / len(labels))


def report_backbones(config: Config) -> list[Config]:
    """The experiment once per backbone to compare: each ``backbone.pretrained`` its sweep lists, or the
    configured backbone alone."""
    from .sweep import trial_config

    space = config.sweep.space.get(BACKBONE_FIELD) if config.sweep else None
    if space is None:
        return [config]
    base = config.model_dump(mode="json")
    return [trial_config(base, {BACKBONE_FIELD: name}) for name in space.candidates()]


def backbone_name(config: Config) -> str:
    """The checkpoint (hub id or folder), or what a randomly initialised backbone is (family, size)."""
    size = config.backbone.random_init
    if size is None:
        return config.backbone.pretrained
    layout = ", large layout" if size.large_layout else ""
    return f"random {size.family} {size.num_hidden_layers}x{size.hidden_size}{layout}"


def label_quality(gmps: GMPStore, manifest: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """One row per scale: purity and NMI of frame labels against emotion and gender."""
    info = manifest.set_index("utt_id")
    frame_labels: dict[int, list[np.ndarray]] = {k: [] for k in gmps.scales}
    emotion, gender = [], []
    for utt_id, labels in gmps.iter_labels():
        n = len(labels[gmps.scales[0]])
        emotion.append(np.repeat(info.at[utt_id, "emotion"], n))
        gender.append(np.repeat(info.at[utt_id, "gender"], n))
        for k in gmps.scales:
            frame_labels[k].append(labels[k])
    emotion, gender = np.concatenate(emotion), np.concatenate(gender)
    rows = []
    for k in gmps.scales:
        labels = np.concatenate(frame_labels[k])
        rows.append(
            {
                "backbone": backbone,
                "layer": gmps.meta["layer"],
                "scale": k,
                "purity_emotion": purity(labels, emotion),
                "nmi_emotion": normalized_mutual_info_score(emotion, labels),
                "purity_gender": purity(labels, gender),
                "nmi_gender": normalized_mutual_info_score(gender, labels),
                "inertia_per_frame": gmps.meta["inertia_per_frame"][str(k)],
            }
        )
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=["", ".0f", ".0f"] + [".4f"] * (table.shape[1] - 3))


def save_report(table: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """Write the table as CSV and Markdown and plot NMI by layer (one line per scale, and per backbone
    when there are several); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": folder / "gmp_report.csv",
        "markdown": folder / "gmp_report.md",
        "plot": folder / "gmp_report.png",
    }
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(table) + "\n")
    several = table["backbone"].nunique() > 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, target in zip(axes, ("emotion", "gender"), strict=True):
        for (backbone, k), rows in table.groupby(["backbone", "scale"], sort=False):
            rows = rows.sort_values("layer")
            label = f"{Path(backbone).name} k={k}" if several else f"k={k}"  # a hub id's or folder's name
            ax.plot(rows["layer"], rows[f"nmi_{target}"], marker="o", label=label)
        ax.set_title(f"GMP labels vs {target}")
        ax.set_xlabel("layer (from the last)")
        ax.set_ylabel("NMI")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if several:  # one legend for both, below them
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize="small")
        fig.tight_layout(rect=(0, 0.08 + 0.05 * (len(axes[0].lines) // 4), 1, 1))
    else:
        axes[0].legend()
        axes[1].legend()
        fig.tight_layout()
    with atomic_path(paths["plot"]) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return paths
