"""Disk that Ray Train checkpoints take: what one stage checkpoint of HuBERT base's size weighs, what a
storage folder (``train.storage_path``) holds now, and what that means for the paper's IEMOCAP CV.

A checkpoint holds the live weights, the best epoch's copy and Adam's two moments. Before, the "copy" was a
view of the live weights (torch.save wrote them once, so checkpoints were smaller, and wrong), and Ray
Train kept one per epoch of every stage until the end; now it keeps ``train.checkpoints_to_keep`` (1) while
a stage runs, and the folder goes once the stage's artifact is in the cache.

    .venv/bin/python benchmarks/disk.py [--storage outputs/demo/ray_train]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.models.backbone import load_backbone  # noqa: E402
from gmpatl_ray.stages import stage1, stage2, stage3  # noqa: E402
from gmpatl_ray.training import CHECKPOINT_FILE, save_state, weights_copy  # noqa: E402

GB = 1e9
REPO = Path(__file__).resolve().parents[1]


def checkpoint_bytes(model: torch.nn.Module, folder: Path) -> tuple[int, int]:
    """Sizes of the checkpoint the training loop writes for ``model`` after one Adam step: as before (the
    best epoch a view of the live weights) and now (a copy)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    optimizer.step()
    sizes = []
    for best_weights in (model.state_dict(), weights_copy(model)):
        best = {"score": 0.0, "epoch": 0, "model": best_weights}
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best, "epoch": 0}
        save_state(folder, state | {"history": [], "steps": 1, "resumes": [], "fingerprint": "benchmark"})
        sizes.append((folder / CHECKPOINT_FILE).stat().st_size)
    return sizes[0], sizes[1]


def storage(path: Path) -> None:
    runs = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    checkpoints = [c for run in runs for c in run.glob("checkpoint_*") if c.is_dir()]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    print(f"{path}: {len(runs)} run folders, {len(checkpoints)} checkpoints, {size / 1e6:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", type=Path, help="a train.storage_path to count")
    args = parser.parse_args()
    if args.storage:
        storage(args.storage)
    paper = load_config(
        REPO / "configs" / "iemocap.yaml", ["backbone.pretrained=null", "backbone.random_init={}"]
    )
    sizes, old = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone = Path(tmp) / "hubert"
        load_backbone(paper.backbone).save_pretrained(backbone)
        loop = {"backbone_dir": str(backbone)}
        for name, model in [
            ("stage1", stage1.build_model(paper)),
            ("stage2", stage2.build_model(paper, loop)),
            ("stage3", stage3.build_model(paper, loop)),
        ]:
            folder = Path(tmp) / name
            folder.mkdir()
            before, sizes[name] = checkpoint_bytes(model, folder)
            old[name] = before
            now = sizes[name]
            print(f"{name} checkpoint, HuBERT base size: {before / GB:.2f} GB before, {now / GB:.2f} GB now")
    epochs = {s: getattr(paper, s).optim.epochs for s in sizes}
    folds = 5
    before = folds * sum(epochs[s] * old[s] for s in sizes)
    keep = paper.train.checkpoints_to_keep
    running = (keep + 1) * max(sizes.values())  # the newest is written before the oldest goes
    print(f"IEMOCAP CV ({folds} folds, epochs {epochs}), every epoch kept: {before / GB:.0f} GB at its end")
    print(f"now: at most {keep + 1} checkpoints a running stage ({running / GB:.1f} GB), none a finished one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
