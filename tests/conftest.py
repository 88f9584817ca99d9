import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as fake_iemocap

REPO = Path(__file__).parent.parent

TINY_SIZE = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": 32,
}
"""The tests' randomly initialised backbone (``backbone.random_init``)."""
TINY_BACKBONE = ["backbone.pretrained=null", f"backbone.random_init={json.dumps(TINY_SIZE)}"]


def small_config(folder: Path, *overrides: str):
    """configs/demo.yaml shrunk for tests: 2 sessions x 2 speakers x 4 emotions x 2 utts, tiny HuBERT."""
    from gmpatl_ray.config import load_config

    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.root={folder / 'corpus'}",
            f"data.manifest={folder / 'manifest.csv'}",
            "data.demo={sessions: 2, utterances_per_emotion: 2, dropped_per_speaker: 1}",
            f"experiment.output_dir={folder / 'out'}",
            f"experiment.cache_dir={folder / 'cache'}",
            *TINY_BACKBONE,
            "train.num_workers=1",  # start-up dominates tiny runs; DDP has tests of its own
            "train.cpus_per_worker=2",
            "extract.actors=1",  # one HuBERT actor: a second one's start-up costs more than it saves here
            "gmp.layer=-2",
            "gmp.scales=[4, 8]",
            *overrides,
        ],
    )


def cv_results(output_dir: Path):
    """The per-fold table of the one CV run that wrote into ``output_dir`` (its reports folder, named by
    its MLflow run id)."""
    import pandas as pd

    [table] = (Path(output_dir) / "reports").glob("*/cv_results.csv")
    return pd.read_csv(table, keep_default_na=False)


TINY_TRAINING = [
    "train.max_failures=0",
    "train.val_fraction=0.25",
    "stage1.optim={lr: 3.0e-3, batch_size: 8, epochs: 3}",
    "stage2.optim={lr: 1.0e-3, batch_size: 8, epochs: 3}",
    "stage3.optim={lr: 3.0e-3, batch_size: 8, epochs: 2}",
    "stage1.lstm_hidden=16",
    "stage1.proj_dim=16",
    "stage2.proj_dim=16",
]
"""Stage settings small enough that a stage run is mostly Ray Train's start-up; stages 1 and 2 run long
enough for a worker to be killed after a checkpoint and the stage to resume (tests/test_faults.py)."""


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (2 CPUs, as on the CI machine). Yields the
    environment that makes a `gmpatl` subprocess join it (as a submitted job joins its cluster) instead
    of starting a cluster of its own."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield {"RAY_ADDRESS": context.address_info["address"]}
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The small demo corpus and its manifest, prepared once."""
    from gmpatl_ray.data.prepare import load_or_prepare

    folder = tmp_path_factory.mktemp("small")
    config = small_config(folder)
    return folder, load_or_prepare(config.data)


@pytest.fixture(scope="session")
def small_features(small_corpus, ray_cluster, tmp_path_factory):
    """The small corpus's features under ``small_config`` (layer -2 of the tiny random HuBERT), extracted
    once for the session in a cache of its own: (config, manifest, store, cache)."""
    from gmpatl_ray.artifacts import ArtifactCache
    from gmpatl_ray.features import extract_features

    folder, manifest = small_corpus
    config, cache = small_config(folder), ArtifactCache(tmp_path_factory.mktemp("features"))
    store, built = extract_features(config, manifest, cache)
    assert built
    return config, manifest, store, cache


@contextmanager
def model_work_here() -> Iterator[list[str]]:
    """While open, every model built (any transformers model: the backbones of all families) and every
    ``torch.load`` in this process, by name: what a driver or
    a Tune trial must not do (the model's work belongs to the Ray Train workers and tasks)."""
    import torch
    import transformers

    work: list[str] = []
    model_init, torch_load = transformers.PreTrainedModel.__init__, torch.load

    def counted_init(self, *args, **kwargs):
        work.append(f"built {type(self).__name__}")
        model_init(self, *args, **kwargs)

    def counted_load(*args, **kwargs):
        work.append(f"torch.load {args[0] if args else kwargs}")
        return torch_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "__init__", counted_init)
        patch.setattr(torch, "load", counted_load)
        yield work


DRIVER_WORK: dict[str, list[str]] = {}
"""What :func:`model_work_here` saw while a session fixture ran a fold in this process."""


