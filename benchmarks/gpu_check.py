"""The GPU paths on one GPU in a few minutes (``make gpu-check``), each beside its baseline in the same run.

1. Extraction: the Ray Data pipeline on the GPU (one actor, bf16 autocast, length-bucketed batches of
   ``--batch-size``) against the naive loop on the same GPU (one utterance at a time, fp32), over the demo
   corpus with a HuBERT-base-size random model, layer -3.
2. k-means on those features: cuML against faiss (CPU) at k = 64, 512, 4096, seconds and the inertia
   ratio (both measured the same way: exact nearest centroid over every frame).
3. Stage-1 training throughput of HuBERT base size (random init) at global batch 64 (8-s crops) with bf16
   autocast on one GPU: seconds per step, utterances per second, peak GPU memory (Adam state included).
4. One demo fold end to end on the GPU (``tests/test_gpu.py``: Ray Train with NCCL and bf16, GPU
   extraction, cuML), which asserts that each step ran on the GPU.

Without a CUDA GPU it says so and exits 0, so it is safe to run anywhere. Record what it prints in
``benchmarks/README.md`` with the GPU's name and the date.

    .venv/bin/python benchmarks/gpu_check.py [--utterances 320] [--batch-size 32] [--skip-fold]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SCALES = (64, 512, 4096)


def naive_loop(config, manifest) -> float:
    """Seconds for the plain loop on the GPU, one utterance at a time in fp32, model construction included
    (as the pipeline's actor includes it)."""
    from gmpatl_ray.data.audio import load_audio
    from gmpatl_ray.models.backbone import hidden_state_index, load_backbone

    start = time.perf_counter()
    model = load_backbone(config.backbone, config.experiment.seed).to("cuda").eval()
    index = hidden_state_index(config.gmp.layer, model.config.num_hidden_layers)
    with torch.inference_mode():
        for path in manifest["path"]:
            wave = torch.from_numpy(load_audio(path))[None].to("cuda")
            model(wave, output_hidden_states=True).hidden_states[index][0].to(torch.float16).cpu().numpy()
    return time.perf_counter() - start


def extraction(config, manifest, batch_size: int, cache) -> object:
    """Print the pipeline against the naive loop; return the pipeline's feature store."""
    from gmpatl_ray.features import extract_features

    gpu = config.model_copy(
        update={
            "extract": config.extract.model_copy(
                update={"device": "cuda", "precision": "bf16", "batch_size": batch_size, "actors": 1}
            )
        }
    )
    store, _ = extract_features(gpu, manifest, cache)
    pipeline_s = store.artifact.meta["seconds"]
    naive_s = naive_loop(config, manifest)
    audio_s = manifest["duration_s"].sum()
    print(f"1. extraction, {len(manifest)} utterances, {audio_s:.0f} s of audio, HuBERT base size, layer -3")
    print(f"   naive loop (fp32, 1 at a time) {naive_s:7.1f} s  {audio_s / naive_s:8.1f} audio s/s")
    print(
        f"   pipeline (bf16, batch {batch_size})     {pipeline_s:7.1f} s  "
        f"{audio_s / pipeline_s:8.1f} audio s/s  ratio {naive_s / pipeline_s:.2f}x",
        flush=True,
    )
    return store


def kmeans(store) -> None:
    from gmpatl_ray.clustering import fit_kmeans

    x = np.concatenate([f for _, f in store.iter_layer(-3)]).astype(np.float32)
    print(f"2. k-means on {x.shape[0]} frames x {x.shape[1]} dims, 20 iterations")
    for k in SCALES:
        if k > x.shape[0] // 4:
            print(f"   k={k}: skipped, too few frames")
            continue
        cuml = fit_kmeans(x, k, 20, seed=0, backend="cuml")
        faiss = fit_kmeans(x, k, 20, seed=0, backend="faiss")
        print(
            f"   k={k:5d}  cuML {cuml.seconds:6.1f} s  faiss {faiss.seconds:6.1f} s  "
            f"speed-up {faiss.seconds / cuml.seconds:5.1f}x  "
            f"inertia cuML/faiss {cuml.inertia / faiss.inertia:.3f}",
            flush=True,
        )


def training_throughput(folder: Path) -> None:
    import gpu_memory

    from gmpatl_ray.config import load_config
    from gmpatl_ray.stages import stage1
    from gmpatl_ray.training import collate

    config = load_config(REPO / "configs" / "iemocap.yaml", gpu_memory.BASE)
    rng = np.random.default_rng(1)
    waves = [(rng.standard_normal(8 * 16000) * 0.1).astype(np.float32) for _ in range(64)]
    batch = collate([(w, {"emotion": i % 4, "gender": i % 2}) for i, w in enumerate(waves)])
    batch = {k: v.to("cuda") for k, v in batch.items()}
    model = stage1.build_model(config).to("cuda").train()
    peak, seconds = gpu_memory.train_step(model, lambda m, b: stage1.loss(m, b, config), batch, bf16=True)
    print(
        f"3. stage 1, HuBERT base size, global batch 64 x 8 s, bf16: {seconds:.2f} s/step, "
        f"{64 / seconds:.0f} utterances/s, peak {peak:.1f} GiB",
        flush=True,
    )


def demo_fold() -> int:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu.py")],
        cwd=REPO,
    )
    state = "passed" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"4. one demo fold on the GPU (tests/test_gpu.py): {state} in {time.perf_counter() - start:.0f} s")
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-fold", action="store_true", help="leave out the end-to-end fold (4)")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here, so nothing to measure (run it on a machine with one)")
        return 0

    import ray
    from extraction import base_size_demo

    from gmpatl_ray.artifacts import ArtifactCache
    from gmpatl_ray.clustering import gpu_available
    from gmpatl_ray.data.prepare import load_or_prepare

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    config = base_size_demo(args.workdir)
    manifest = load_or_prepare(config.data).sample(n=args.utterances, random_state=0)
    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = extraction(config, manifest, args.batch_size, ArtifactCache(tmp))
        if gpu_available():
            kmeans(store)
        else:
            print("2. k-means: skipped, cuML is not installed (pip install -e '.[gpu]')")
        ray.shutdown()
        training_throughput(Path(tmp))
    return 0 if args.skip_fold else demo_fold()


if __name__ == "__main__":
    raise SystemExit(main())
