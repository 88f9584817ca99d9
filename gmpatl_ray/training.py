"""What every stage shares on Ray Train: the audio dataset and its padded batches, the one training loop,
checkpoints that load without unpickling code, and the trainer built from ``config.train``.

A stage is a *recipe* module (``gmpatl_ray.stages.stageN``) with four functions the loop calls:
``build_model(config, loop)``, ``dataset(config, loop, rows, train)``, ``loss(model, batch, config)`` and
``evaluate(model, loop, config) -> metrics`` (``metrics["score"]``: higher is better, picks the best
epoch). The run name is the stage's fingerprint, so rerunning an interrupted stage resumes it from its
last checkpoint (Ray Train V2: same ``storage_path`` and ``name``).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import Config, TrainConfig
from .data.audio import load_audio
from .errors import InputError

CHECKPOINT_FILE = "state.pt"
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


class AudioDataset(Dataset):
    """Manifest rows -> (waveform, row); training crops long utterances to a seeded random window."""

    def __init__(self, rows: list[dict[str, Any]], max_samples: int | None, seed: int):
        self.rows = rows
        self.max_samples = max_samples
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        wave = load_audio(self.rows[i]["path"])
        if self.max_samples and len(wave) > self.max_samples:
            start = np.random.default_rng([self.seed, self.epoch, i]).integers(len(wave) - self.max_samples)
            wave = wave[start : start + self.max_samples]
        return wave, self.rows[i]


def emotion_rows(split, emotions: list[str]) -> list[dict[str, Any]]:
    """Manifest rows as the emotion stages (1 and 3) train on them: path, emotion index, gender index."""
    return [
        {"path": r.path, "emotion": emotions.index(r.emotion), "gender": "FM".index(r.gender)}
        for r in split.itertuples()
    ]


def emotion_dataset(
    config: Config, loop: dict[str, Any], data: list[dict[str, Any]], train: bool
) -> AudioDataset:
    """The ``dataset`` recipe function of the emotion stages: training crops, whole utterances otherwise."""
    return AudioDataset(data, training_crop(config) if train else None, config.experiment.seed)


def collate(items: list[tuple[np.ndarray, dict[str, Any]]]) -> dict[str, Any]:
    """Zero-padded waveforms, their lengths, and each row field: ints as a tensor, int arrays (frame labels)
    as a tensor padded with -100 (cross-entropy's ignore index), anything else as a list."""
    lengths = torch.tensor([len(w) for w, _ in items])
    waves = torch.zeros(len(items), int(lengths.max()))
    for i, (wave, _) in enumerate(items):
        waves[i, : len(wave)] = torch.from_numpy(wave)
    batch: dict[str, Any] = {"waves": waves, "lengths": lengths}
    for key in items[0][1]:
        values = [row[key] for _, row in items]
        if isinstance(values[0], np.ndarray):
            padded = torch.full((len(values), max(len(v) for v in values)), -100, dtype=torch.long)
            for i, v in enumerate(values):
                padded[i, : len(v)] = torch.from_numpy(v.astype(np.int64))
            batch[key] = padded
        else:
            batch[key] = torch.tensor(values) if isinstance(values[0], int) else values
    return batch


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Tensors, numbers and strings only, so :func:`load_state` can use ``weights_only=True``."""
    torch.save(state, folder / CHECKPOINT_FILE)


class CheckpointMismatch(InputError):
    """A checkpoint written by another stage run (another config fingerprint) than the one loading it."""


def load_state(folder: str | Path, fingerprint: str) -> dict[str, Any]:
    """The state in ``folder``, refused unless it was written by the run ``fingerprint``: resuming from
    another config's checkpoint would silently mix two experiments. Never unpickles code."""
    path = Path(folder) / CHECKPOINT_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"{path}: written by stage run {state.get('fingerprint')!r}, not {fingerprint!r} "
            "(a checkpoint of another config); refusing to load it"
        )
    return state


def run_record(state: dict[str, Any]) -> dict[str, Any]:
    """What a stage artifact records of its training run: the best epoch, the per-epoch history, the
    optimizer steps taken and the epochs at which a restarted run resumed from a checkpoint."""
    return {
        "best_epoch": state["best"]["epoch"],
        "history": state["history"],
        "steps": state["steps"],
        "resumed_at_epochs": state["resumes"],
    }


def prepare_backbone(backbone: torch.nn.Module, config: Config, masking: bool = False) -> None:
    """Training settings every stage applies to HuBERT. DDP refuses parameters that get no gradient, so
    LayerDrop is off and the mask embedding trains only in the stage that masks (``masking``)."""
    backbone.config.layerdrop = 0.0
    backbone.masked_spec_embed.requires_grad_(masking)
    if config.train.freeze_feature_encoder:
        backbone.feature_extractor._freeze_parameters()
    if config.train.gradient_checkpointing:  # non-reentrant: the variant that works under DDP
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def training_crop(config: Config) -> int:
    return int(config.train.max_duration_s * config.data.sample_rate)


