"""``gmpatl predict``: a trained model on new audio, at any scale, with Ray Data.

    inputs (files, folders, manifest CSVs) -> header tasks (duration, or the problem) -> longest first
    -> decode tasks (any rate and channel count, resampled) -> an actor pool of the model (one GPU each
    on a GPU cluster) -> one row per file: path, emotion, p_<label>

The model is an MLflow model folder (:mod:`gmpatl_ray.inference`), found from a ``runs:/`` or ``models:/``
URI, a local folder, or a CV's parent run id (its fold models, averaged as an ensemble). It is downloaded
under ``experiment.output_dir`` (shared storage on a cluster), where every actor reads it.

Bad files follow ``predict.on_error`` as ``prepare`` does: ``fail`` lists every one and writes nothing;
``skip`` writes the rest and lists them in ``<out>.skipped.txt``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import atomic_path, atomic_write_text
from .config import Config, PredictConfig
from .data.audio import AudioError, audio_info, load_audio
from .errors import InputError
from .features import CPU_ACTOR_SHARE, IO_TASK_CPUS, ROWS_PER_CALL, block_count, dataset_in_blocks
from .redact import scrub

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf")
"""What a folder is searched for (formats libsndfile decodes)."""
RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Predictions:
    table: pd.DataFrame
    """One row per file that could be scored, in input order: path, emotion, p_<label>."""
    problems: list[str]
    """Every file that could not be (``predict.on_error=skip``), with its problem."""
    models: int
    """How many models scored each file (an ensemble's members)."""


def list_inputs(inputs: list[str]) -> list[str]:
    """The audio files named by ``inputs``, in order, each once: a file as it is, a folder's audio files
    (recursively, sorted), a manifest CSV's ``path`` column (relative paths from the CSV's folder)."""
    found: list[str] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            if not files:
                raise InputError(f"{path}: no audio files in this folder ({', '.join(AUDIO_SUFFIXES)})")
            found += [str(p.resolve()) for p in files]
        elif path.suffix.lower() == ".csv":
            found += _manifest_paths(path)
        elif path.exists():
            found.append(str(path.resolve()))
        else:
            raise InputError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


def _manifest_paths(csv: Path) -> list[str]:
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{csv}: not a readable CSV ({err})") from None
    if "path" not in table.columns:
        raise InputError(f"{csv}: a manifest needs a 'path' column (it has {list(table.columns)})")
    if table.empty:
        raise InputError(f"{csv}: no rows (a manifest lists one audio file per row in its 'path' column)")
    empty = [i + 2 for i, p in enumerate(table["path"]) if not p.strip()]
    if empty:
        raise InputError(f"{csv}: empty path on line(s) {empty}")
    return [str((csv.parent / Path(p).expanduser()).resolve()) for p in table["path"]]


def resolve_model(spec: str, tracking_uri: str, into: Path) -> list[Path]:
    """The model folder(s) ``spec`` names: a local model folder; a ``runs:/`` or ``models:/`` URI
    (downloaded into ``into``); a run id: a CV parent run's fold models, or a fold's or final run's own."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .tracking import filter_value

    local = Path(spec).expanduser()
    if local.is_dir():
        return [local.resolve()]
    try:
        if spec.startswith(("runs:/", "models:/")):
            return [_download(spec, tracking_uri, into)]
        if RUN_ID.fullmatch(spec):
            client = mlflow.MlflowClient(tracking_uri=tracking_uri)
            run = client.get_run(spec)
            if run.data.tags.get("gmpatl.kind") != "cv":
                return [_download(f"runs:/{spec}/model", tracking_uri, into)]
            folds = client.search_runs(
                [run.info.experiment_id],
                f"tags.`mlflow.parentRunId` = {filter_value(spec)} and tags.`gmpatl.kind` = 'fold'",
            )
            if not folds:
                where = scrub(tracking_uri)
                raise InputError(f"--model {spec}: this CV run has no fold runs (yet) in {where}")
            folds = sorted(folds, key=lambda r: r.data.tags.get("gmpatl.fold", ""))
            return [_download(f"runs:/{r.info.run_id}/model", tracking_uri, into) for r in folds]
    except MlflowException as err:
        raise InputError(
            f"--model {spec}: MLflow at {scrub(tracking_uri)} has no such model ({err.message})"
        ) from None
    raise InputError(f"--model {spec}: not a model folder, a runs:/ or models:/ URI, or an MLflow run id")


def _download(uri: str, tracking_uri: str, into: Path) -> Path:
    import mlflow.artifacts

    folder = Path(tempfile.mkdtemp(prefix="model-", dir=into))
    # A models:/ URI is resolved through MLflow's global tracking and registry URIs, not the argument
    # (left unset, MLflow would open a new ./mlflow.db): both name this tracking store meanwhile, the
    # registry unless MLFLOW_REGISTRY_URI names another.
    wanted = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": os.environ.get("MLFLOW_REGISTRY_URI"),
    }
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update({name: value or tracking_uri for name, value in wanted.items()})
    try:
        return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder), tracking_uri=tracking_uri))
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_headers(batch: dict[str, np.ndarray], min_s: float) -> dict[str, np.ndarray]:
    """A Ray Data task: each file's duration from its header, or why it cannot be used (unreadable, or
    shorter than ``min_s``, what the model needs for one frame)."""
    durations, errors = np.zeros(len(batch["path"])), np.empty(len(batch["path"]), dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            info = audio_info(path)
            durations[i], errors[i] = info.frames / info.samplerate, ""
            if durations[i] < min_s:
                raise AudioError(path, f"too short: {durations[i]:.4f} s, the model needs {min_s:.4f} s")
        except AudioError as err:
            errors[i] = str(err)
    return {"path": batch["path"], "duration_s": durations, "error": errors}


def decode_files(batch: dict[str, np.ndarray], sample_rate: int, min_samples: int) -> dict[str, Any]:
    """A Ray Data task: files -> float32 mono waveforms at ``sample_rate``, or why not."""
    audio, errors = np.empty(len(batch["path"]), dtype=object), np.empty(len(batch["path"]), dtype=object)
    for i, path in enumerate(batch["path"]):
        audio[i], errors[i] = np.zeros(0, dtype=np.float32), ""
        try:
            wave = load_audio(path, sample_rate)
            if len(wave) < min_samples:
                raise AudioError(path, f"too short: {len(wave)} samples, the model needs {min_samples}")
            audio[i] = wave
        except AudioError as err:
            errors[i] = str(err)
    return {"path": batch["path"], "audio": audio, "error": errors}


class ModelActor:
    """A Ray Data actor: the model (or the ensemble) on its device; decoded files -> probabilities. On a
    GPU a call's files share forward passes (up to ``train.eval_batch_s`` of audio each); on a CPU each
    file is a pass of its own, which is faster there (about twice, `benchmarks/predict.py --batching`), as
    extraction found for its batches."""

    def __init__(self, folders: list[str], device: str, threads: int, window_s: float):
        import torch

        from .inference import EmotionPredictor, Ensemble, probability_columns

        if device == "cpu":
            torch.set_num_threads(threads)
        members = [EmotionPredictor.from_model_folder(f, device, window_s) for f in folders]
        self.model = members[0] if len(members) == 1 else Ensemble(members)
        self.columns = probability_columns(self.model.emotions)
        self.one_by_one = device == "cpu"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = [i for i, error in enumerate(batch["error"]) if not error]
        probabilities = np.full((len(batch["path"]), len(self.columns)), np.nan)
        waves = [batch["audio"][i] for i in ok]
        if waves and self.one_by_one:
            probabilities[ok] = np.concatenate([self.model.probabilities([wave]) for wave in waves])
        elif waves:
            probabilities[ok] = self.model.probabilities(waves)
        return {
            "path": batch["path"],
            "error": batch["error"],
            **{c: probabilities[:, j] for j, c in enumerate(self.columns)},
        }


def model_signature(folders: list[Path]) -> tuple[list[str], int, int]:
    """Classes, sample rate and the fewest samples a file needs, read from the model folders' configs
    (no weights loaded): what the driver and the decode tasks need."""
    from transformers import AutoConfig

    from .inference import ModelFolderError, model_folder_parts
    from .models.backbone import conv_geometry

    found = set()
    for folder in folders:
        weights, config = model_folder_parts(folder)
        receptive = conv_geometry(AutoConfig.from_pretrained(weights / "backbone", local_files_only=True))[1]
        found.add((tuple(config.data.emotions), config.data.sample_rate, receptive))
    if len({(e, r) for e, r, _ in found}) > 1:
        raise ModelFolderError(f"an ensemble's models must share classes and sample rate: {found}")
    emotions, rate = next(iter(found))[:2]
    return list(emotions), rate, max(r for *_, r in found)


def predict_files(paths: list[str], folders: list[Path], settings: PredictConfig) -> Predictions:
    """Score ``paths`` with the model in ``folders`` on the connected Ray cluster."""
    import ray

    from .devices import actor_plan
    from .inference import probability_columns, result_table

    emotions, sample_rate, min_samples = model_signature(folders)
    headers = (
        dataset_in_blocks(pd.DataFrame({"path": paths}))
        .map_batches(
            read_headers,
            batch_size=ROWS_PER_CALL,
            fn_kwargs={"min_s": min_samples / sample_rate},
            num_cpus=IO_TASK_CPUS,
        )
        .to_pandas()
    )
    problems = [e for e in headers["error"] if e]
    # Longest first: batches of similar length pad little, and an out-of-memory shows up at once.
    rows = headers[headers["error"] == ""].sort_values("duration_s", ascending=False, kind="stable")
    decoded = dataset_in_blocks(rows[["path"]].reset_index(drop=True)).map_batches(
        decode_files,
        batch_size=ROWS_PER_CALL,
        fn_kwargs={"sample_rate": sample_rate, "min_samples": min_samples},
        num_cpus=IO_TASK_CPUS,
    )
    if problems and settings.on_error == "fail":  # name the files only decoding finds too, then stop
        found = decoded.select_columns(["error"]).to_pandas()["error"] if len(rows) else []
        raise PredictionInputError(problems + [e for e in found if e])
    columns = probability_columns(emotions)
    if rows.empty:
        return Predictions(
            pd.DataFrame(columns=["path", "emotion", *columns]), sorted(problems), len(folders)
        )
    device, actors = actor_plan(settings.device, settings.actors, settings.threads_per_actor)
    actors = min(actors, block_count(len(rows)))  # an actor with no block would start after the end
    pool = (
        ray.data.ActorPoolStrategy(min_size=1, max_size=actors)
        if device == "cuda"
        else ray.data.ActorPoolStrategy(size=actors)
    )
    scored = decoded.map_batches(
        ModelActor,
        batch_size=ROWS_PER_CALL,
        compute=pool,
        fn_constructor_kwargs={
            "folders": [str(f) for f in folders],
            "device": device,
            "threads": settings.threads_per_actor,
            "window_s": settings.window_s,
        },
        num_gpus=1 if device == "cuda" else 0,
        num_cpus=1 if device == "cuda" else CPU_ACTOR_SHARE * settings.threads_per_actor,
    ).to_pandas()
    problems += [e for e in scored["error"] if e]
    if problems and settings.on_error == "fail":
        raise PredictionInputError(problems)
    scored = scored[scored["error"] == ""].set_index("path")
    order = [p for p in paths if p in scored.index]
    table = result_table(scored.loc[order, columns].to_numpy(), emotions)
    table.insert(0, "path", order)
    return Predictions(table, sorted(problems), len(folders))


class PredictionInputError(InputError):
    """Files that cannot be scored, every one listed (``predict.on_error=fail``)."""

    def __init__(self, problems: list[str]):
        listed = "\n  ".join(sorted(problems))
        super().__init__(
            f"{len(problems)} input file(s) cannot be scored; nothing was written "
            f"(predict.on_error=skip scores the others and lists these):\n  {listed}"
        )
        self.problems = problems


def skipped_path(out: Path) -> Path:
    return out.with_name(out.name + ".skipped.txt")


def write_predictions(predictions: Predictions, out: Path) -> None:
    """The table as ``out`` (.csv or .parquet) and, when files were skipped, their list beside it; both
    atomic. A stale list from an earlier run is removed."""
    if out.suffix == ".parquet":
        with atomic_path(out) as tmp:
            predictions.table.to_parquet(tmp, index=False)
    else:
        atomic_write_text(out, predictions.table.to_csv(index=False, float_format="%.6f"))
    listed = skipped_path(out)
    if predictions.problems:
        atomic_write_text(listed, "\n".join(predictions.problems) + "\n")
    else:
        listed.unlink(missing_ok=True)


def run_predict(config: Config, model: str, inputs: list[str], out: Path) -> Predictions:
    """``gmpatl predict``: resolve the model, score every input file, write ``out``. The downloaded model
    copies are removed afterwards."""
    from .tracking import tracking_uri

    if out.suffix not in (".csv", ".parquet"):
        raise InputError(f"--out {out}: write predictions as .csv or .parquet")
    paths = list_inputs(inputs)
    output_dir = Path(config.experiment.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    downloads = Path(tempfile.mkdtemp(prefix="predict-models-", dir=output_dir))  # on storage actors see
    try:
        folders = resolve_model(
            model, tracking_uri(config.tracking.uri, config.experiment.output_dir), downloads
        )
        predictions = predict_files(paths, folders, config.predict)
        write_predictions(predictions, out)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    return predictions
