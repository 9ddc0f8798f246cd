"""Folds: stratified by species, grouped by recording, numbered from 1, reproducible from the seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rfcx_mlops import config
from rfcx_mlops.data import folds
from rfcx_mlops.errors import ConfigError


@pytest.fixture
def events():
    rng = np.random.default_rng(0)
    rows = []
    for r in range(240):
        species = [r % 24] + ([int(rng.integers(24))] if r % 10 == 0 else [])
        rows += [(f"rec{r}", int(s), float(rng.uniform(0, 50))) for s in species]
    df = pd.DataFrame(rows, columns=["recording_id", "species_id", "t_min"])
    df["t_max"] = df["t_min"] + 2
    return df


def test_no_recording_on_both_sides_and_every_row_once(events):
    assigned = folds.assign_folds(events, 3, 27)
    assert set(assigned) == {1, 2, 3}
    assert (events.assign(fold=assigned).groupby("recording_id")["fold"].nunique() == 1).all()
    sizes = [len(folds.by_fold(events, assigned, k)[1]) for k in (1, 2, 3)]
    assert sum(sizes) == len(events)
    train, val = folds.by_fold(events, folds.assign_folds(events, 3, 27), 2)
    assert not set(train["recording_id"]) & set(val["recording_id"])


def test_stratified_by_species(events):
    assigned = folds.assign_folds(events, 3, 27)
    share = pd.crosstab(events["species_id"], assigned).div(events["species_id"].value_counts(), axis=0)
    assert share.min(axis=None) >= 0.2 and share.max(axis=None) <= 0.5  # about a third of each species per fold


def test_seed_decides_the_split(events):
    a = folds.assign_folds(events, 3, 27)
    assert (a == folds.assign_folds(events, 3, 27)).all()
    assert (a != folds.assign_folds(events, 3, 28)).any()


def test_bad_fold_numbers(events):
    cfg = config.load(None, {"folds.n_splits": 3})
    for bad in (0, 4):
        with pytest.raises(ConfigError, match="fold must be within 1..3"):
            config.check_fold(cfg, bad)
    with pytest.raises(ConfigError, match="needs at least 300 recordings"):
        folds.assign_folds(events, 300, 27)


def test_real_metadata_folds(shared_rfcx):
    tp = pd.read_csv(shared_rfcx / "train_tp.csv")
    assigned = folds.assign_folds(tp, 3, 27)
    assert (tp.assign(fold=assigned).groupby("recording_id")["fold"].nunique() == 1).all()
    assert set(assigned.value_counts()) <= set(range(380, 440))


def test_write_csv(tmp_path, events):
    path = folds.write_csv(events, folds.assign_folds(events, 3, 27), tmp_path / "folds.csv")
    table = pd.read_csv(path)
    assert list(table.columns) == ["recording_id", "species_id", "t_min", "t_max", "fold"]
    assert (table["fold"].to_numpy() == folds.assign_folds(events, 3, 27).to_numpy()).all()