@pytest.fixture(scope="session")
def trained_fold(small_corpus, ray_cluster, tmp_path_factory):
    """Fold 1 of the small corpus through every stage with TINY_TRAINING, once for the session, in a stage
    cache of its own. Tests of what surrounds training (the CLI, MLflow, job submission, tracking
    outages) point ``experiment.cache_dir`` at it and reuse the stages instead of training them again;
    the fault tests compare their interrupted stages with these. Its Ray Train run folders are kept
    (``<cache>/../ray``), so tests can read each stage's last epoch. What this process did of a model's
    work meanwhile is in ``DRIVER_WORK["trained_fold"]``. Returns the cache folder and the fold's first
    (building) result."""
    from gmpatl_ray.artifacts import ArtifactCache
    from gmpatl_ray.pipeline import run_fold

    folder, manifest = small_corpus
    shared = tmp_path_factory.mktemp("trained_fold")
    overrides = [
        f"experiment.cache_dir={shared / 'cache'}",
        f"train.storage_path={shared / 'ray'}",
        "train.keep_run_folders=true",
    ]
    config = small_config(folder, *overrides, *TINY_TRAINING)
    with model_work_here() as work:
        fold = run_fold(config, manifest, 1, ArtifactCache(shared / "cache"))
    DRIVER_WORK["trained_fold"] = work
    return shared / "cache", fold


DDP_TRAINING = [
    "train.max_failures=1",
    "train.val_fraction=0.25",
    "train.num_workers=2",
    "train.cpus_per_worker=1",
    "train.loader_workers=1",
    "train.precision=bf16",
    "train.gradient_checkpointing=true",
    "stage1.optim={lr: 3.0e-3, batch_size: 4, epochs: 3}",
    "stage1.lstm_hidden=16",
    "stage1.proj_dim=16",
]
"""Stage 1 on 2 gloo DDP workers with bf16 autocast, gradient checkpointing and a DataLoader process each
(forked inside the Ray Train worker)."""


@pytest.fixture(scope="session")
def ddp_stage1(small_corpus, ray_cluster, tmp_path_factory):
    """Fold 2's stage 1 under DDP_TRAINING, once for the session, its Ray Train run folder kept: the DDP
    test reads it and the DDP worker-kill test compares its interrupted run with it.
    Returns (config, split, artifact, storage path)."""
    from gmpatl_ray.artifacts import ArtifactCache
    from gmpatl_ray.cv import fold_split
    from gmpatl_ray.stages.stage1 import run_stage1

    folder, manifest = small_corpus
    shared = tmp_path_factory.mktemp("ddp_stage1")
    config = small_config(
        folder, f"train.storage_path={shared / 'ray'}", "train.keep_run_folders=true", *DDP_TRAINING
    )
    split = fold_split(config, manifest, 2)
    artifact, built = run_stage1(config, split, ArtifactCache(shared / "cache"))
    assert built
    return config, split, artifact, shared / "ray"


@pytest.fixture(scope="session")
def tracked_cv(small_corpus, trained_fold, ray_cluster, tmp_path_factory):
    """`gmpatl cv --folds 1` as a user runs it, on the session's cluster, its stages reused from the
    session's trained fold, tracked in its own SQLite MLflow store; once for the session (the CLI's
    MLflow test reads its run tree, the prediction tests use its fold model). Returns the config file,
    the output folder, the MLflow URI and the finished process (its stdout prints the predict command)."""
    import os
    import subprocess

    from gmpatl_ray.config import dump_config

    folder, _ = small_corpus
    cache, _ = trained_fold
    here = tmp_path_factory.mktemp("tracked_cv")
    config_file = here / "small.yaml"
    overrides = [
        f"experiment.output_dir={here / 'out'}",
        f"experiment.cache_dir={cache}",
        f"train.storage_path={here / 'ray'}",
        "tracking.experiment=cv-test",
        *TINY_TRAINING,
    ]
    config_file.write_text(dump_config(small_config(folder, *overrides)))
    gmpatl = Path(sys.executable).parent / "gmpatl"
    result = subprocess.run(
        [str(gmpatl), "cv", "--config", str(config_file), "--folds", "1"],
        cwd=REPO,
        env={**os.environ, **ray_cluster},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "config": config_file,
        "out": here / "out",
        "uri": f"sqlite:///{here / 'out' / 'mlflow.db'}",
        "result": result,
    }
