"""Typed experiment configuration.

Every experiment is one YAML file in ``configs/``. It is validated into the frozen models below at load
time, so a typo, an unknown key or a wrong type fails before any work starts, with a message naming the
file and the field. The defaults are the paper's values (GMP-ATL on IEMOCAP with HuBERT base).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError
from .redact import REDACTED, is_secret_name, scrub, scrub_tree

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
NegativeLayer = Annotated[int, Field(lt=0, description="hidden-state index counted from the last layer")]


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-4`` as a float (YAML 1.1, and so PyYAML, wants ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
        r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(InputError):
    """A config file or override that does not validate; the message names the file and every bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ExperimentConfig(_Section):
    name: str = "gmpatl-iemocap"
    seed: int = 0
    output_dir: str = "outputs"
    """Everything a run writes lives under it unless set apart (cache, Ray Train and Tune folders, the
    embedded MLflow store, reports): on a cluster, point it at storage every node sees, in one place."""
    cache_dir: str = "outputs/cache"
    """Fingerprinted artifacts (features, GMPs, checkpoints), shareable between experiments and sweeps;
    default ``<output_dir>/cache``."""


class DemoCorpusConfig(_Section):
    """The generated demo corpus: 5 sessions x (one female, one male speaker) in IEMOCAP's layout."""

    seed: int = 0
    sessions: Annotated[int, Field(ge=2, le=5)] = 5
    utterances_per_emotion: PositiveInt = 8
    """Per speaker and emotion (4 emotions, 2 speakers a session)."""
    dropped_per_speaker: Annotated[int, Field(ge=0)] = 2
    """Utterances per speaker labelled outside the 4 classes (fru, xxx, ...), so the parser's filter runs."""
    min_duration_s: PositiveFloat = 1.0
    max_duration_s: PositiveFloat = 4.0

    @model_validator(mode="after")
    def _durations_ordered(self) -> DemoCorpusConfig:
        if self.min_duration_s > self.max_duration_s:
            raise ValueError("min_duration_s must not exceed max_duration_s")
        return self


class DataConfig(_Section):
    """Where the corpus comes from and how its audio is read."""

    source: Literal["iemocap", "demo", "manifest"] = "iemocap"
    root: str | None = None
    """Corpus root: IEMOCAP_full_release for ``iemocap``; for ``demo`` the folder to generate, default
    ``<output_dir>/IEMOCAP_demo``."""
    csv: str | None = None
    """For ``source: manifest``: your own CSV in the manifest format (README, "Bring your own corpus")."""
    manifest: str = "outputs/manifest.csv"
    """Where ``gmpatl prepare`` writes the manifest and every later step reads it; default
    ``<output_dir>/manifest.csv``."""
    emotions: list[str] = Field(default_factory=lambda: ["ang", "hap", "neu", "sad"], min_length=2)
    merge: dict[str, str] = Field(default_factory=lambda: {"exc": "hap"})
    """Labels renamed before filtering: IEMOCAP's 'excited' joins 'happy'."""
    sample_rate: Literal[16000] = 16000
    """HuBERT's rate; other rates are resampled to it (or refused, see ``resample``)."""
    resample: bool = True
    """Resample other rates to ``sample_rate``; when false a file at another rate is an error."""
    on_error: Literal["fail", "skip"] = "fail"
    demo: DemoCorpusConfig = DemoCorpusConfig()

    @model_validator(mode="after")
    def _source_inputs(self) -> DataConfig:
        if self.source in ("iemocap", "demo") and not self.root:
            raise ValueError(f"source '{self.source}' needs data.root (the corpus folder)")
        if self.source == "manifest" and not self.csv:
            raise ValueError("source 'manifest' needs data.csv (your manifest CSV)")
        if len(set(self.emotions)) != len(self.emotions):
            raise ValueError(f"data.emotions has duplicates: {self.emotions}")
        unknown = sorted(set(self.merge.values()) - set(self.emotions))
        if unknown:
            raise ValueError(f"data.merge maps onto {unknown}, which are not in data.emotions")
        return self


BackboneFamily = Literal["hubert", "wavlm", "wav2vec2", "data2vec-audio"]
"""The self-supervised speech models the method runs on: transformers' ``model_type`` of each."""


