"""The GPU path end to end, where there is a GPU (marked ``gpu``; skipped elsewhere): one fold of the small
demo corpus with every GPU setting configs/cluster.yaml states: stages on Ray Train with NCCL and bf16,
extraction on GPU actors, cuML k-means. Each step must say it ran on the GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TRAINING, small_config

from gmpatl_ray.artifacts import ArtifactCache
from gmpatl_ray.clustering import gpu_available
from gmpatl_ray.pipeline import run_fold

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and gpu_available()), reason="needs a CUDA GPU and cuML"
    ),
]


@pytest.mark.usefixtures("ray_cluster")
def test_one_fold_runs_on_the_gpu_with_cuml_and_gpu_extraction(small_corpus, tmp_path):
    folder, manifest = small_corpus
    config = small_config(
        folder,
        f"experiment.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'ray'}",
        *TINY_TRAINING,
        "train.use_gpu=true",
        "train.precision=bf16",
        "train.loader_workers=1",
        "extract.device=cuda",
        "extract.actors=1",
        "extract.batch_size=4",
        "gmp.backend=cuml",
    )
    result = run_fold(config, manifest, 1, ArtifactCache(tmp_path / "cache"))
    assert all(result.built.values())
    for stage in ("stage1", "stage2", "stage3"):
        (worker,) = result.artifacts[stage].meta["workers"]
        assert worker["device"].startswith("cuda"), (stage, worker)
    assert result.artifacts["gmps"].meta["backend"] == "cuml"
    features = next((tmp_path / "cache" / "features").glob("*/_COMPLETE.json")).read_text()
    assert '"device": "cuda"' in features
    assert 0 <= result.uar <= 1 and sum(map(sum, result.confusion)) == result.test_utterances
