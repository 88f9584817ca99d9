"""What every stage shares on Ray Train: the audio dataset and its padded batches, the one training loop,
checkpoints that load without unpickling code, and the trainer built from ``config.train``.

A stage is a *recipe* module (``gmpatl_ray.stages.stageN``) with five functions the loop calls:
``build_model(config, loop)``, ``dataset(config, loop, rows, train)``, ``loss(model, batch, config)``,
``evaluate(model, loop, config) -> metrics`` (``metrics["score"]``: higher is better, picks the best
epoch) and ``finish(model, loop, config, best) -> meta`` (what the stage records of its kept model, e.g.
stage 3's test scores). The run name is the stage's fingerprint, so rerunning an interrupted stage resumes
it from its last checkpoint (Ray Train V2: same ``storage_path`` and ``name``).

Everything that needs the model runs inside the Ray Train run, on the workers' devices: rank 0 validates,
and at the end loads the best epoch's weights, writes the stage's artifact files into the cache's build
folder (``loop["out"]``, on shared storage), runs ``finish`` and checksums the files. The process that
called :func:`fit` (a CV driver, a Tune trial) gets back metadata only.

A resumed stage ends with the same weights as an uninterrupted one: the shuffling, the training crops and
torch's generator (dropout, stage 2's masks) are functions of the seed, the worker and the epoch, never of
how many epochs this process has run. The best epoch's weights are a copy taken when it is validated.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .artifacts import Artifact, ArtifactCache, Contents, file_records
from .atomic import atomic_write_text
from .config import Config, DataConfig, TrainConfig
from .console import watching
from .data.audio import load_audio
from .errors import InputError

CHECKPOINT_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
PROGRESS_INTERVAL_S = 2.0
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


class AudioDataset(Dataset):
    """Manifest rows -> (waveform, row); training crops long utterances to a seeded random window. Audio is
    read as ``data`` says (its rate, and whether another rate is resampled or refused)."""

    def __init__(self, rows: list[dict[str, Any]], max_samples: int | None, seed: int, data: DataConfig):
        self.rows = rows
        self.max_samples = max_samples
        self.seed = seed
        self.sample_rate, self.resample = data.sample_rate, data.resample
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        wave = load_audio(self.rows[i]["path"], self.sample_rate, self.resample)
        if self.max_samples and len(wave) > self.max_samples:
            start = np.random.default_rng([self.seed, self.epoch, i]).integers(len(wave) - self.max_samples)
            wave = wave[start : start + self.max_samples]
        return wave, self.rows[i]


def emotion_rows(split, emotions: list[str]) -> list[dict[str, Any]]:
    """Manifest rows as the emotion stages (1 and 3) train on them: utterance, path, emotion index, gender
    index, and the duration that groups evaluation passes by length."""
    return [
        {
            "utt_id": r.utt_id,
            "path": r.path,
            "emotion": emotions.index(r.emotion),
            "gender": "FM".index(r.gender),
            "duration_s": float(r.duration_s),
        }
        for r in split.itertuples()
    ]


def emotion_dataset(
    config: Config, loop: dict[str, Any], data: list[dict[str, Any]], train: bool
) -> AudioDataset:
    """The ``dataset`` recipe function of the emotion stages: training crops, whole utterances otherwise."""
    return AudioDataset(data, training_crop(config) if train else None, config.experiment.seed, config.data)


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


def run_name(kind: str, key: str) -> str:
    """The Ray Train run of stage ``kind`` with fingerprint ``key``: stable across retries, so a rerun
    resumes it, and unique to its inputs."""
    return f"{kind}-{key}"


def run_folder(train: TrainConfig, name: str) -> Path:
    return Path(train.storage_path).resolve() / name


def stage_artifact(
    cache: ArtifactCache, kind: str, key: str, train: TrainConfig, build: Callable[[Path], dict[str, Any]]
) -> tuple[Artifact, bool]:
    """The stage's artifact from the cache, built by ``build`` when missing; then its Ray Train run folder
    goes (unless ``train.keep_run_folders``): once the artifact is committed nothing needs the
    checkpoints, and removing them only then keeps an interrupted stage resumable."""
    found = cache.get_or_build(kind, key, build)
    if not train.keep_run_folders:
        shutil.rmtree(run_folder(train, run_name(kind, key)), ignore_errors=True)
    return found


def run_record(best: dict[str, Any], history: list[dict], steps: int, resumes: list[int]) -> dict[str, Any]:
    """What a stage artifact records of its training run: the best epoch, the per-epoch history, the
    optimizer steps taken and the epochs at which a restarted run resumed from a checkpoint."""
    return {"best_epoch": best["epoch"], "history": history, "steps": steps, "resumed_at_epochs": resumes}


def prepare_backbone(backbone: torch.nn.Module, config: Config, masking: bool = False) -> None:
    """Training settings every stage applies to the backbone. DDP refuses parameters that get no gradient,
    so LayerDrop is off and the mask embedding trains only in the stage that masks (``masking``). A
    backbone without one is refused in every stage of a run whose stage 2 masks, before any training."""
    backbone.config.layerdrop = 0.0
    embedding = getattr(backbone, "masked_spec_embed", None)  # built only when its config masks
    if embedding is None and config.stage2.enabled:
        raise InputError(
            f"the {backbone.config.model_type} backbone has no mask embedding (its config sets "
            "mask_time_prob=0 and mask_feature_prob=0): stage 2 masks frames with it; set mask_time_prob "
            "in its config.json to a positive value (or stage2.enabled: false)"
        )
    if embedding is not None:
        embedding.requires_grad_(masking)
    if config.train.freeze_feature_encoder:
        backbone.feature_extractor._freeze_parameters()
    if config.train.gradient_checkpointing:  # non-reentrant: the variant that works under DDP
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def training_crop(config: Config) -> int:
    return int(config.train.max_duration_s * config.data.sample_rate)


class CollectiveDeviceError(RuntimeError):
    """A collective's tensor is not on the device of the model it serves."""


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` summed over the DDP workers in place (returned). Every collective of the project goes
    through here, and its tensor must be on ``device``, the model's: Ray picks NCCL for GPU workers, and
    NCCL has no CPU tensors, so one made on the CPU would crash every multi-GPU run at its first call,
    while gloo on CPUs never notices. So it is checked on every call, even with one worker (no
    collective then), and a test gives the model another device than the CPU."""
    import torch.distributed as dist

    if tensor.device.type != device.type or device.index not in (None, tensor.device.index):
        raise CollectiveDeviceError(
            f"a collective's tensor is on {tensor.device}, the model on {device}: NCCL would fail there"
        )
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` with ``count`` summed over the DDP workers, times the number of workers: DDP
    averages gradients over workers, so they become the gradients of the sum of every worker's ``total``
    over the sum of every worker's ``count`` (a mean over all frames, however unevenly they fall)."""
    count = all_reduce_sum(count.detach().to(total.device, torch.float64, copy=True), total.device)
    return total * world_size() / count.clamp(min=1).to(total.dtype)


