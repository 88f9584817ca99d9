"""`gmpatl predict` (Ray Data: decode tasks, an actor pool of the model) against a naive per-file loop of
the same model, side by side in one run, on the demo corpus.

Both score the same files with the same model folder and the same threads (the naive loop: torch threads
= cores, one file at a time: load, resample, forward; the pipeline: its defaults, one single-threaded
actor per core). Times include loading the model (and, for the pipeline, starting the actors); a local
Ray cluster is started first and not counted. The model is a randomly initialised stage-3 model of the
demo's HuBERT size (``--size demo``) or of HuBERT base's (``--size base``): the same compute as a trained
one.

    .venv/bin/python benchmarks/predict.py [--size demo|base] [--files 320] [--serve]

``--batching`` compares, on one CPU thread, the first 48 files scored in one call (forward passes
batched up to ``train.eval_batch_s``) against one call per file: why CPU actors score files one by one.
``--serve`` times the same model served instead (``mlflow models serve --env-manager local`` on
127.0.0.1): one 3-s WAV posted as base64, a first request and 10 more.

On a GPU cluster, the pipeline puts one actor on each GPU (``predict.device: auto`` or ``cuda``) and the
decode tasks on the CPUs; set ``predict.actors`` to use fewer GPUs.
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

from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.data.audio import load_audio  # noqa: E402
from gmpatl_ray.data.prepare import load_or_prepare  # noqa: E402
from gmpatl_ray.inference import EmotionPredictor, save_model_folder  # noqa: E402
from gmpatl_ray.models.backbone import load_backbone  # noqa: E402
from gmpatl_ray.predict import predict_files  # noqa: E402
from gmpatl_ray.stages.stage3 import Stage3Model  # noqa: E402
from gmpatl_ray.training import save_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = (
    "backbone.random_init={hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, "
    "intermediate_size: 3072, conv_dim: 512}"
)


def naive_loop(folder: Path, paths: list[str]) -> tuple[float, list[int]]:
    """Seconds for the plain loop (model loading included) and its predicted classes."""
    start = time.perf_counter()
    model = EmotionPredictor.from_model_folder(folder)
    labels = [int(model.probabilities([load_audio(path, model.sample_rate)])[0].argmax()) for path in paths]
    return time.perf_counter() - start, labels


def served_answer_times(folder: Path, requests: int = 11) -> tuple[float, list[float]]:
    """Seconds until the served model answers /ping, and each request's answer time for one 3-s file."""
    import json
    import signal
    import subprocess
    import urllib.request

    import numpy as np

    from gmpatl_ray.inference import example_wave, wav_base64

    bin_dir = Path(sys.executable).parent
    port = "5099"
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", str(folder), "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", port],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        cwd=folder.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        start = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the model server exited") from None
                time.sleep(0.2)
        up = time.perf_counter() - start
        wave = example_wave(16000, 3.0) + 0.02 * np.random.default_rng(0).standard_normal(48000)
        request = {"dataframe_split": {"columns": ["audio"], "data": [[wav_base64(wave, 16000)]]}}
        body, times = json.dumps(request).encode(), []
        for _ in range(requests):
            post = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            started = time.perf_counter()
            urllib.request.urlopen(post, timeout=120).read()
            times.append(time.perf_counter() - started)
        return up, times
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["demo", "base"], default="demo")
    parser.add_argument("--files", type=int, default=320)
    parser.add_argument("--serve", action="store_true", help="time the served model instead")
    parser.add_argument("--batching", action="store_true", help="batched vs one by one on one CPU thread")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    with tempfile.TemporaryDirectory() as tmp:
        here = Path(tmp)
        overrides = [f"experiment.output_dir={here}", *([BASE] if args.size == "base" else [])]
        config = load_config(REPO / "configs" / "demo.yaml", overrides)
        manifest = load_or_prepare(config.data)
        paths = manifest["path"].tolist()[: args.files]
        audio_s = manifest["duration_s"].iloc[: args.files].sum()
        torch.manual_seed(0)
        save_model(Stage3Model(load_backbone(config.backbone), config), here / "weights")
        folder = save_model_folder(here / "model", here / "weights", config)
        if args.batching:
            model = EmotionPredictor.from_model_folder(folder)
            waves = [load_audio(path, model.sample_rate) for path in paths[:48]]
            torch.set_num_threads(1)
            start = time.perf_counter()
            model.probabilities(waves)
            batched = time.perf_counter() - start
            start = time.perf_counter()
            for wave in waves:
                model.probabilities([wave])
            alone = time.perf_counter() - start
            print(
                f"{len(waves)} files, {args.size} size model, 1 thread: one call {batched:.1f} s, "
                f"one call per file {alone:.1f} s, ratio {batched / alone:.2f}x"
            )
            return
        if args.serve:
            up, times = served_answer_times(folder)
            rest = [round(t * 1000) for t in sorted(times[1:])]
            print(
                f"{args.size} size model served (up in {up:.1f} s), one 3-s file: "
                f"first {times[0] * 1000:.0f} ms, then min {rest[0]} / median {rest[len(rest) // 2]} / "
                f"max {rest[-1]} ms over {len(rest)} requests"
            )
            return

        import ray

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        naive_s, naive_labels = naive_loop(folder, paths)
        start = time.perf_counter()
        predictions = predict_files(paths, [folder], config.predict)
        pipeline_s = time.perf_counter() - start
        ray.shutdown()

    emotions = config.data.emotions
    agree = (predictions.table["emotion"] == [emotions[i] for i in naive_labels]).mean()
    print(f"{len(paths)} files, {audio_s:.0f} s of audio, {args.size} size model, {cores} cores")
    print(f"naive per-file loop  {naive_s:6.1f} s  {len(paths) / naive_s:6.1f} files/s  ({cores} threads)")
    print(
        f"gmpatl predict       {pipeline_s:6.1f} s  {len(paths) / pipeline_s:6.1f} files/s  "
        f"throughput ratio {naive_s / pipeline_s:.2f}x  (labels agree on {agree:.0%} of files)"
    )


if __name__ == "__main__":
    main()
