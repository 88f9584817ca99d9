"""A trained emotion model on new audio, and the MLflow pyfunc model that packages it.

A *model folder* is an MLflow pyfunc model (``mlflow.pyfunc.save_model``): its artifacts are the stage-3
weights (``weights/backbone`` as ``save_pretrained`` writes it, ``weights/heads.pt``) and the config it was
trained with (``config.yaml``); it carries this package's code and pinned requirements, a signature and an
input example. ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and ``gmpatl predict`` (whose Ray Data
actors load the same folder with :meth:`EmotionPredictor.from_model_folder`) all score audio through
:meth:`EmotionPredictor.probabilities`, which scores utterances as evaluation does
(:func:`gmpatl_ray.evaluation.emotion_logits`), so a fold's model labels its test session exactly as the
CV scored it.

The pyfunc's input is a DataFrame with, per row, either ``path`` (a file the model's process can read) or
``audio`` (the whole file's bytes, base64: what an HTTP client sends); its output is ``emotion`` (the
predicted label) and ``p_<label>`` per class.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import soundfile as sf

from .config import Config, dump_config, load_config
from .data.audio import AudioError, audio_from_bytes, load_audio
from .errors import InputError

WEIGHTS, CONFIG = "weights", "config"
"""The pyfunc's artifact keys: the stage-3 weights folder and the training config."""
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchaudio",
    "transformers",
    "safetensors",
    "soundfile",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "pydantic",
    "pyyaml",
    "filelock",
)
"""What the packaged code imports to score audio, pinned to the versions it was trained with."""


class ModelFolderError(InputError):
    """A path that is not a usable model folder; the message says what is missing."""


def probability_columns(emotions: list[str]) -> list[str]:
    return [f"p_{e}" for e in emotions]


