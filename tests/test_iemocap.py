"""The IEMOCAP recipe against a fake release in the real layout: exact counts, traps, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from fake_iemocap import SESSION_COUNTS, utterance_plan, write_release

from gmpatl_ray.cli import main
from gmpatl_ray.data.iemocap import FULL_RELEASE, parse_emo_evaluation, scan_iemocap
from gmpatl_ray.data.manifest import COLUMNS, read_manifest

EMOTIONS = ["ang", "hap", "neu", "sad"]


@pytest.fixture(scope="module")
def full_release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("iemocap") / "IEMOCAP_full_release", utterance_plan())


@pytest.fixture
def small_release(tmp_path) -> Path:
    plan = utterance_plan({s: {"ang": 3, "hap": 4, "neu": 3, "sad": 2} for s in (1, 2)}, female_total=12)
    return write_release(tmp_path / "IEMOCAP_full_release", plan, dropped_per_session=2)


def test_full_release_counts_exactly(full_release, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    assert main(["prepare", "iemocap", "--root", str(full_release), "--out", str(out), "--strict"]) == 0
    printed = capsys.readouterr().out
    assert "5531 utterances" in printed
    assert "ang 1103  hap 1636  neu 1708  sad 1084" in printed
    assert "F 2649  M 2882" in printed
    assert "1 1085  2 1023  3 1151  4 1031  5 1241" in printed
    assert "dropped  dis 5  fea 5  fru 5  oth 5  sur 5  xxx 5" in printed

    manifest = read_manifest(out, EMOTIONS)
    assert list(manifest.columns) == list(COLUMNS)
    assert len(manifest) == 5531 and manifest["utt_id"].is_unique
    for column, expected in FULL_RELEASE.items():
        assert manifest[column].value_counts().to_dict() == expected
    for session, counts in SESSION_COUNTS.items():
        assert manifest[manifest.session == session]["emotion"].value_counts().to_dict() == counts


def test_gender_comes_from_the_last_token_not_the_dialog(full_release):
    manifest = scan_iemocap(full_release, EMOTIONS, {"exc": "hap"}).manifest.set_index("utt_id")
    male_in_female_dialog = manifest.loc["Ses01F_impro01_M000"]
    assert male_in_female_dialog.gender == "M" and male_in_female_dialog.speaker == "Ses01M"
    assert manifest.loc["Ses01M_impro01_F000"].gender == "F"
    assert (manifest["speaker"] == "Ses0" + manifest["session"].astype(str) + manifest["gender"]).all()


def test_wav_paths_follow_dialog_quirks(full_release):
    manifest = scan_iemocap(full_release, EMOTIONS, {"exc": "hap"}).manifest.set_index("utt_id")
    for utt_id, dialog in [
        ("Ses03M_impro05b_F000", "Ses03M_impro05b"),
        ("Ses01F_script02_2_F000", "Ses01F_script02_2"),
        ("Ses02F_script01_1_M000", "Ses02F_script01_1"),
    ]:
        path = Path(manifest.loc[utt_id].path)
        assert path == full_release / f"Session{utt_id[4]}" / "sentences" / "wav" / dialog / f"{utt_id}.wav"
        assert path.is_file()
    assert not any("X999" in u for u in manifest.index)  # a wav that no label file names


def test_exc_merges_into_hap_and_other_labels_drop(full_release):
    scan = scan_iemocap(full_release, EMOTIONS, {"exc": "hap"})
    assert scan.problems == []
    assert set(scan.manifest["emotion"]) == set(EMOTIONS)
    assert scan.dropped == {label: 5 for label in ("fru", "xxx", "sur", "fea", "dis", "oth")}
    without_merge = scan_iemocap(full_release, EMOTIONS, {})
    assert without_merge.dropped["exc"] > 1000
    assert (without_merge.manifest["emotion"] == "hap").sum() == 1636 - without_merge.dropped["exc"]


def test_rater_lines_header_and_crlf_are_not_utterances(full_release):
    label_file = sorted((full_release / "Session1" / "dialog" / "EmoEvaluation").glob("Ses01F_impro01.txt"))[
        0
    ]
    assert b"\r\n" in label_file.read_bytes()
    entries, problems = parse_emo_evaluation(label_file)
    assert problems == []
    assert all(utt.startswith("Ses01F_impro01_") for utt, _, _ in entries)
    assert len(entries) == label_file.read_text().count("\t[2.5000, 3.0000, 2.5000]")


def test_every_problem_is_listed_at_once_and_nothing_written(small_release, tmp_path, capsys):
    label_file = small_release / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    text = label_file.read_text()
    first_utt = text.split("\t")[1]
    label_file.write_text(
        text + "\n[1.0 - oops]\tSes01F_impro01_F900\tneu\n"
        "\n[9.0000 - 9.5000]\tSes01F_impro01_F901\tjoy\t[2.5000, 2.5000, 2.5000]\n"
        f"\n[1.0000 - 2.0000]\t{first_utt}\tneu\t[2.5000, 2.5000, 2.5000]\n"
    )
    wavs = sorted((small_release / "Session2" / "sentences" / "wav").rglob("*_[FM]000.wav"))[:6]  # labelled
    wavs[0].unlink()  # missing
    wavs[1].write_bytes(b"")  # zero bytes
    wavs[2].write_bytes(b"RIFF\x00\x00garbage" * 8)  # bad header
    wavs[3].write_bytes(wavs[3].read_bytes()[:-300])  # truncated data
    sf.write(wavs[4], np.zeros(400, dtype=np.int16), 16000)  # digital silence
    sf.write(wavs[5], np.full(400, np.inf, dtype=np.float32), 16000, subtype="FLOAT")  # inf samples

    out = tmp_path / "out" / "manifest.csv"
    code = main(["prepare", "iemocap", "--root", str(small_release), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "9 problem(s)" in err
    assert f"{label_file}:" in err and "malformed line" in err
    assert "unknown emotion label 'joy' for Ses01F_impro01_F901" in err
    assert f"{wavs[0]}: file not found" in err
    assert f"{wavs[1]}: empty file (0 bytes)" in err
    assert f"{wavs[2]}: unreadable audio header" in err
    assert f"{wavs[3]}: truncated: the header declares 800 bytes of audio, the file holds 500" in err
    assert f"{wavs[4]}: silent: every sample is 0" in err
    assert f"{wavs[5]}: contains NaN or infinite samples" in err
    assert f"duplicate utterance id {first_utt}" in err


def test_skip_writes_the_rest_and_keeps_the_list(small_release, tmp_path, capsys):
    wav = sorted((small_release / "Session1" / "sentences" / "wav").rglob("*.wav"))[0]
    wav.write_bytes(b"")
    out = tmp_path / "manifest.csv"
    complete = len(scan_iemocap(small_release, EMOTIONS, {"exc": "hap"}).manifest)
    assert (
        main(["prepare", "iemocap", "--root", str(small_release), "--out", str(out), "--on-error", "skip"])
        == 0
    )
    printed = capsys.readouterr().out
    skipped = tmp_path / "manifest.skipped.txt"
    assert f"skipped 1 problem(s), listed in {skipped}" in printed
    lines = skipped.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{wav}: empty file (0 bytes) (labelled at ")
    manifest = pd.read_csv(out)
    assert len(manifest) == complete and wav.stem not in set(manifest["utt_id"])

    wav.unlink()
    sf.write(wav, np.ones(400, dtype=np.int16), 16000)  # fixed: a clean rerun removes the stale list
    assert main(["prepare", "iemocap", "--root", str(small_release), "--out", str(out)]) == 0
    assert not skipped.exists() and len(pd.read_csv(out)) == complete + 1


def test_strict_names_every_count_that_differs(small_release, tmp_path, capsys):
    code = main(
        ["prepare", "iemocap", "--root", str(small_release), "--out", str(tmp_path / "m.csv"), "--strict"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "emotion ang: 6 utterances, the full release has 1103" in err
    assert "session 5: 0 utterances, the full release has 1241" in err


def test_a_folder_that_is_not_a_release(tmp_path, capsys):
    code = main(
        [
            "prepare",
            "iemocap",
            "--root",
            str(tmp_path),
            "--out",
            str(tmp_path / "m.csv"),
            "--on-error",
            "skip",
        ]
    )
    assert code == 2
    assert "no Session1..Session5 folders: not an IEMOCAP release root" in capsys.readouterr().err


def test_a_wav_shorter_than_one_frame_is_a_problem(small_release):
    wav = sorted((small_release / "Session1" / "sentences" / "wav").rglob("*_F000.wav"))[0]
    sf.write(wav, np.ones(100, dtype=np.int16), 16000)
    problems = scan_iemocap(small_release, EMOTIONS, {"exc": "hap"}).problems
    assert [str(p) for p in problems] == [f"{wav}: shorter than one HuBERT frame (25 ms)"]