class BackboneSize(_Section):
    """A randomly initialised backbone for demos and tests; the defaults are HuBERT base's sizes."""

    family: BackboneFamily = "hubert"
    hidden_size: PositiveInt = 768
    num_hidden_layers: PositiveInt = 12
    num_attention_heads: PositiveInt = 12
    intermediate_size: PositiveInt = 3072
    conv_dim: PositiveInt = 512
    """Channels of each of the 7 CNN feature-encoder layers."""
    large_layout: bool = False
    """The large checkpoints' layout: layer norm in every CNN layer and a pre-norm transformer (base models:
    group norm in the first CNN layer, post-norm). data2vec-audio has one layout of its own for all sizes."""

    @model_validator(mode="after")
    def _heads_divide(self) -> BackboneSize:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.hidden_size % 16:
            raise ValueError(
                "hidden_size must be a multiple of 16 (the backbones' 16 positional-convolution groups)"
            )
        if self.large_layout and self.family == "data2vec-audio":
            raise ValueError("large_layout: data2vec-audio has a single layout; leave it false")
        return self


class BackboneConfig(_Section):
    """The backbone (HuBERT, WavLM, wav2vec 2.0 or data2vec-audio): pretrained weights (a local folder or a
    hub id; the family is read from its config) or a random model of a given family and size."""

    pretrained: str | None = "facebook/hubert-base-ls960"
    allow_download: bool = False
    """Let Hugging Face download a hub id that is not in the local cache (off: never touch the network)."""
    random_init: BackboneSize | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BackboneConfig:
        if (self.pretrained is None) == (self.random_init is None):
            raise ValueError("set exactly one of backbone.pretrained and backbone.random_init")
        return self


class OptimConfig(_Section):
    name: Literal["adam"] = "adam"
    lr: PositiveFloat = 1e-4
    batch_size: PositiveInt = 64
    epochs: PositiveInt = 20


class ExtractConfig(_Section):
    """Ray Data feature extraction: manifest -> audio -> length-bucketed batches -> HuBERT actors."""

    layers: list[NegativeLayer] | None = None
    """Hidden states to store; None stores ``gmp.layer`` only."""
    batch_size: PositiveInt = 1
    """Utterances per forward pass, bucketed by duration (1 is fastest on CPU; 16-32 on a GPU)."""
    max_duration_s: PositiveFloat = 20.0
    long_audio: Literal["chunk", "crop"] = "chunk"
    """Longer utterances are cut into frame-aligned chunks (all frames kept) or cropped to the limit."""
    actors: PositiveInt | None = None
    """None: one actor per GPU of the cluster, or, on CPU, one per CPU core (data parallelism beats
    torch's intra-op threads for one utterance at a time)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: one GPU per actor when the cluster has GPUs, else CPU actors."""
    threads_per_actor: PositiveInt = 1
    """torch threads in each CPU actor."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast (GPU, or CPUs with AMX/AVX512-BF16); features are stored as float16 either way."""


