"""Installing the lock into a fresh venv: uv (what `make` runs) against pip; do both install the same?

Both install ``-c constraints.txt -e '.[test,launch]'`` into a new venv of their own, pip first, then uv
with the Makefile's own line (the `make` target with ``VENV`` pointed at the new folder). Each time includes
creating the venv and upgrading pip (and, for uv, installing uv). Then every distribution of the two venvs
is compared by its dist-info: name, version and the wheel tags it was installed from (a pure-Python wheel
where pip took a binary one, say, would show here). Each venv takes about 7 GB while it exists; both are
removed at the end.

    .venv/bin/python benchmarks/install.py [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = shutil.which("python3.11") or sys.executable


def pip_install(venv: Path) -> None:
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-c", "constraints.txt", "-e", ".[test,launch]"], cwd=REPO, check=True)


def make_install(venv: Path) -> None:
    stamp = venv / ".installed"
    subprocess.run(["make", "--no-print-directory", f"VENV={venv}", str(stamp)], cwd=REPO, check=True)


def installed(venv: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every distribution in ``venv``: its version and the wheel tags it was installed from."""
    found = {}
    for info in (venv / "lib").glob("python3*/site-packages/*.dist-info"):
        name, version = info.name.removesuffix(".dist-info").rsplit("-", 1)
        wheel = info / "WHEEL"
        lines = wheel.read_text().splitlines() if wheel.is_file() else []
        tags = tuple(sorted(line.split(":", 1)[1].strip() for line in lines if line.startswith("Tag:")))
        found[name.lower().replace("_", "-")] = (version, tags)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the two venvs (printed)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="install-bench-"))
    venvs = {"pip": folder / "pip", "uv (make)": folder / "uv"}
    seconds = {}
    try:
        for (name, venv), install in zip(venvs.items(), (pip_install, make_install), strict=True):
            started = time.perf_counter()
            install(venv)
            seconds[name] = time.perf_counter() - started
            print(f"{name:<10} {seconds[name]:6.1f} s  {venv}", flush=True)
        print(f"uv / pip: {seconds['uv (make)'] / seconds['pip']:.2f}x the time")
        pip, uv = (installed(venv) for venv in venvs.values())
        differ = {n: (pip.get(n), uv.get(n)) for n in sorted((pip.keys() | uv.keys()) - {"uv"})}
        differ = {n: pair for n, pair in differ.items() if pair[0] != pair[1]}
        print(f"{len(pip)} distributions from pip, {len(uv)} from uv (uv itself among them)")
        for name, (from_pip, from_uv) in differ.items():
            print(f"  differs: {name}: pip {from_pip}, uv {from_uv}")
        print("same versions and wheel tags" if not differ else f"{len(differ)} differ")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
