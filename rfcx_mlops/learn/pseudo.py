"""Pseudo-labels: a teacher model's window scores on the training recordings, as training windows for a student.

A training recording holds several calls and its rows label one or two.  The teacher scores windows
all along it; where a species scores at least its threshold the window is labelled with it (1, or the
score itself with ``pseudo.mode: soft``), and below ``pseudo.negatives`` known absent.  What the rows
say wins: a species with a train_tp call in the window stays 1 and one with a train_fp row stays 0,
whatever the teacher says, so only what nobody labelled is pseudo-labelled.  A window enters the
student's training only where the teacher adds a present species (positives only).  ``balanced``
caps each species' labels in proportion to its labelled calls: a teacher that never heard a window
without a call names some species in every one, most often those that sound like the background.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfcx_mlops.config import PseudoConfig
from rfcx_mlops.learn.batches import Samples, window_labels

COLUMNS = ["recording_id", "start", "species_id", "score", "target"]  # one row per window and species


def table(ids: np.ndarray, starts: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
          known: np.ndarray, cfg: PseudoConfig) -> pd.DataFrame:
    """The pseudo-labels of windows (``ids``, ``starts``) the teacher scored ``scores`` (windows, n_classes):
    a row per labelled species of every window with a new present species.  ``known``: what the rows say of
    each window (``window_labels``), which the teacher never overrides."""
    present = (scores >= thresholds) & ~known
    absent = (scores < cfg.negatives) & ~known
    window, species = np.nonzero((present | absent) & present.any(axis=1, keepdims=True))
    score = scores[window, species].astype(np.float32)
    hard = present[window, species].astype(np.float32)
    return pd.DataFrame({
        "recording_id": np.asarray(ids, dtype=str)[window], "start": np.asarray(starts, dtype=float)[window],
        "species_id": species, "score": score, "target": score * hard if cfg.mode == "soft" else hard,
    }, columns=COLUMNS)


def balanced(labels: pd.DataFrame, labelled: pd.Series, per_call: float) -> pd.DataFrame:
    """At most ``per_call`` present labels of each species per labelled call of it (``labelled``: species ->
    train_tp rows), the teacher's most confident first; absent labels stay, and a window left without a present
    label goes.  ``per_call`` 0: ``labels`` as they are."""
    if not per_call:
        return labels
    present = labels[labels["target"] > 0]
    rank = present.groupby("species_id")["score"].rank(ascending=False, method="first")
    cap = present["species_id"].map(labelled).fillna(0) * per_call
    kept = labels.drop(present.index[rank > cap])
    windows = kept[kept["target"] > 0].set_index(["recording_id", "start"]).index
    return kept[kept.set_index(["recording_id", "start"]).index.isin(windows)].reset_index(drop=True)


def samples(labels: pd.DataFrame, events: pd.DataFrame, absences: pd.DataFrame, crop_seconds: float,
            n_classes: int) -> Samples:
    """The pseudo-labelled windows of ``labels`` (a ``table``) as training samples: the rows' labels
    (``events``: train_tp, ``absences``: train_fp) and, where they say nothing, the table's targets."""
    windows = labels[["recording_id", "start"]].drop_duplicates().sort_values(["recording_id", "start"])
    ids, starts = windows["recording_id"].to_numpy(dtype=str), windows["start"].to_numpy(dtype=float)
    out = window_labels(ids, starts, events, absences, crop_seconds, n_classes)
    row = pd.Series(np.arange(len(windows)), index=pd.MultiIndex.from_arrays([ids, starts]))
    i = row.loc[list(zip(labels["recording_id"], labels["start"]))].to_numpy()
    k = labels["species_id"].to_numpy(dtype=int)
    free = ~out.known[i, k]  # what the rows say stays
    out.labels[i[free], k[free]] = labels["target"].to_numpy(dtype=np.float32)[free]
    out.known[i[free], k[free]] = True
    return Samples(out.recording_ids, out.starts, out.labels, out.known, np.ones(len(ids), bool))


def agreement(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """How alike two rounds' pseudo-labels are: the Jaccard index of their present (window, species) sets."""
    def present(t: pd.DataFrame) -> set:
        rows = t[t["target"] > 0]
        return set(zip(rows["recording_id"], rows["start"].round(3), rows["species_id"]))

    x, y = present(a), present(b)
    return len(x & y) / len(x | y) if x | y else 1.0
