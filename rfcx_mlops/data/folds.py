"""Cross-validation folds: stratified by species, grouped by recording, numbered 1..n_splits."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from rfcx_mlops.errors import ConfigError


def assign_folds(events: pd.DataFrame, n_splits: int, seed: int) -> pd.Series:
    """The validation fold (1..n_splits) of every event row.

    Rows of one recording always share a fold, so no recording is on both sides
    of a split (folds of rows, as StratifiedKFold makes, would leak a recording's calls into validation).
    """
    n_groups = events["recording_id"].nunique()
    if n_groups < n_splits:
        raise ConfigError(f"folds.n_splits={n_splits} needs at least {n_splits} recordings; the data has {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = pd.Series(0, index=events.index, name="fold")
    try:
        with warnings.catch_warnings():
            # A species with fewer calls than folds is expected (a rare species): it is validated in fewer folds.
            warnings.filterwarnings("ignore", "The least populated class in y", UserWarning)
            for k, (_, val_idx) in enumerate(
                splitter.split(events, events["species_id"], groups=events["recording_id"]), start=1
            ):
                fold.iloc[val_idx] = k
    except ValueError as exc:  # e.g. no species has n_splits calls
        raise ConfigError(f"cannot make {n_splits} stratified folds of this data: {exc}") from None
    return fold


def by_fold(events: pd.DataFrame, assigned: pd.Series, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of ``fold`` under ``assigned`` (``assign_folds``' result)."""
    return events[assigned != fold].reset_index(drop=True), events[assigned == fold].reset_index(drop=True)


def write_csv(events: pd.DataFrame, assigned: pd.Series, path: str | Path) -> Path:
    """folds.csv: one line per event with its recording, species, call times and fold (``assign_folds``)."""
    table = events[["recording_id", "species_id", "t_min", "t_max"]].copy()
    table["fold"] = assigned
    table.to_csv(path, index=False)
    return Path(path)