class TrainConfig(_Section):
    """How every stage runs on Ray Train (DDP: NCCL on GPUs, gloo on CPUs)."""

    num_workers: Annotated[int, Field(ge=0)] = 1
    """DDP workers per stage. 0: Ray Train's local mode, the stage's training function in the calling
    process (no worker group, no checkpoint kept, so no resume and no fault tolerance; torch's threads
    set from ``cpus_per_worker``): seconds faster to start, for debugging and tests that are not about
    those. It trains the same model as one worker."""
    use_gpu: bool = False
    cpus_per_worker: PositiveInt = 1
    """Logical CPUs reserved per worker: its data loader processes take one each, torch's threads the rest
    (at least one; Ray starts workers with one)."""
    loader_workers: Annotated[int, Field(ge=0)] | None = None
    """DataLoader processes per worker that read and decode the next batches' audio while the model trains
    (from shared storage, file by file); 0 reads in the training process. Batches are the same either way.
    None: on a GPU worker all its CPUs but one (at least one process), on a CPU worker 0 (the training
    process needs the CPUs itself)."""
    pin_memory: bool = True
    """Page-locked batches, copied to the GPU without blocking (GPU workers only)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How a stage's workers are placed on the cluster's nodes (Ray placement-group strategies): PACK fills
    a node first (NCCL within a node is fastest), SPREAD puts them on different nodes."""
    max_failures: Annotated[int, Field(ge=0)] = 2
    """Worker failures a stage survives by restarting from its last checkpoint."""
    storage_path: str = "outputs/ray_train"
    """Ray Train's run folder (checkpoints); default ``<output_dir>/ray_train``."""
    validation: Literal["stratified", "session"] = "stratified"
    """The utterances that pick each stage's best epoch, carved out of the training folds. ``stratified``:
    ``val_fraction`` of each emotion, drawn with the seed; they share speakers with training, so selection
    is optimistic. ``session``: the whole fold after the test fold (speakers whose labels never train a
    stage; their audio still joins the k-means), at the cost of that fold's training data (a quarter of it
    on IEMOCAP's five sessions). The paper does not say."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of the training folds held out (per emotion) to pick the best epoch (``stratified``)."""
    max_duration_s: PositiveFloat = 8.0
    """Training crops longer utterances to a random window of this length (memory); evaluation does not."""
    freeze_feature_encoder: bool = True
    """Keep HuBERT's CNN fixed while fine-tuning (the usual practice; it also halves the backward pass)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast of the forward pass (GPUs from Ampere on; CPUs run it too, slowly without AMX)."""
    gradient_checkpointing: bool = False
    """Recompute HuBERT's transformer layers in the backward pass: less GPU memory, about a third slower."""
    checkpoints_to_keep: PositiveInt = 1
    """Ray Train checkpoints kept while a stage runs (each holds the model, its best epoch's copy and the
    optimizer: over 1 GB for HuBERT base). Resuming needs the latest one only."""
    keep_run_folders: bool = False
    """Keep a stage's Ray Train run folder (its checkpoints) once the stage's artifact is in the cache, for
    debugging. By default it is removed then: the artifact holds everything later steps use."""
    eval_batch_s: PositiveFloat = 160.0
    """Validation and test forward passes hold at most this many seconds of padded audio (utterances
    grouped by length), so memory does not follow the training batch size or the longest file."""
    eval_max_duration_s: PositiveFloat = 20.0
    """Longer utterances are evaluated in frame-exact chunks of at most this length whose HuBERT frames are
    joined again before the utterance head, so one long file never decides the memory peak. Shorter ones
    get the frames of a lone forward pass (padding counts for nothing)."""
    poll_interval_s: PositiveFloat = 2.0
    """How often Ray Train's controller checks its workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's
    default 2 s). Each stage waits for several checks between start-up phases, so short stages (the demo,
    tests) run seconds faster with a fraction of a second; long ones do not notice."""

    def data_loaders(self) -> int:
        """``loader_workers``, or what None stands for."""
        if self.loader_workers is not None:
            return self.loader_workers
        return max(1, self.cpus_per_worker - 1) if self.use_gpu else 0

    @model_validator(mode="after")
    def _chunks_fit_a_batch(self) -> TrainConfig:
        if self.eval_max_duration_s > self.eval_batch_s:
            raise ValueError(
                f"eval_max_duration_s ({self.eval_max_duration_s}) must not exceed eval_batch_s "
                f"({self.eval_batch_s}): one evaluation chunk has to fit one evaluation batch"
            )
        return self


class Stage1Config(_Section):
    """Multi-task stage: HuBERT -> BiLSTM -> mean pooling -> LinearP -> emotion and gender heads."""

    alpha_e: Fraction = 0.9
    """Loss weight: alpha_e * CE_emotion + (1 - alpha_e) * CE_gender."""
    lstm_hidden: PositiveInt = 256
    lstm_layers: PositiveInt = 1
    proj_dim: PositiveInt = 256
    optim: OptimConfig = OptimConfig()


class GMPConfig(_Section):
    """Pseudo-labels: k-means of one stage-1 HuBERT layer at several scales."""

    layer: NegativeLayer = -3
    scales: list[PositiveInt] = Field(default_factory=lambda: [64, 512, 4096], min_length=1)
    backend: Literal["auto", "cuml", "faiss"] = "auto"
    max_frames: PositiveInt = 1_000_000
    """Frames sampled uniformly to fit each k-means (as fairseq samples a percentage); every frame is then
    labelled. This is also the multi-GPU strategy: the sample fits one GPU, labelling streams."""
    iterations: PositiveInt = 20
    transductive: bool = False
    """Also cluster, and retrain stage 2 on, the test fold's audio (never its labels): the transductive
    variant. The default keeps every test utterance out of everything but the final scoring."""


