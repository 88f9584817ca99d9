"""Memory at scale: extraction and multi-scale k-means on the demo corpus and on one 10x its size, side by
side in one run, with the peak resident memory of the driver and of every Ray worker, and Ray's object
spilling.

Extraction streams (Ray Data: decode tasks -> HuBERT actors -> Parquet, in bounded blocks) and k-means
fits on a sample of at most ``gmp.max_frames`` frames, then labels every frame in streamed batches, so
peaks should stay flat while the corpus grows 10x. Both corpora use the demo config (its HuBERT, its
layer and scales); the 10x corpus has ten times the utterances per speaker and emotion.

    .venv/bin/python benchmarks/memory.py [--scale 10] [--max-frames 200000]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.artifacts import ArtifactCache  # noqa: E402
from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.data.prepare import load_or_prepare  # noqa: E402
from gmpatl_ray.features import extract_features  # noqa: E402
from gmpatl_ray.gmp import build_gmps_on_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
RAY_SERVICES = (
    "raylet",
    "gcs_server",
    "dashboard",
    "log_monitor",
    "monitor.py",
    "DashboardAgent",
    "RuntimeEnvAgent",
    "runtime_env",
    "forkserver",
)


class PeakMemory:
    """Samples the resident memory of this process and of every Ray worker under it (every 0.2 s) and
    keeps each one's peak; Ray's own services (raylet, GCS, dashboard) are left out."""

    def __init__(self):
        self.driver = 0
        self.workers: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for proc in me.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                if title.startswith("ray::") and not any(s in title for s in RAY_SERVICES):
                    name = title.split()[0]
                    old = self.workers.get(proc.pid, (name, 0))[1]
                    self.workers[proc.pid] = (name, max(old, rss))
            time.sleep(0.2)


def spilled_mib() -> float:
    """MiB that Ray has spilled from the object store to disk so far (0 when it never spilled)."""
    from ray._private.internal_api import memory_summary

    found = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else 0.0


def measure(config, scale: int, workdir: Path) -> dict:
    data = config.data.model_copy(
        update={
            "root": str(workdir / f"x{scale}" / "IEMOCAP_demo"),
            "manifest": str(workdir / f"x{scale}" / "manifest.csv"),
            "demo": config.data.demo.model_copy(
                update={"utterances_per_emotion": config.data.demo.utterances_per_emotion * scale}
            ),
        }
    )
    manifest = load_or_prepare(data)
    layer = config.gmp.layer
    run = config.model_copy(update={"extract": config.extract.model_copy(update={"layers": [layer]})})
    with tempfile.TemporaryDirectory(dir=workdir) as cache_dir, PeakMemory() as peaks:
        cache = ArtifactCache(cache_dir)
        start = time.perf_counter()
        features, _ = extract_features(run, manifest, cache)
        extract_s = time.perf_counter() - start
        store, _ = build_gmps_on_cluster(features, layer, config.gmp, config.experiment.seed, None, cache)
        frames = int(features.index()["frames"].sum())
        feature_mib = sum(p.stat().st_size for p in features.path.rglob("*") if p.is_file()) / MIB
        sampled = store.meta["sampled_frames"]
    by_kind: dict[str, int] = {}
    for name, rss in peaks.workers.values():
        by_kind[name] = max(by_kind.get(name, 0), rss)
    return {
        "scale": scale,
        "utterances": len(manifest),
        "audio_h": manifest["duration_s"].sum() / 3600,
        "frames": frames,
        "feature_mib": feature_mib,
        "sampled": sampled,
        "extract_s": extract_s,
        "driver_mib": peaks.driver / MIB,
        "workers": len(peaks.workers),
        "worker_mib": max((rss for _, rss in peaks.workers.values()), default=0) / MIB,
        "by_kind": {k: v / MIB for k, v in sorted(by_kind.items())},
        "spilled_mib": spilled_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--max-frames", type=int, default=200_000, help="gmp.max_frames (the k-means sample)")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks" / "memory"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = load_config(REPO / "configs" / "demo.yaml", [f"gmp.max_frames={args.max_frames}"])

    import ray

    ray.init(num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = [measure(config, scale, workdir) for scale in (1, args.scale)]
    ray.shutdown()

    print(
        f"demo HuBERT, layer {config.gmp.layer}, scales {config.gmp.scales}, gmp.max_frames {args.max_frames}"
    )
    print(
        "| corpus | utterances | audio (h) | frames | features (MiB) | k-means sample | extraction (s) "
        "| driver peak (MiB) | worker peak (MiB) | Ray workers | spilled (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scale']}x | {r['utterances']} | {r['audio_h']:.2f} | {r['frames']} "
            f"| {r['feature_mib']:.0f} | {r['sampled']} | {r['extract_s']:.0f} | {r['driver_mib']:.0f} "
            f"| {r['worker_mib']:.0f} "
            f"| {r['workers']} | {r['spilled_mib']:.0f} |"
        )
    small, large = rows
    print(
        f"\n{large['scale']}x / 1x: frames {large['frames'] / small['frames']:.1f}x, "
        f"driver peak {large['driver_mib'] / small['driver_mib']:.2f}x, "
        f"worker peak {large['worker_mib'] / small['worker_mib']:.2f}x"
    )
    for r in rows:
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in r["by_kind"].items())
        print(f"{r['scale']}x peak RSS by worker kind (MiB): {kinds}")


if __name__ == "__main__":
    main()
