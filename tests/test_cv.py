"""Leave-one-session-out splits: no test audio in training or validation, stratified validation, errors."""

import pandas as pd
import pytest

from gmpatl_ray.cv import split_fold
from gmpatl_ray.errors import InputError


def manifest(with_fold: bool = False) -> pd.DataFrame:
    rows = [
        {"utt_id": f"s{s}_{e}_{i}", "session": s, "emotion": e, "gender": "FM"[i % 2]}
        for s in (1, 2, 3)
        for e in ("ang", "hap", "neu", "sad")
        for i in range(10)
    ]
    table = pd.DataFrame(rows)
    if with_fold:
        table["fold"] = table["session"].map({1: "a", 2: "a", 3: "b"})
    return table


def test_leave_one_session_out():
    split = split_fold(manifest(), 2, val_fraction=0.1, seed=0)
    assert set(split.test["session"]) == {2} and len(split.test) == 40
    assert set(split.train["session"]) | set(split.val["session"]) == {1, 3}
    assert set(split.train["utt_id"]).isdisjoint(split.val["utt_id"])
    assert len(split.train) + len(split.val) == 80
    assert split.val["emotion"].value_counts().to_dict() == {"ang": 2, "hap": 2, "neu": 2, "sad": 2}


def test_validation_is_seeded():
    first = split_fold(manifest(), 1, 0.2, seed=0).val["utt_id"].tolist()
    assert first == split_fold(manifest(), 1, 0.2, seed=0).val["utt_id"].tolist()
    assert first != split_fold(manifest(), 1, 0.2, seed=1).val["utt_id"].tolist()


def test_fold_column_wins():
    split = split_fold(manifest(with_fold=True), "b", 0.1, seed=0)
    assert set(split.test["session"]) == {3} and set(split.train["session"]) == {1, 2}


def test_a_fold_with_no_test_utterances():
    with pytest.raises(
        InputError, match=r"fold 6 has no test utterances: the manifest's session values are \[1, 2, 3\]"
    ):
        split_fold(manifest(), 6, 0.1, seed=0)
    only = manifest()
    with pytest.raises(InputError, match="leaves no training utterances"):
        split_fold(only[only["session"] == 1], 1, 0.1, seed=0)