class Stage2Config(_Section):
    """Retraining: HuBERT-style span masking, one LinearP head per scale predicting that scale's labels."""

    enabled: bool = True
    """False is the paper's "without GMPs" ablation (Table 3): no k-means, no stage 2; stage 3 fine-tunes
    the stage-1 HuBERT."""
    mask_prob: Fraction = 0.8
    mask_length: PositiveInt = 10
    masked_weight: Annotated[float, Field(ge=0)] = 1.0
    unmasked_weight: Annotated[float, Field(ge=0)] = 0.0
    proj_dim: PositiveInt = 256
    optim: OptimConfig = OptimConfig()


class Stage3Config(_Section):
    """Fine-tuning for utterance emotion with AM-Softmax (or plain CE, for the paper's ablation)."""

    loss: Literal["amsoftmax", "ce"] = "amsoftmax"
    scale: PositiveFloat = 30.0
    margin: Annotated[float, Field(ge=0)] = 0.2
    optim: OptimConfig = OptimConfig()


class TrackingConfig(_Section):
    """MLflow: ``uri`` None means ``MLFLOW_TRACKING_URI`` if set, else a local SQLite store in output_dir."""

    experiment: str = "gmpatl"
    uri: str | None = None
    log_model: bool = True
    """Log each fold's model (and ``gmpatl train``'s) as an MLflow pyfunc model at artifact path ``model``:
    ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and ``gmpatl predict`` take it."""
    register_model: str | None = None
    """``gmpatl train`` registers its model under this name in the MLflow model registry (a new version
    per run)."""

    @model_validator(mode="after")
    def _registers_a_logged_model(self) -> TrackingConfig:
        if self.register_model and not self.log_model:
            raise ValueError("register_model needs log_model: true (it registers the logged model)")
        return self


class CVConfig(_Section):
    """How ``gmpatl cv`` (and each sweep trial) runs its folds. Results do not depend on it: each fold has
    the same seeds and cache fingerprints whichever way it runs."""

    max_concurrent_folds: PositiveInt | None = None
    """Folds run at once, each stage reserving its own workers. None: as many as the cluster's GPUs (with
    ``train.use_gpu``) or CPUs fit a stage's workers now, at least one; on an autoscaling cluster whose GPU
    nodes may be at zero, set it (``configs/cluster.yaml``). 1: one fold after another."""


class PredictConfig(_Section):
    """``gmpatl predict``: a trained model on new audio with Ray Data (decode tasks, an actor pool of the
    model). The served MLflow model reads ``window_s`` from the config it was trained with."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: one GPU per actor when the cluster has GPUs, else CPU actors."""
    actors: PositiveInt | None = None
    """None: one per GPU of the cluster, or, on CPU, one per ``threads_per_actor`` CPU cores."""
    threads_per_actor: PositiveInt = 1
    """torch threads in each CPU actor."""
    window_s: PositiveFloat = 60.0
    """A file longer than this is cut into equal windows of at most this length, each scored as an
    utterance; the file's probabilities are the windows' mean, weighted by their length. (Within a window,
    the backbone still runs in chunks of ``train.eval_max_duration_s``, as in evaluation.)"""
    on_error: Literal["fail", "skip"] = "fail"
    """fail: list every bad file and write nothing; skip: write the others and list the bad ones beside
    the output (``<out>.skipped.txt``)."""


class SearchSpace(_Section):
    """One swept field: exactly one of ``grid`` (every value, crossed with the other grids), ``choice``
    (one value drawn per sample), ``uniform`` or ``loguniform`` ([low, high], drawn per sample)."""

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    loguniform: list[PositiveFloat] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchSpace:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds and bounds[0] >= bounds[1]:
            raise ValueError(f"[low, high] needs low < high (got {bounds})")
        return self

    def candidates(self) -> list[Any]:
        """Values that stand for the dimension when the config is checked: all listed ones, or the bounds."""
        return self.grid or self.choice or self.uniform or self.loguniform


