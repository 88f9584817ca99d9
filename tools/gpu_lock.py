"""The GPU nodes' lock, ``constraints-gpu.txt``: the project with its ``gpu`` extra (RAPIDS cuML for
CUDA 13) resolved by pip against the CPU lock (``constraints.txt``), so the two share every version but the
GPU-only packages, and the suite's CPU runs test the versions the GPU nodes run. The node image
(``Dockerfile``) installs it with ``pip install -r constraints-gpu.txt``.

pip resolves for the interpreter it runs under, Python 3.11 on x86-64 Linux, the image's. Dry runs read
package metadata only (nothing is installed or downloaded in full), so this runs on a CPU machine:

    python tools/gpu_lock.py --write   # re-pin after a dependency change (make lock-gpu)
    python tools/gpu_lock.py           # check: the image's install line resolves to exactly the lock
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_LOCK = REPO / "constraints.txt"
GPU_LOCK = REPO / "constraints-gpu.txt"
PROJECT = "gmpatl-ray"
HEADER = """\
# The GPU nodes' lock: `pip install -r constraints-gpu.txt` (the Dockerfile does), then the project with
# --no-deps. Made by `make lock-gpu` (tools/gpu_lock.py) from pyproject.toml's gpu extra and constraints.txt,
# whose versions it shares; Python 3.11, x86-64 Linux. torch 2.14.1 is a CUDA 13 build: NVIDIA driver >= 580.
"""


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolve(*pip_args: str) -> dict[str, str]:
    """What ``pip install`` would install into an empty environment: {name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
            + ["--report", str(report), *pip_args],
            check=True,
            cwd=REPO,
        )
        installs = json.loads(report.read_text())["install"]
    found = {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    found.pop(PROJECT, None)
    return found


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def write_lock(pins: dict[str, str]) -> None:
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    GPU_LOCK.write_text(HEADER + "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="resolve the gpu extra and write the lock")
    args = parser.parse_args()
    if args.write:
        write_lock(resolve("-c", str(CPU_LOCK), ".[gpu]"))
        print(f"wrote {GPU_LOCK}")
        return 0
    locked = read_lock(GPU_LOCK)
    resolved = resolve("-r", str(GPU_LOCK))
    if resolved != locked:
        differ = sorted(set(resolved.items()) ^ set(locked.items()))
        print(f"{GPU_LOCK}: pip resolves something else: {differ}", file=sys.stderr)
        return 1
    print(f"{GPU_LOCK}: {len(locked)} pins resolve as they are")
    return 0


if __name__ == "__main__":
    sys.exit(main())