def batches(data: Dataset, batch_size: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """Evaluation batches in order, moved to ``device`` (the model's: validation runs where training does)."""
    from torch.utils.data import DataLoader

    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def emotion_scores(
    model: torch.nn.Module,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows: list[dict[str, Any]],
    batch_size: int,
) -> dict:
    """WAR, UAR and the predictions of ``predict(waves, lengths) -> emotion logits`` (a call of ``model``,
    in eval mode on its device) over all ``rows``: one worker, whole utterances."""
    from .metrics import uar, war

    model.eval()
    truth, predicted = [], []
    with torch.no_grad():
        for batch in batches(AudioDataset(rows, None, 0), batch_size, next(model.parameters()).device):
            truth += batch["emotion"].tolist()
            predicted += predict(batch["waves"], batch["lengths"]).argmax(-1).tolist()
    return {
        "war": war(truth, predicted),
        "uar": uar(truth, predicted),
        "truth": truth,
        "predicted": predicted,
    }


def stage_inputs(config: Config, split) -> dict[str, Any]:
    """What every stage's result depends on besides its own section and backbone: the training settings
    that change the model (not the worker count, storage or recomputation), the fold's utterances, the
    seed."""
    return {
        "train": config.train.model_dump(
            exclude={
                "num_workers",
                "cpus_per_worker",
                "max_failures",
                "storage_path",
                "gradient_checkpointing",
                "poll_interval_s",
            }
        ),
        "data": {
            "emotions": config.data.emotions,
            "train": sorted(split.train["utt_id"]),
            "val": sorted(split.val["utt_id"]),
        },
        "seed": config.experiment.seed,
    }


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """The HuBERT as ``save_pretrained`` writes it (transformers loads it) and the heads' weights."""
    model.backbone.save_pretrained(folder / "backbone")
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    torch.save(heads, folder / "heads.pt")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP's wrapper (what checkpoints hold)."""
    return model.module if hasattr(model, "module") else model


def train_fn(loop: dict[str, Any]) -> None:
    """One Ray Train worker: resume from the last checkpoint if any, train, validate (rank 0), report."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    recipe = importlib.import_module(loop["recipe"])
    config = Config.model_validate(loop["config"])
    optim = getattr(config, loop["section"]).optim
    torch.set_num_threads(config.train.cpus_per_worker)
    model = recipe.build_model(config, loop)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=optim.lr)
    start, best, history = 0, {"score": float("-inf"), "epoch": -1, "model": {}}, []
    steps, resumes = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group, or a rerun of an interrupted stage: go on where it was
        with checkpoint.as_directory() as folder:
            state = load_state(folder, loop["fingerprint"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = state["epoch"] + 1, state["best"], state["history"]
        steps, resumes = state["steps"], [*state["resumes"], start]
    model = ray.train.torch.prepare_model(model)
    dataset = recipe.dataset(config, loop, loop["train"], train=True)
    context = ray.train.get_context()
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(
            dataset,
            batch_size=optim.batch_size // context.get_world_size(),  # the configured batch is global
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(config.experiment.seed),
        )
    )
    rank = context.get_world_rank()
    device = "cuda" if config.train.use_gpu else "cpu"
    # Dropout and stage 2's masks draw from torch's global generator: seed it per run, worker and epoch
    # resumed from, so a run is reproducible and a resumed one does not replay the first epochs' draws.
    torch.manual_seed(int(np.random.SeedSequence([config.experiment.seed, rank, start]).generate_state(1)[0]))
    for epoch in range(start, optim.epochs):
        dataset.epoch = epoch
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        total, count, started = 0.0, 0, time.perf_counter()
        for batch in loader:
            with torch.autocast(device, torch.bfloat16, enabled=config.train.precision == "bf16"):
                loss = recipe.loss(model, batch, config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            total, count = total + loss.item() * len(batch["lengths"]), count + len(batch["lengths"])
        seconds = time.perf_counter() - started
        if context.get_world_size() > 1:  # the loss over every worker's share of the epoch
            sums = torch.tensor([total, count], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            total, count = sums.tolist()
        metrics = {
            "epoch": epoch,
            "train_loss": total / count,
            "steps": steps,
            "train_seconds": seconds,
            "train_utterances_per_s": len(dataset) / seconds,
        }
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                metrics |= {f"val_{k}": v for k, v in recipe.evaluate(unwrap(model), loop, config).items()}
                history.append(metrics)
                if metrics["val_score"] > best["score"]:
                    best = {
                        "score": metrics["val_score"],
                        "epoch": epoch,
                        "model": unwrap(model).state_dict(),
                    }
                state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
                save_state(
                    Path(folder),
                    state
                    | {"epoch": epoch, "best": best, "history": history, "steps": steps, "resumes": resumes}
                    | {"fingerprint": loop["fingerprint"]},
                )
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            )


def fit(recipe: str, section: str, loop: dict[str, Any], train: TrainConfig, name: str) -> dict[str, Any]:
    """Run ``recipe`` on ``train.num_workers`` workers under the run name ``name``; returns the final
    checkpoint's state (best model, history)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train reads this in its controller and propagates it there from the driver's environment when
    # the trainer is built; it has no argument of its own.
    os.environ[POLL_INTERVAL_ENV] = str(train.poll_interval_s)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={**loop, "recipe": recipe, "section": section, "fingerprint": name},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(train.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        return load_state(folder, name)