def window_bounds(num_samples: int, window_samples: int) -> list[tuple[int, int]]:
    """Equal windows (lengths differ by one sample at most) of at most ``window_samples`` covering
    ``num_samples``: one window when it fits."""
    count = max(1, math.ceil(num_samples / window_samples))
    edges = [i * num_samples // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class EmotionPredictor:
    """One stage-3 model in eval mode on ``device``: waveforms at its sample rate -> class probabilities."""

    def __init__(self, weights: Path, config: Config, device: str = "cpu", window_s: float | None = None):
        import torch

        from .evaluation import EvalLimits
        from .models.backbone import conv_geometry, load_backbone
        from .stages.stage3 import Stage3Model
        from .training import load_model

        self.config = config
        self.emotions = list(config.data.emotions)
        self.sample_rate = config.data.sample_rate
        backbone = load_backbone(
            config.backbone.model_copy(update={"pretrained": str(weights / "backbone"), "random_init": None})
        )
        self.model = load_model(Stage3Model(backbone, config), weights).eval().to(torch.device(device))
        self.limits = EvalLimits.of(config)
        self.window_samples = int((window_s or config.predict.window_s) * self.sample_rate)
        self.min_samples = conv_geometry(backbone.config)[1]

    @classmethod
    def from_model_folder(
        cls, folder: str | Path, device: str = "cpu", window_s: float | None = None
    ) -> EmotionPredictor:
        """The model in a model folder; ``window_s`` None: the training config's ``predict.window_s``."""
        weights, config = model_folder_parts(folder)
        return cls(weights, config, device, window_s)

    def check_length(self, wave: np.ndarray, name: str) -> None:
        if len(wave) < self.min_samples:
            raise AudioError(
                name, f"too short: {len(wave)} samples, the model needs at least {self.min_samples}"
            )

    def probabilities(self, waves: list[np.ndarray]) -> np.ndarray:
        """(files, classes) probabilities. A file longer than ``predict.window_s`` is scored window by
        window and its windows' probabilities averaged, weighted by their length."""
        from .evaluation import emotion_logits

        rows, owners, weights = [], [], []
        for i, wave in enumerate(waves):
            for a, b in window_bounds(len(wave), self.window_samples):
                rows.append({"wave": wave[a:b], "duration_s": (b - a) / self.sample_rate})
                owners.append(i)
                weights.append(b - a)
        if not rows:
            return np.zeros((0, len(self.emotions)))
        windows = softmax(emotion_logits(self.model, self.model.heads, rows, self.limits).astype(np.float64))
        pooled = np.zeros((len(waves), len(self.emotions)))
        np.add.at(pooled, np.asarray(owners), windows * np.asarray(weights, dtype=np.float64)[:, None])
        return pooled / pooled.sum(axis=-1, keepdims=True)


class Ensemble:
    """Several models (a CV's fold models) as one: the mean of their probabilities."""

    def __init__(self, members: list[EmotionPredictor]):
        first = members[0]
        for member in members[1:]:
            if (member.emotions, member.sample_rate) != (first.emotions, first.sample_rate):
                raise ModelFolderError(
                    f"an ensemble's models must share classes and sample rate: {first.emotions} at "
                    f"{first.sample_rate} Hz vs {member.emotions} at {member.sample_rate} Hz"
                )
        self.members = members
        self.emotions, self.sample_rate = first.emotions, first.sample_rate

    def probabilities(self, waves: list[np.ndarray]) -> np.ndarray:
        return np.mean([m.probabilities(waves) for m in self.members], axis=0)


def result_table(probabilities: np.ndarray, emotions: list[str]) -> pd.DataFrame:
    """``emotion`` (the most probable label) and ``p_<label>`` per class, one row per file."""
    table = pd.DataFrame(probabilities, columns=probability_columns(emotions))
    table.insert(0, "emotion", [emotions[i] for i in probabilities.argmax(-1)] if len(table) else [])
    return table


def model_folder_parts(folder: str | Path) -> tuple[Path, Config]:
    """The weights folder and the training config of a model folder (an MLflow pyfunc model written by
    :func:`save_model_folder`), checked."""
    folder = Path(folder)
    if not (folder / "MLmodel").is_file():
        raise ModelFolderError(f"{folder}: not an MLflow model folder (no MLmodel file)")
    artifacts = mlflow.models.Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts", {})
    if set(artifacts) != {WEIGHTS, CONFIG}:
        raise ModelFolderError(f"{folder}: not a gmpatl model (its pyfunc artifacts are {sorted(artifacts)})")
    weights, config = (folder / artifacts[key]["path"] for key in (WEIGHTS, CONFIG))
    for needed in (weights / "heads.pt", weights / "backbone" / "config.json", config):
        if not needed.is_file():
            raise ModelFolderError(f"{folder}: not a gmpatl model ({needed.relative_to(folder)} is missing)")
    return weights, load_config(config)


def rows_audio(frame: pd.DataFrame, sample_rate: int) -> list[np.ndarray]:
    """The waveforms of a pyfunc input: each row's ``path`` (read) or ``audio`` (base64 file bytes)."""
    if not {"path", "audio"} & set(frame.columns):
        raise InputError(f"the input needs a 'path' or an 'audio' column (it has {list(frame.columns)})")
    waves = []
    for i, row in enumerate(frame.itertuples(index=False)):
        path, audio = getattr(row, "path", None), getattr(row, "audio", None)
        given = [v for v in (path, audio) if isinstance(v, str | bytes) and len(v)]
        if len(given) != 1:
            raise InputError(f"row {i}: give exactly one of 'path' and 'audio' (base64 file bytes)")
        if isinstance(path, str) and path:
            waves.append(load_audio(path, sample_rate))
            continue
        try:
            data = base64.b64decode(audio, validate=True)
        except binascii.Error as err:
            raise InputError(f"row {i}: 'audio' is not base64 ({err})") from None
        waves.append(audio_from_bytes(data, f"row {i} (audio)", sample_rate))
    return waves


def wav_base64(wave: np.ndarray, sample_rate: int) -> str:
    """A waveform as the base64 WAV an HTTP client sends in the ``audio`` column."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class EmotionModel(mlflow.pyfunc.PythonModel):
    """GMP-ATL's stage-3 model as an MLflow pyfunc: DataFrame of ``path`` or ``audio`` -> ``emotion`` and
    ``p_<label>`` per row (on a GPU when the serving process has one)."""

    def load_context(self, context) -> None:
        import torch

        weights, config = Path(context.artifacts[WEIGHTS]), load_config(context.artifacts[CONFIG])
        self.predictor = EmotionPredictor(weights, config, "cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Bad rows are an ``INVALID_PARAMETER_VALUE`` error naming the row (HTTP 400 when served)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        predictor = self.predictor
        try:
            waves = rows_audio(pd.DataFrame(model_input), predictor.sample_rate)
            for i, wave in enumerate(waves):
                predictor.check_length(wave, f"row {i}")
        except InputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return result_table(predictor.probabilities(waves), predictor.emotions)


def _signature(emotions: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("string", "audio", required=False)])
    outputs = Schema(
        [ColSpec("string", "emotion"), *(ColSpec("double", c) for c in probability_columns(emotions))]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def example_wave(sample_rate: int, seconds: float = 1.0) -> np.ndarray:
    """A voiced-sounding tone with a vibrato: the input example (any audio will do, silence will not)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 160 + 20 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sample_rate)).astype(np.float32)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows one, else a copy: the weights' temporary folder, named
    as the model names it, costs no copy (MLflow then copies it into the model folder)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def save_model_folder(folder: str | Path, weights: Path, config: Config) -> Path:
    """Package the stage-3 weights in ``weights`` (trained under ``config``) as an MLflow pyfunc model at
    ``folder``, atomically (built beside it, then renamed; an existing folder is replaced)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        config_file = work / "config.yaml"
        config_file.write_text(dump_config(config, redacted=True))  # it travels with the model
        shutil.copytree(weights, work / WEIGHTS, copy_function=_link_or_copy)  # its name in the model
        example = pd.DataFrame(
            {"audio": [wav_base64(example_wave(config.data.sample_rate), config.data.sample_rate)]}
        )
        mlflow.pyfunc.save_model(
            path=str(work / "model"),
            python_model=EmotionModel(),
            artifacts={WEIGHTS: str(work / WEIGHTS), CONFIG: str(config_file)},
            code_paths=[str(Path(__file__).parent)],
            signature=_signature(list(config.data.emotions)),
            input_example=example,
            pip_requirements=pinned_requirements(),
            metadata={
                "gmpatl.emotions": list(config.data.emotions),
                "gmpatl.sample_rate": config.data.sample_rate,
            },
        )
        if folder.exists():  # the same run's model again (a resumed CV): the old one goes once replaced
            folder.rename(work / "replaced")
        (work / "model").rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder
