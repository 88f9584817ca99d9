"""Bring-your-own corpus: a user's CSV becomes a checked manifest; folds; every problem at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from gmpatl_ray.cli import main
from gmpatl_ray.data.manifest import COLUMNS, ManifestError, fold_column, folds, read_manifest

EMOTIONS = ["ang", "hap", "neu", "sad"]


def write_wavs(folder: Path, names: list[str], seconds: float = 0.5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        sf.write(folder / name, np.ones(int(16000 * seconds), dtype=np.int16), 16000)


@pytest.fixture
def corpus(tmp_path) -> Path:
    write_wavs(tmp_path / "audio", [f"u{i}.wav" for i in range(6)])
    rows = [
        f"u{i},audio/u{i}.wav,{e},{g},{s}"
        for i, (e, g, s) in enumerate(
            [
                ("ang", "F", "A"),
                ("hap", "M", "A"),
                ("neu", "F", "B"),
                ("sad", "M", "B"),
                ("neu", "F", "C"),
                ("ang", "M", "C"),
            ]
        )
    ]
    (tmp_path / "mine.csv").write_text("utt_id,path,emotion,gender,session\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_own_csv_is_completed(corpus, capsys):
    out = corpus / "out" / "manifest.csv"
    assert main(["prepare", "manifest", "--csv", str(corpus / "mine.csv"), "--out", str(out)]) == 0
    assert "manifest manifest" in capsys.readouterr().out
    manifest = read_manifest(out, EMOTIONS)
    assert list(manifest.columns) == list(COLUMNS)
    assert manifest["duration_s"].tolist() == [0.5] * 6
    assert manifest["speaker"].tolist() == ["AF", "AM", "BF", "BM", "CF", "CM"]
    assert Path(manifest["path"][0]) == corpus / "audio" / "u0.wav"  # relative to the CSV's folder
    assert fold_column(manifest) == "session" and folds(manifest) == ["A", "B", "C"]


def test_fold_column_wins_over_session(corpus):
    table = pd.read_csv(corpus / "mine.csv")
    table["fold"] = [1, 1, 2, 2, 3, 3]
    table.drop(columns="session").to_csv(corpus / "folds.csv", index=False)
    out = corpus / "manifest.parquet"
    assert main(["prepare", "manifest", "--csv", str(corpus / "folds.csv"), "--out", str(out)]) == 0
    manifest = read_manifest(out, EMOTIONS)
    assert fold_column(manifest) == "fold" and folds(manifest) == [1, 2, 3]
    assert manifest["session"].tolist() == [1, 1, 2, 2, 3, 3]  # a missing session defaults to the fold


def test_every_problem_is_reported(corpus, capsys):
    text = (corpus / "mine.csv").read_text()
    text += "u1,audio/u1.wav,hap,M,A\n"  # duplicate id
    text += "u7,audio/u7.wav,neu,F,A\n"  # missing file
    text += "u8,audio/u0.wav,joy,F,A\n"  # unknown label
    text += "u9,audio/u0.wav,neu,X,A\n"  # bad gender
    (corpus / "bad.csv").write_text(text)
    out = corpus / "m.csv"
    assert main(["prepare", "manifest", "--csv", str(corpus / "bad.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert not out.exists()
    assert f"{corpus / 'audio' / 'u7.wav'}: file not found" in err
    assert "duplicate utt_id 'u1' on lines 3, 8" in err
    assert "unknown emotion 'joy'" in err and "gender 'X', expected F or M" in err

    assert (
        main(
            ["prepare", "manifest", "--csv", str(corpus / "bad.csv"), "--out", str(out), "--on-error", "skip"]
        )
        == 0
    )
    assert sorted(pd.read_csv(out)["utt_id"]) == ["u0", "u2", "u3", "u4", "u5"]
    skipped = (corpus / "m.skipped.txt").read_text().splitlines()
    assert len(skipped) == 4 and skipped[0] == f"{corpus / 'audio' / 'u7.wav'}: file not found"


def test_missing_columns_fail_even_when_skipping(corpus, capsys):
    (corpus / "few.csv").write_text("utt_id,path\nu0,audio/u0.wav\n")
    assert (
        main(
            [
                "prepare",
                "manifest",
                "--csv",
                str(corpus / "few.csv"),
                "--out",
                str(corpus / "m.csv"),
                "--on-error",
                "skip",
            ]
        )
        == 2
    )
    assert "missing column(s) gender, emotion, session or fold" in capsys.readouterr().err


def test_read_manifest_checks_columns_and_files(corpus):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(corpus / "nope.csv", EMOTIONS)
    (corpus / "partial.csv").write_text("utt_id,path,emotion\nu0,audio/u0.wav,ang\n")
    with pytest.raises(ManifestError, match="missing column\\(s\\) session, speaker, gender, duration_s"):
        read_manifest(corpus / "partial.csv", EMOTIONS)
    out = corpus / "ok.csv"
    main(["prepare", "manifest", "--csv", str(corpus / "mine.csv"), "--out", str(out)])
    (corpus / "audio" / "u3.wav").unlink()
    with pytest.raises(ManifestError, match=f"{corpus / 'audio' / 'u3.wav'}: file not found"):
        read_manifest(out, EMOTIONS)


def test_audio_shorter_than_one_hubert_frame(corpus, capsys):
    sf.write(corpus / "audio" / "tiny.wav", np.ones(200, dtype=np.int16), 16000)  # 12.5 ms
    text = (corpus / "mine.csv").read_text() + "u9,audio/tiny.wav,neu,F,C\n"
    (corpus / "short.csv").write_text(text)
    assert (
        main(["prepare", "manifest", "--csv", str(corpus / "short.csv"), "--out", str(corpus / "m.csv")]) == 2
    )
    assert "duration_s 0.0125 is shorter than one HuBERT frame (25 ms)" in capsys.readouterr().err


def test_strict_is_only_for_iemocap(corpus, capsys):
    assert (
        main(
            [
                "prepare",
                "manifest",
                "--csv",
                str(corpus / "mine.csv"),
                "--out",
                str(corpus / "m.csv"),
                "--strict",
            ]
        )
        == 2
    )
    assert "--strict compares against the full IEMOCAP release" in capsys.readouterr().err


def test_session_and_fold_values_must_be_safe_names(corpus, capsys):
    """They name report files and MLflow runs and go into MLflow filters: a path or a quote is refused at
    `prepare`, naming its line."""
    table = pd.read_csv(corpus / "mine.csv")
    table["fold"] = ["1", "1", "../up", "../up", "it's", "it's"]
    table.to_csv(corpus / "unsafe.csv", index=False)
    out = corpus / "m.csv"
    assert main(["prepare", "manifest", "--csv", str(corpus / "unsafe.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert not out.exists()
    assert f"{corpus / 'unsafe.csv'}:4: fold '../up' is not a safe name" in err
    assert f'{corpus / "unsafe.csv"}:7: fold "it\'s" is not a safe name' in err
    assert ":2: fold" not in err and ":3: fold" not in err
