"""Feature extraction: the Ray Data pipeline against a naive loop, side by side in one run.

Both use the same base-size random HuBERT (HuBERT base's compute), the same utterances of the demo corpus,
the same number of threads (the naive loop: torch threads = cores; the pipeline: one single-threaded actor
per core, its default), and store the same thing (layer -3 as float16). The naive loop is what one writes
first: one utterance at a time through ``HubertModel(..., output_hidden_states=True)``.

    .venv/bin/python benchmarks/extraction.py [--utterances 320] [--batch-size 1] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.artifacts import ArtifactCache  # noqa: E402
from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.data.audio import load_audio  # noqa: E402
from gmpatl_ray.data.prepare import load_or_prepare  # noqa: E402
from gmpatl_ray.features import extract_features  # noqa: E402
from gmpatl_ray.models.backbone import hidden_state_index, load_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def base_size_demo(workdir: str, *overrides: str):
    """The demo corpus (generated under ``workdir``) with a HuBERT-base-size random model, layer -3."""
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.root={workdir}/IEMOCAP_demo",
            f"data.manifest={workdir}/manifest.csv",
            "backbone.random_init={}",  # HuBERT base's sizes
            "gmp.layer=-3",
            *overrides,
        ],
    )


def naive_loop(config, manifest) -> float:
    """Seconds for the plain loop, model construction included (as the pipeline's actors include it)."""
    start = time.perf_counter()
    model = load_backbone(config.backbone, config.experiment.seed).eval()
    index = hidden_state_index(config.gmp.layer, model.config.num_hidden_layers)
    with torch.inference_mode():
        for path in manifest["path"]:
            wave = torch.from_numpy(load_audio(path))[None]
            model(wave, output_hidden_states=True).hidden_states[index][0].to(torch.float16).numpy()
    return time.perf_counter() - start


def _one_thread_loop(args: tuple) -> None:
    torch.set_num_threads(1)
    config, manifest = args
    naive_loop(config, manifest)


def process_ceiling(config, manifest, processes: int) -> float:
    """Seconds for ``processes`` single-threaded naive loops over disjoint shares, without Ray: what data
    parallelism alone gives on these cores (the pipeline's ceiling)."""
    import multiprocessing

    shares = [(config, manifest.iloc[i::processes]) for i in range(processes)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_one_thread_loop, shares)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--bf16", action="store_true", help="also run the pipeline with extract.precision=bf16"
    )
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    config = base_size_demo(args.workdir, f"extract.batch_size={args.batch_size}")
    manifest = load_or_prepare(config.data).sample(n=args.utterances, random_state=0)
    audio_s = manifest["duration_s"].sum()
    torch.set_num_threads(threads)
    print(
        f"{len(manifest)} utterances, {audio_s:.0f} s of audio, HuBERT base size, layer -3, {threads} threads"
    )

    import ray

    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    pipeline_s = {}
    for precision in ["fp32", "bf16"] if args.bf16 else ["fp32"]:
        with tempfile.TemporaryDirectory() as cache:
            run = config.model_copy(
                update={"extract": config.extract.model_copy(update={"precision": precision})}
            )
            store, _ = extract_features(run, manifest, ArtifactCache(cache))
            pipeline_s[precision] = store.artifact.meta["seconds"]
            actors = store.artifact.meta["actors"]
    ray.shutdown()
    naive_s = naive_loop(config, manifest)
    ceiling_s = process_ceiling(config, manifest, threads)

    print(f"naive loop            {naive_s:7.1f} s  {audio_s / naive_s:6.2f} audio s/s  ({threads} threads)")
    print(
        f"{threads} processes, no Ray {ceiling_s:7.1f} s  {audio_s / ceiling_s:6.2f} audio s/s  "
        f"(1 thread each, start-up included)  ratio {naive_s / ceiling_s:.2f}x"
    )
    for precision, seconds in pipeline_s.items():
        print(
            f"Ray pipeline ({precision})   {seconds:7.1f} s  {audio_s / seconds:6.2f} audio s/s  "
            f"({actors} actors, batch {args.batch_size})  ratio {naive_s / seconds:.2f}x"
        )


if __name__ == "__main__":
    main()
