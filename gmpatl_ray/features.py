"""Layer features with Ray Data: manifest -> decoded audio -> length-bucketed batches -> HuBERT actor pool
-> float16 hidden states in a fingerprinted Parquet store.

Module-level imports stay light (no torch): Ray workers that run the decode tasks import this module's
neighbours, and a torch import in each of them costs seconds of CPU the actors need.

The store has one row per utterance: ``utt_id``, ``frames`` (HuBERT frames at 50 a second for the audio as
used, i.e. after cropping), ``dim``, ``audio_s`` and one binary column per layer, ``layer-3`` etc., holding
``frames x dim`` float16 values in row-major order. Parquet is columnar, so reading one layer reads only
that column, and counting the store reads none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .artifacts import Artifact, ArtifactCache, Contents, file_sha256, fingerprint, recorded_checksums
from .config import BackboneConfig, Config, ExtractConfig
from .data.audio import decode_batch

KIND = "features"


def layer_column(layer: int) -> str:
    return f"layer{layer}"


def requested_layers(config: Config) -> list[int]:
    return sorted(set(config.extract.layers or [config.gmp.layer]), reverse=True)


def backbone_identity(cfg: BackboneConfig, seed: int) -> dict[str, Any]:
    """What makes two backbones the same for caching: the weights' checksums, or size and seed. A stage's
    saved backbone has its checksums in its artifact's marker already (computed once, where it was
    written); any other folder is hashed once per process and file version. The checksums cover every
    JSON file beside the weights, so the files that decide how the waveform goes in (config.json's saved
    choice, preprocessor_config.json's ``do_normalize``) are part of the identity; a hub id's snapshot
    commit fixes them likewise."""
    if cfg.random_init is not None:
        return {"random_init": cfg.random_init.model_dump(), "seed": seed}
    folder = Path(cfg.pretrained).expanduser()
    if not folder.is_dir():  # a hub id: its cached snapshot folder is named by the commit
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.pretrained, "config.json")
        return {
            "hub": cfg.pretrained,
            "snapshot": Path(cached).parent.name if isinstance(cached, str) else None,
        }
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    recorded = recorded_checksums(folder) or {}
    return {"pretrained": {p.name: recorded.get(p.name) or _checksum(p) for p in weights}}


_CHECKSUMS: dict[tuple[str, int, int], str] = {}


def _checksum(path: Path) -> str:
    """SHA-256 of ``path``, remembered by (path, size, modification time) for this process: every fold
    and stage of a CV asks for the same base weights' identity."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKSUMS:
        _CHECKSUMS[key] = file_sha256(path)
    return _CHECKSUMS[key]


def manifest_identity(manifest: pd.DataFrame) -> str:
    """The utterances and their files (durations to the millisecond, as the manifest stores them)."""
    rows = manifest.sort_values("utt_id")
    return fingerprint([rows["utt_id"].tolist(), rows["path"].tolist(), rows["duration_s"].round(3).tolist()])


@dataclass(frozen=True)
class FeatureStore:
    """A complete feature artifact."""

    artifact: Artifact

    @property
    def path(self) -> Path:
        return self.artifact.path

    @property
    def layers(self) -> list[int]:
        return self.artifact.meta["layers"]

    @property
    def dim(self) -> int:
        return self.artifact.meta["dim"]

    def index(self) -> pd.DataFrame:
        """utt_id and frames of every utterance in the store."""
        return self._dataset().to_table(columns=["utt_id", "frames"]).to_pandas()

    def iter_layer(self, layer: int, utt_ids: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(utt_id, frames x dim float16 array) for every stored utterance (or those in ``utt_ids``)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in the feature store {self.path} (it has {self.layers})")
        columns = ["utt_id", "frames", layer_column(layer)]
        for batch in self._dataset().to_batches(columns=columns, batch_size=64):
            ids, frames, blobs = (batch.column(c).to_pylist() for c in columns)
            for utt_id, n, blob in zip(ids, frames, blobs, strict=True):
                if utt_ids is None or utt_id in utt_ids:
                    yield utt_id, np.frombuffer(blob, dtype=np.float16).reshape(n, self.dim)

    def _dataset(self) -> pads.Dataset:
        return pads.dataset(self.path / "parquet", format="parquet")


def chunk_bounds(
    num_samples: int, max_samples: int, stride: int, receptive_field: int
) -> list[tuple[int, int]]:
    """Cut a long waveform into chunks whose HuBERT frames add up exactly to the whole waveform's.

    A chunk of ``stride * k + (receptive_field - stride)`` samples yields k frames, and the next chunk starts
    ``stride * k`` later, so the chunks' frames are the whole waveform's frames in order (each frame computed
    with context from its own chunk only). A tail shorter than the receptive field holds no frame of the
    whole waveform either, so it gets no chunk (it would be a chunk of zero frames).
    """
    overlap = receptive_field - stride
    per_chunk = max(1, (max_samples - overlap) // stride)
    step = per_chunk * stride
    last_start = max(0, num_samples - receptive_field)
    return [(start, min(start + step + overlap, num_samples)) for start in range(0, last_start + 1, step)]


class HubertExtractor:
    """A Ray Data actor: holds one HuBERT (truncated after the deepest requested layer) on its device."""

    def __init__(
        self,
        backbone: BackboneConfig,
        seed: int,
        layers: list[int],
        extract: ExtractConfig,
        device: str,
        sample_rate: int,
    ):
        import torch

        from .models.backbone import conv_geometry, load_backbone, truncate_layers

        if device == "cpu":
            torch.set_num_threads(extract.threads_per_actor)
        self.torch = torch
        self.device = torch.device(device)
        self.layers = layers
        self.batch_size = extract.batch_size
        self.model = truncate_layers(load_backbone(backbone, seed), max(layers)).eval().to(self.device)
        self.autocast = extract.precision == "bf16"
        self.stride, self.receptive_field = conv_geometry(self.model.config)
        self.sample_rate = sample_rate
        self.max_samples = None if extract.long_audio == "crop" else int(extract.max_duration_s * sample_rate)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A Ray Data batch of rows, run as forward passes of ``extract.batch_size`` waveforms (or chunks)."""
        pieces: list[tuple[int, np.ndarray]] = []  # (row, waveform or chunk), in order
        for i, wave in enumerate(batch["audio"]):
            if self.max_samples and len(wave) > self.max_samples:
                bounds = chunk_bounds(len(wave), self.max_samples, self.stride, self.receptive_field)
                pieces += [(i, wave[a:b]) for a, b in bounds]
            else:
                pieces.append((i, wave))
        parts: list[list[dict[int, np.ndarray]]] = [[] for _ in batch["audio"]]
        for start in range(0, len(pieces), self.batch_size):
            group = pieces[start : start + self.batch_size]
            for (i, _), features in zip(group, self._forward([w for _, w in group]), strict=True):
                parts[i].append(features)
        results = [{layer: np.concatenate([p[layer] for p in row]) for layer in self.layers} for row in parts]
        order = range(len(batch["utt_id"]))
        out: dict[str, Any] = {
            "utt_id": batch["utt_id"],
            "frames": np.array([len(results[i][self.layers[0]]) for i in order], dtype=np.int64),
            "dim": np.full(len(order), self.model.config.hidden_size, dtype=np.int64),
            "audio_s": np.array([len(w) / self.sample_rate for w in batch["audio"]]),
        }
        for layer in self.layers:
            out[layer_column(layer)] = np.array([results[i][layer].tobytes() for i in order], dtype=object)
        return out

    def _forward(self, waves: list[np.ndarray]) -> list[dict[int, np.ndarray]]:
        from .models.backbone import backbone_layers

        torch = self.torch
        lengths = torch.tensor([len(w) for w in waves])
        padded = torch.zeros(len(waves), int(lengths.max()))
        for i, wave in enumerate(waves):  # torch.tensor copies: Arrow's arrays are read-only
            padded[i, : len(wave)] = torch.tensor(np.asarray(wave, dtype=np.float32))
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            outputs, frames = backbone_layers(
                self.model, padded.to(self.device), lengths.to(self.device), self.layers
            )
        return [
            {layer: outputs[layer][i, : frames[i]].to(torch.float16).cpu().numpy() for layer in self.layers}
            for i in range(len(waves))
        ]


CPU_ACTOR_SHARE = 0.75
"""Logical CPUs a CPU actor reserves per thread: actors for every core still leave room for the decode and
write tasks (0.25 each), which would otherwise wait for a free CPU until the actors finish."""
IO_TASK_CPUS = 0.25
ROWS_PER_CALL = 16
"""Rows per Ray Data call; the actor splits them into forward passes of ``extract.batch_size``, so
per-call overhead is paid once per 16 utterances however small the forward batch."""


def block_count(rows: int) -> int:
    """Blocks :func:`dataset_in_blocks` makes of ``rows`` rows."""
    return max(1, min(rows // ROWS_PER_CALL, 64))


def dataset_in_blocks(rows: pd.DataFrame):
    """A Ray Dataset of ``rows`` in contiguous blocks of about ``ROWS_PER_CALL`` (at most 64), so that tasks
    run in parallel and rows sorted by length stay length-bucketed in every batch. (Split here: Ray 2.60's
    ``override_num_blocks`` splits with numpy, which pandas 3 frames do not survive.)"""
    import ray

    bounds = np.linspace(0, len(rows), block_count(len(rows)) + 1).astype(int)
    return ray.data.from_pandas([rows.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def extraction_plan(extract: ExtractConfig) -> tuple[str, int]:
    """The device (``extract.device``; ``auto`` is normally resolved by the command already, see
    :mod:`gmpatl_ray.devices`) and the most actors (:func:`gmpatl_ray.devices.actor_plan`)."""
    from .devices import actor_plan

    return actor_plan(extract.device, extract.actors, extract.threads_per_actor)


def feature_inputs(config: Config, manifest: pd.DataFrame) -> dict[str, Any]:
    """Everything a feature store depends on (its fingerprint is theirs): the backbone, the layers, the
    utterances and how their audio is cut. Not the batch size, actors or device: they change no value."""
    extract = config.extract
    return {
        "backbone": backbone_identity(config.backbone, config.experiment.seed),
        "layers": requested_layers(config),
        "manifest": manifest_identity(manifest),
        "sample_rate": config.data.sample_rate,
        "long_audio": extract.long_audio,
        "max_duration_s": extract.max_duration_s,
        "precision": extract.precision,
    }


def extract_features(
    config: Config, manifest: pd.DataFrame, cache: ArtifactCache
) -> tuple[FeatureStore, bool]:
    """The feature store for ``manifest`` under ``config``: reused when its fingerprint exists, else built
    with Ray Data on the connected Ray cluster. Returns the store and whether this call built it."""
    from .models.backbone import backbone_depth, hidden_state_index

    inputs = feature_inputs(config, manifest)
    layers = inputs["layers"]
    depth = backbone_depth(config.backbone)  # its config only: the driver loads no weights
    for layer in layers:
        hidden_state_index(layer, depth)
    key = fingerprint(inputs)

    def build(folder: Path) -> Contents:
        meta = _run_pipeline(config, manifest, layers, folder / "parquet")
        return Contents({"inputs": inputs, "layers": layers, **meta}, _checksums_on_the_cluster(folder))

    artifact, built = cache.get_or_build(KIND, key, build)
    return FeatureStore(artifact), built


def _run_pipeline(config: Config, manifest: pd.DataFrame, layers: list[int], out: Path) -> dict[str, Any]:
    import ray

    extract = config.extract
    device, actors = extraction_plan(extract)
    # Longest first: batches of similar length pad little, and an out-of-memory shows up at once.
    rows = manifest.sort_values("duration_s", ascending=False)[["utt_id", "path"]].reset_index(drop=True)
    crop = int(extract.max_duration_s * config.data.sample_rate) if extract.long_audio == "crop" else None
    start = time.perf_counter()
    ds = dataset_in_blocks(rows).map_batches(
        decode_batch,
        batch_size=ROWS_PER_CALL,
        fn_kwargs={"sample_rate": config.data.sample_rate, "resample": config.data.resample, "crop": crop},
        num_cpus=IO_TASK_CPUS,
    )
    # On GPUs the pool starts with one actor and grows to ``actors`` as GPUs come (an autoscaling cluster's
    # GPU nodes may be at zero when extraction starts: the request waits for them).
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=actors) if device == "cuda" else None
    ds = ds.map_batches(
        HubertExtractor,
        batch_size=max(ROWS_PER_CALL, extract.batch_size),
        compute=pool or ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "backbone": config.backbone,
            "seed": config.experiment.seed,
            "layers": layers,
            "extract": extract,
            "device": device,
            "sample_rate": config.data.sample_rate,
        },
        num_gpus=1 if device == "cuda" else 0,
        num_cpus=1 if device == "cuda" else CPU_ACTOR_SHARE * extract.threads_per_actor,
    )
    ds.write_parquet(str(out), ray_remote_args={"num_cpus": IO_TASK_CPUS})
    seconds = time.perf_counter() - start
    summary = store_summary(out)
    return {
        **summary,
        "seconds": seconds,
        "audio_s_per_s": summary["audio_s"] / seconds,
        "device": device,
        "actors": actors,
    }


def _checksums_on_the_cluster(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a written store, computed by Ray tasks on the cluster's nodes
    (the files are on shared storage), not by reading gigabytes back in the calling process."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    checksum = ray.remote(
        num_cpus=IO_TASK_CPUS,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),  # not a trial's group
    )(file_sha256)
    digests = ray.get([checksum.remote(p) for p in paths])
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, digests, strict=True)
    }


def store_summary(folder: str | Path) -> dict[str, Any]:
    """Utterances, frames, audio seconds and feature width of a written store, from its small columns
    alone: no feature is read (a layer's column is gigabytes at IEMOCAP scale)."""
    counts = pads.dataset(folder, format="parquet").to_table(columns=["frames", "audio_s", "dim"])
    (dim,) = pc.unique(counts.column("dim")).to_pylist()  # one backbone wrote every row
    return {
        "dim": dim,
        "utterances": counts.num_rows,
        "frames": int(pc.sum(counts.column("frames")).as_py()),
        "audio_s": float(pc.sum(counts.column("audio_s")).as_py()),
    }