class SweepConfig(_Section):
    """A Ray Tune sweep: each trial is this experiment with one point of ``space``, run over ``folds``;
    trials are ranked by the mean validation UAR over the folds (never the test folds')."""

    space: dict[str, SearchSpace] = Field(min_length=1)
    """Dotted config fields (``stage3.margin``) and their values."""
    num_samples: PositiveInt = 1
    """Draws of the non-grid dimensions (each one crossed with the whole grid)."""
    folds: list[int | str] | None = None
    """Folds every trial runs (default: all of the manifest's)."""
    max_concurrent_trials: PositiveInt = 2
    cpus_per_trial: Annotated[float, Field(ge=0)] = 0.0
    """CPUs held by a trial's own process; its stages reserve their Ray Train workers on top."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """asha stops trials whose mean validation UAR trails after ``grace_folds`` folds."""
    grace_folds: PositiveInt = 1
    max_failures: Annotated[int, Field(ge=0)] = 1
    """Retries of a trial that raises; after them it is marked failed and the sweep goes on."""
    storage_path: str = "outputs/ray_tune"
    """Ray Tune's experiment folder (trial state, for ``gmpatl sweep --resume``); default
    ``<output_dir>/ray_tune``."""


OUTPUT_FOLDERS = (
    ("experiment", "cache_dir", "cache"),
    ("data", "manifest", "manifest.csv"),
    ("train", "storage_path", "ray_train"),
    ("sweep", "storage_path", "ray_tune"),
)
"""Paths that default to ``<experiment.output_dir>/<name>``: everything a run writes lives there."""
DEMO_CORPUS_FOLDER = "IEMOCAP_demo"
"""The generated demo corpus, ``<experiment.output_dir>/IEMOCAP_demo`` unless ``data.root`` says."""
IEMOCAP_ROOT = "IEMOCAP_full_release"


class Config(_Section):
    """One experiment."""

    experiment: ExperimentConfig = ExperimentConfig()
    data: DataConfig = DataConfig(root=IEMOCAP_ROOT)
    backbone: BackboneConfig = BackboneConfig()
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    stage1: Stage1Config = Stage1Config()
    gmp: GMPConfig = GMPConfig()
    stage2: Stage2Config = Stage2Config()
    stage3: Stage3Config = Stage3Config()
    tracking: TrackingConfig = TrackingConfig()
    cv: CVConfig = CVConfig()
    predict: PredictConfig = PredictConfig()
    sweep: SweepConfig | None = None
    """Only ``gmpatl sweep`` reads it; every other command runs the experiment as written."""

    @model_validator(mode="before")
    @classmethod
    def _paths_under_output_dir(cls, raw: Any) -> Any:
        """Folders not given explicitly follow ``experiment.output_dir``."""
        if not isinstance(raw, dict):
            return raw
        raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
        experiment = raw.setdefault("experiment", {})
        if not isinstance(experiment, dict):
            return raw
        out = experiment.get("output_dir") or ExperimentConfig().output_dir
        if not isinstance(out, str):
            return raw
        out = out.rstrip("/")
        data = raw.setdefault("data", {"root": IEMOCAP_ROOT})
        if isinstance(data, dict) and data.get("source") == "demo" and data.get("root") is None:
            data["root"] = f"{out}/{DEMO_CORPUS_FOLDER}"
        for section, field, name in OUTPUT_FOLDERS:
            part = raw.setdefault(section, {}) if section != "sweep" else raw.get(section)
            if isinstance(part, dict) and part.get(field) is None:
                part[field] = f"{out}/{name}"
        return raw

    @model_validator(mode="after")
    def _batches_split_over_workers(self) -> Config:
        for stage in ("stage1", "stage2", "stage3"):
            batch = getattr(self, stage).optim.batch_size
            if batch % max(1, self.train.num_workers):
                raise ValueError(
                    f"{stage}.optim.batch_size {batch} is the global batch and must be a multiple of "
                    f"train.num_workers {self.train.num_workers}"
                )
        return self

    @model_validator(mode="after")
    def _sweep_space_fits(self) -> Config:
        """Every swept field exists and takes every listed value (or bound), so a sweep fails at load time,
        not in its hundredth trial."""
        if self.sweep is None:
            return self
        if self.train.num_workers == 0:  # Ray Tune's trial context replaces the one local mode needs
            raise ValueError(
                "train.num_workers 0 (Ray Train's local mode) does not run in a sweep's trials; "
                "give 1 or more"
            )
        base = self.model_dump(mode="json", exclude={"sweep"})
        for key, dimension in self.sweep.space.items():
            for value in dimension.candidates():
                raw = json.loads(json.dumps(base))
                try:
                    set_field(raw, key, value)
                    Config.model_validate(raw)
                except ConfigError as err:
                    raise ValueError(f"sweep.space.{key}: {err}") from None
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    problem = f"value {value!r} gives {where}: {first['msg']}"
                    raise ValueError(f"sweep.space.{key}: {problem}") from None
        return self


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem(s))"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        whole_section = e["type"] == "value_error" and isinstance(e["input"], dict)  # a cross-field check
        hidden = e["type"] == "missing" or whole_section or is_secret_name(field)
        got = "" if hidden else f" (got {e['input']!r})"
        lines.append(f"  {field}: {e['msg']}{got}")
    return scrub("\n".join(lines))


def _shown_override(override: str) -> str:
    """An override as an error message may echo it: a secret-named field's value hidden, URLs scrubbed."""
    key, sep, value = override.partition("=")
    return f"{key}={REDACTED}" if sep and is_secret_name(key) else scrub(override)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is YAML (``0.8``, ``[64, 512]``)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {_shown_override(override)!r}: expected FIELD=VALUE, e.g. stage1.alpha_e=0.8"
        )
    set_field(raw, key.strip(), _parse_yaml(value))


