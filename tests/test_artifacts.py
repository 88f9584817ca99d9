"""The artifact cache: atomic builds, corrupt artifacts rebuilt, checksums recorded where the files were
written and verified in full on demand, one build for concurrent claimants, another fingerprint's artifact
refused."""

from __future__ import annotations

import multiprocessing
import shutil
import time
from pathlib import Path

import pytest

from gmpatl_ray.artifacts import (
    MARKER,
    ArtifactCache,
    ArtifactMismatch,
    Contents,
    file_records,
    file_sha256,
    fingerprint,
)
from gmpatl_ray.cli import main


def write_two_files(folder: Path) -> dict:
    (folder / "a.bin").write_bytes(b"x" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("hello")
    return {"note": "built"}


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint("x")) == 16


def test_build_then_reuse(tmp_path):
    cache = ArtifactCache(tmp_path)
    artifact, built = cache.get_or_build("kind", "k1", write_two_files)
    assert built and artifact.meta == {"note": "built"} and (artifact.path / MARKER).is_file()
    assert (artifact.path / "sub" / "b.txt").read_text() == "hello"
    again, built = cache.get_or_build("kind", "k1", lambda folder: pytest.fail("must not rebuild"))
    assert not built and again == artifact
    assert [p.name for p in (tmp_path / "kind").iterdir() if p.is_dir()] == ["k1"]  # no temp folders left


def test_a_crashed_build_leaves_nothing_that_is_trusted(tmp_path):
    cache = ArtifactCache(tmp_path)

    def crash(folder: Path) -> dict:
        (folder / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        cache.get_or_build("kind", "k1", crash)
    assert cache.load("kind", "k1") is None
    assert not any(p.is_dir() for p in (tmp_path / "kind").iterdir())
    _, built = cache.get_or_build("kind", "k1", write_two_files)
    assert built


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["truncate", "delete", "marker"])
def test_damaged_artifacts_are_rebuilt(tmp_path, damage):
    cache = ArtifactCache(tmp_path)
    artifact, _ = cache.get_or_build("kind", "k1", write_two_files)
    target = artifact.path / "a.bin"
    if damage == "truncate":
        target.write_bytes(b"x" * 500)
    elif damage == "delete":
        target.unlink()
    else:
        (artifact.path / MARKER).write_text("{not json")
    assert cache.load("kind", "k1") is None
    rebuilt, built = cache.get_or_build("kind", "k1", write_two_files)
    assert built and (rebuilt.path / "a.bin").read_bytes() == b"x" * 1000


@pytest.mark.faults
def test_an_altered_file_of_the_same_size_is_found_by_a_full_verification(tmp_path, capsys):
    """Routine loads check the marker and sizes (reading every byte back on every load is what kept the
    head busy); ``verify=True`` and ``gmpatl verify-cache`` recompute the checksums and find it."""
    cache = ArtifactCache(tmp_path / "cache")
    artifact, _ = cache.get_or_build("kind", "k1", write_two_files)
    cache.get_or_build("kind", "k2", write_two_files)
    (artifact.path / "a.bin").write_bytes(b"y" + b"x" * 999)  # same size, other content
    assert cache.load("kind", "k1") is not None
    assert cache.load("kind", "k1", verify=True) is None
    checked, damaged = cache.verify()
    assert checked == 2 and list(damaged) == [artifact.path]
    assert damaged[artifact.path] == [
        f"{artifact.path / 'a.bin'}: its SHA-256 is not the one the marker recorded"
    ]

    assert main(["verify-cache", "--set", f"experiment.cache_dir={tmp_path / 'cache'}"]) == 1
    assert "2 artifact(s) checked in full, 1 damaged" in capsys.readouterr().out
    assert (
        main(["verify-cache", "--set", f"experiment.cache_dir={tmp_path / 'cache'}", "--remove-damaged"]) == 1
    )
    assert not artifact.path.exists() and cache.load("kind", "k2") is not None
    assert main(["verify-cache", "--set", f"experiment.cache_dir={tmp_path / 'cache'}"]) == 0
    rebuilt, built = cache.get_or_build("kind", "k1", write_two_files)
    assert built and (rebuilt.path / "a.bin").read_bytes() == b"x" * 1000


def test_checksums_made_where_the_files_were_written_are_kept_and_checked_against_the_folder(tmp_path):
    cache = ArtifactCache(tmp_path)

    def checksummed(folder: Path) -> Contents:
        meta = write_two_files(folder)
        return Contents(meta, file_records(folder))

    artifact, _ = cache.get_or_build("kind", "k1", checksummed)
    assert cache.load("kind", "k1", verify=True) == artifact
    assert cache.verify() == (1, {})

    def incomplete_list(folder: Path) -> Contents:
        records = checksummed(folder)
        (folder / "late.bin").write_bytes(b"written after the checksums")
        return records

    with pytest.raises(RuntimeError, match="the builder's file list does not match the folder"):
        cache.get_or_build("kind", "k2", incomplete_list)
    assert cache.load("kind", "k2") is None
    assert file_sha256(artifact.path / "a.bin") == file_records(artifact.path)["a.bin"]["sha256"]


def _slow_builder(root: str, log: str) -> None:
    def build(folder: Path) -> dict:
        with open(log, "a") as f:
            f.write("build\n")
        time.sleep(1.0)
        return write_two_files(folder)

    ArtifactCache(root).get_or_build("kind", "shared", build)


@pytest.mark.faults
def test_concurrent_claimants_build_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_slow_builder, args=(str(tmp_path / "cache"), str(log))) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text() == "build\n"
    assert ArtifactCache(tmp_path / "cache").load("kind", "shared") is not None


def test_another_fingerprints_artifact_is_refused(tmp_path):
    cache = ArtifactCache(tmp_path)
    artifact, _ = cache.get_or_build("gmps", "aaaa", write_two_files)
    shutil.copytree(artifact.path, tmp_path / "gmps" / "bbbb")  # a store copied in from another config
    message = rf"{tmp_path / 'gmps' / 'bbbb'}: holds the gmps built for fingerprint aaaa, not gmps bbbb"
    with pytest.raises(ArtifactMismatch, match=message):
        cache.get_or_build("gmps", "bbbb", lambda folder: pytest.fail("must not build over it"))
