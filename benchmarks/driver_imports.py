"""What a driver pays to import the pipeline, against what it paid while the pipeline imported model code.

A driver (`gmpatl`, a Ray job entrypoint, a Tune trial) imports ``gmpatl_ray.pipeline`` and
``gmpatl_ray.sweep`` and builds no model; only the Ray Train workers and Ray Data actors need transformers'
model classes and (until 8b27178) scikit-learn. Each run is a fresh interpreter, the two variants
alternating so a drift of the machine's speed hits both alike: the driver's imports as they are, and the
same followed by the model code the driver used to import with them (the four families' model classes,
the span-mask helper's module, ``sklearn.metrics``).

    .venv/bin/python benchmarks/driver_imports.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRIVER = "import gmpatl_ray.pipeline, gmpatl_ray.sweep"
MODEL_CODE = (
    "from transformers import HubertModel, WavLMModel, Wav2Vec2Model, Data2VecAudioModel\n"
    "import transformers.models.wav2vec2.modeling_wav2vec2, sklearn.metrics"
)
VARIANTS = {"driver imports (now)": DRIVER, "with the model code (before)": f"{DRIVER}\n{MODEL_CODE}"}


def seconds(code: str) -> float:
    timed = f"import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", timed], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seconds(DRIVER)  # warm the file cache and the bytecode
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, code in VARIANTS.items():
            runs[name].append(seconds(code))
    for name, times in runs.items():
        listed = ", ".join(f"{t:.2f}" for t in times)
        print(f"{name:<30} median {statistics.median(times):5.2f} s  (runs: {listed})")
    now, before = (statistics.median(times) for times in runs.values())
    print(f"before / now: {before / now:.2f}x")


if __name__ == "__main__":
    main()