def set_field(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted field ``key`` (``stage3.margin``) of a raw config in place, creating sections."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load and validate a YAML experiment; ``None`` gives the paper defaults. Overrides win over the file.

    A file may start from others: ``extends: demo.yaml`` (relative to the file) loads that one first and
    merges this file's sections into it field by field (lists and values replace, sections merge);
    ``extends: [table3.yaml, cluster.yaml]`` merges several in order, each one over the one before.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path), seen=())
    for override in overrides:
        apply_override(raw, override)
    if overrides:
        source += " with --set " + " ".join(map(_shown_override, overrides))
    return config_from_dict(raw, source)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        loaded = _parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = loaded or {}
    bases = raw.pop("extends", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: extends: expected the path of another config or a list of them")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if base_path in seen or base_path == path.resolve():
            raise ConfigError(f"{path}: extends: {base} extends itself through {[str(p) for p in seen]}")
        merged = _merge(merged, _read_yaml(base_path, (*seen, path.resolve())))
    return _merge(merged, raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


PATH_FIELDS = (
    "experiment.output_dir",
    "experiment.cache_dir",
    "data.root",
    "data.manifest",
    "data.csv",
    "train.storage_path",
    "sweep.storage_path",
)


def with_absolute_paths(config: Config, refuse_relative: str | None = None) -> Config:
    """The config with its relative paths (and a local ``backbone.pretrained`` folder) resolved against the
    current directory: every process that reads the config runs elsewhere (Ray Train workers, Tune trials,
    tasks on other nodes), so no path may depend on where it runs. ``refuse_relative``: why a relative path
    cannot be right here (a submitted job's scratch copy of the working dir); each one is then an error
    naming its field."""
    raw = config.model_dump(mode="json")
    relative = []
    for key in PATH_FIELDS:
        section, field = key.split(".")
        value = (raw.get(section) or {}).get(field)
        if isinstance(value, str) and value and "://" not in value:
            if refuse_relative and not Path(value).expanduser().is_absolute():
                relative.append(f"  {key}: {value!r} is relative")
            raw[section][field] = str(Path(value).expanduser().resolve())
    if relative:
        raise ConfigError("\n".join([f"relative paths {refuse_relative}:", *relative]))
    pretrained = raw["backbone"]["pretrained"]
    raw["backbone"]["pretrained"] = _local_folder(pretrained)
    swept = ((raw.get("sweep") or {}).get("space") or {}).get("backbone.pretrained") or {}
    for kind in ("grid", "choice"):  # a backbone sweep's local folders, as the trials will need them
        if swept.get(kind):
            swept[kind] = [_local_folder(value) for value in swept[kind]]
    return config_from_dict(raw, "<config with absolute paths>")


def _local_folder(pretrained: Any) -> Any:
    """An existing local ``backbone.pretrained`` folder made absolute; a hub id (or nothing) as it is."""
    if isinstance(pretrained, str) and pretrained and Path(pretrained).expanduser().exists():
        return str(Path(pretrained).expanduser().resolve())
    return pretrained


def dump_config(config: Config, redacted: bool = False) -> str:
    """The fully resolved config as YAML (defaults filled in), e.g. to start a new experiment; ``redacted``:
    without secrets (:func:`gmpatl_ray.redact.scrub_tree`), as it is logged."""
    tree = config.model_dump(mode="json")
    return yaml.safe_dump(scrub_tree(tree) if redacted else tree, sort_keys=False)