def epoch_sums(total: float, count: int, device: torch.device) -> torch.Tensor:
    """(summed training loss, utterances) of an epoch over every worker, from this worker's own."""
    return all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device), device)


def stage_inputs(config: Config, split) -> dict[str, Any]:
    """What every stage's result depends on besides its own section and backbone: the training settings
    that change the model (not the worker count, placement, data loading, storage or recomputation), the
    fold's utterances, the seed."""
    return {
        "train": config.train.model_dump(
            exclude={
                "num_workers",
                "cpus_per_worker",
                "loader_workers",
                "pin_memory",
                "placement_strategy",
                "max_failures",
                "storage_path",
                "gradient_checkpointing",
                "poll_interval_s",
                "checkpoints_to_keep",
                "keep_run_folders",
                "eval_batch_s",
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


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor :func:`save_model` wrote to ``folder``, named as in the model's ``state_dict``."""
    from safetensors.torch import load_file

    backbone = {f"backbone.{k}": v for k, v in load_file(folder / "backbone" / "model.safetensors").items()}
    return backbone | torch.load(folder / "heads.pt", map_location="cpu", weights_only=True)


def load_model(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``model`` (a stage's ``build_model``) with the weights :func:`save_model` wrote to ``folder``."""
    model.load_state_dict(saved_weights(folder))
    return model


def weights_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights: a ``state_dict()`` holds views of the live parameters, which the next
    optimizer step overwrites in place."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """torch's generator seed for one worker's epoch, the same whether the run started at this epoch or
    resumed from a checkpoint at it."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP's wrapper (what checkpoints hold)."""
    return model.module if hasattr(model, "module") else model


def data_loader(dataset: Dataset, sampler, batch_size: int, train: TrainConfig, device: torch.device):
    """Training batches: ``train.loader_workers`` processes read and decode audio ahead of the model
    (forked anew each epoch, so they see the dataset's epoch, which seeds the crops), pinned for the copy
    to a GPU. The batches are the same whatever the number of processes."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=train.data_loaders(),
        pin_memory=train.pin_memory and device.type == "cuda",
    )


def torch_threads(train: TrainConfig) -> int:
    """The training process's torch threads: the worker's CPUs less one per loader process."""
    return max(1, train.cpus_per_worker - train.data_loaders())


class StorageNotShared(RuntimeError):
    """A folder the calling process made is not there on the node a worker runs on."""


def visible_build_folder(folder: str) -> Path:
    """The cache's build folder of the stage, made by the calling process, where rank 0 writes the kept
    model at the end: checked by every rank at start, so a cache that is not on shared storage fails at
    once, naming the node, not after the training."""
    path = Path(folder)
    if not path.is_dir():
        raise StorageNotShared(
            f"{path}: the stage's build folder in experiment.cache_dir is not visible on node "
            f"{socket.gethostname()}; the cache must be on storage every node mounts (README, 'On a cluster')"
        )
    return path


WORKERS_FOLDER = "workers"


def record_placement(folder: Path, rank: int, device: torch.device) -> None:
    """Where this worker runs, in the stage's Ray Train run folder (shared storage), for rank 0 to
    gather: the node, host, device and working directory of every rank go into the stage's metadata."""
    import ray

    place = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "cwd": os.getcwd(),
    }
    (folder / WORKERS_FOLDER).mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / WORKERS_FOLDER / f"rank{rank}.json", json.dumps(place))


def write_progress(folder: Path, epochs: int, history: list[dict], batch: int, batches: int) -> None:
    """Where the stage is, for the caller's progress view (:func:`gmpatl_ray.console.watching`): the
    finished epochs' metrics and the batch of the running one, in the stage's run folder (shared storage).
    Written by rank 0, replaced whole."""
    state = {"epochs": epochs, "history": history, "batch": batch, "batches": batches}
    atomic_write_text(folder / PROGRESS_FILE, json.dumps(state))


def gather_placement(folder: Path, world: int, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Every rank's :func:`record_placement`. Each rank writes its own at start, long before rank 0 gets
    here, unless the folder is not one storage for all of them."""
    paths = [folder / WORKERS_FOLDER / f"rank{r}.json" for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not all(p.is_file() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.is_file()]
            raise RuntimeError(
                f"{folder / WORKERS_FOLDER}: {missing} never appeared; do all nodes see the same "
                "train.storage_path (shared storage)?"
            )
        time.sleep(0.5)
    return [json.loads(p.read_text()) for p in paths]


def train_fn(loop: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: resume from the last checkpoint if any, train, validate (rank 0), report;
    then rank 0 writes the kept model and returns the stage's metadata and file checksums."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DistributedSampler

    clock = {"entered": time.time()}
    recipe = importlib.import_module(loop["recipe"])
    config = Config.model_validate(loop["config"])
    optim = getattr(config, loop["section"]).optim
    torch.set_num_threads(torch_threads(config.train))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    out, run = visible_build_folder(loop["out"]), run_folder(config.train, loop["fingerprint"])
    record_placement(run, rank, device)
    model = recipe.build_model(config, loop)
    clock["built"] = time.time()
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
    # Our own sampler, even on one worker: its order is a function of (seed, epoch) alone. (The one
    # prepare_data_loader would insert has a fixed seed of its own, and a plain shuffle's generator
    # restarts from its seed when a worker group is restarted.)
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.experiment.seed
    )
    loader = ray.train.torch.prepare_data_loader(
        data_loader(dataset, sampler, optim.batch_size // world, config.train, device),  # a global batch
        add_dist_sampler=False,
    )
    clock["prepared"] = time.time()
    spent = {"loop": 0.0, "validation": 0.0, "checkpoints": 0.0}
    for epoch in range(start, optim.epochs):
        dataset.epoch = epoch
        sampler.set_epoch(epoch)
        # Dropout and stage 2's masks draw from torch's global generator.
        torch.manual_seed(epoch_seed(config.experiment.seed, rank, epoch))
        model.train()
        total, count, started = 0.0, 0, time.perf_counter()
        shown = started
        for number, batch in enumerate(loader, 1):
            with torch.autocast(device.type, torch.bfloat16, enabled=config.train.precision == "bf16"):
                loss = recipe.loss(model, batch, config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            total, count = total + loss.item() * len(batch["lengths"]), count + len(batch["lengths"])
            if rank == 0 and time.perf_counter() - shown > PROGRESS_INTERVAL_S:
                write_progress(run, optim.epochs, history, number, len(loader))
                shown = time.perf_counter()
        seconds = time.perf_counter() - started
        spent["loop"] += seconds
        all_total, all_count = epoch_sums(total, count, device).tolist()
        metrics = {
            "epoch": epoch,
            "train_loss": all_total / all_count,
            "steps": steps,
            "train_seconds": seconds,
            "train_utterances_per_s": len(dataset) / seconds,
        }
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                validating = time.perf_counter()
                metrics |= {f"val_{k}": v for k, v in recipe.evaluate(unwrap(model), loop, config).items()}
                spent["validation"] += time.perf_counter() - validating
                history.append(metrics)
                write_progress(run, optim.epochs, history, 0, len(loader))
                if metrics["val_score"] > best["score"]:
                    best = {
                        "score": metrics["val_score"],
                        "epoch": epoch,
                        "model": weights_copy(unwrap(model)),
                    }
                saving = time.perf_counter()
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
            if rank == 0:
                spent["checkpoints"] += time.perf_counter() - saving
    if rank != 0:
        return None
    clock["trained"] = time.time()
    kept = unwrap(model)
    kept.load_state_dict(best["model"])
    save_model(kept, out)
    meta = {
        **run_record(best, history, steps, resumes),
        "workers": gather_placement(run, world),
        **recipe.finish(kept, loop, config, best),
    }
    clock["finished"] = time.time()
    return {"meta": meta, "files": file_records(out), "clock": clock, "spent": spent}


def fit(recipe: str, section: str, loop: dict[str, Any], train: TrainConfig, name: str) -> Contents:
    """Run ``recipe`` on ``train.num_workers`` workers under the run name ``name``; rank 0 writes the kept
    model into ``loop["out"]``. Returns the stage's metadata (best epoch, history, where each worker ran,
    what ``finish`` added) and the checksums of the files it wrote."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train reads this in its controller and propagates it there from the driver's environment when
    # the trainer is built; it has no argument of its own.
    os.environ[POLL_INTERVAL_ENV] = str(train.poll_interval_s)
    submitted = time.time()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={**loop, "recipe": recipe, "section": section, "fingerprint": name},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
            placement_strategy=train.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(run_folder(train, name).parent),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
        ),
    )
    threads = torch.get_num_threads()  # local mode runs train_fn here, which sets the worker's threads
    try:
        with watching(run_folder(train, name) / PROGRESS_FILE, section):
            done = trainer.fit().return_value
    finally:
        torch.set_num_threads(threads)
    timing = stage_timing(submitted, done["clock"], done["spent"], time.time())
    return Contents(done["meta"] | {"timing": timing}, done["files"])


def stage_timing(submitted: float, clock: dict[str, float], spent: dict[str, float], done: float) -> dict:
    """Where a stage run's wall time went, in seconds (rank 0's view; the start includes Ray Train's
    controller, the worker group, its process group and the workers' imports), and when it ran (``*_at``:
    seconds since the epoch)."""
    return {
        "start": clock["entered"] - submitted,
        "model_build": clock["built"] - clock["entered"],
        "ddp_and_loader": clock["prepared"] - clock["built"],
        "training_loop": spent["loop"],
        "validation": spent["validation"],
        "checkpoints": spent["checkpoints"],
        "other_epoch_work": clock["trained"] - clock["prepared"] - sum(spent.values()),
        "final_model_and_finish": clock["finished"] - clock["trained"],
        "shutdown_and_result": done - clock["finished"],
        "wall": done - submitted,
        "submitted_at": submitted,
        "done_at": done,
    }
