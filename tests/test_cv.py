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


def test_a_validation_share_that_rounds_to_nothing_is_an_error():
    """4 utterances per emotion x 0.1 rounds to 0: no epoch could be picked (stage 1's first validation
    pass crashed on it), so the split says which setting to change instead."""
    small = manifest().groupby(["session", "emotion"]).head(2)
    with pytest.raises(InputError, match=r"train.val_fraction 0.1 of the training utterances per emotion "):
        split_fold(small, 1, 0.1, seed=0)
    assert len(split_fold(small, 1, 0.25, seed=0).val) == 4  # one per emotion


def test_session_validation_holds_out_the_next_whole_session():
    split = split_fold(manifest(), 2, 0.1, seed=0, validation="session")
    assert set(split.test["session"]) == {2}
    assert set(split.val["session"]) == {3} and len(split.val) == 40  # every utterance of session 3
    assert set(split.train["session"]) == {1} and len(split.train) == 40
    last = split_fold(manifest(), 3, 0.1, seed=0, validation="session")  # wraps round to the first
    assert set(last.val["session"]) == {1} and set(last.train["session"]) == {2}
    named = manifest()
    named["fold"] = named["session"].map({1: "x", 2: "y", 3: "z"})  # a fold column wins, in sorted order
    assert set(split_fold(named, "y", 0.1, seed=0, validation="session").val["fold"]) == {"z"}


def test_session_validation_needs_three_sessions():
    two = manifest()
    with pytest.raises(InputError, match=r"train.validation=session .* needs at least 3 .* \[1, 2\]"):
        split_fold(two[two["session"] != 3], 1, 0.1, seed=0, validation="session")


def test_the_config_picks_the_validation():
    from gmpatl_ray.config import ConfigError, load_config
    from gmpatl_ray.cv import fold_split

    session = fold_split(load_config(None, ["train.validation=session"]), manifest(), 1)
    assert set(session.val["session"]) == {2}
    stratified = fold_split(load_config(None, ["train.val_fraction=0.2"]), manifest(), 1)
    assert set(stratified.val["session"]) == {2, 3} and len(stratified.val) == 16
    with pytest.raises(ConfigError, match=r"train.validation: Input should be 'stratified' or 'session'"):
        load_config(None, ["train.validation=speaker"])
