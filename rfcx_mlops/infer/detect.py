"""Where and when: species events from scores over time, event-level scores, pictures.

A recording's ``Timeline`` holds its species scores over time: each stretch between window
edges gets, per species, the lowest score of the windows that contain it all, so a call lights
up only the stretches every window around it agrees on (with windows every half crop, a
resolution of half a crop; a smaller ``--hop`` refines it).  ``events`` turns a timeline into
detections: stretches at or above a species' threshold, merged across gaps shorter than
``detect.min_gap_seconds``, each with its peak score and the species' frequency band.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rfcx_mlops.config import DetectConfig, PseudoConfig, read_csv
from rfcx_mlops.data.raven import species_name
from rfcx_mlops.errors import ConfigError

DETECTION_COLUMNS = ["recording_id", "species_id", "t_start", "t_end", "f_low", "f_high", "score"]
SPECIES_FILE = "species.csv"  # a run's species: id, name, frequency band


@dataclass(frozen=True)
class Timeline:
    """Species scores over a recording: row k scores the stretch from ``edges[k]`` to ``edges[k + 1]`` seconds."""

    edges: np.ndarray  # (T + 1,)
    scores: np.ndarray  # (T, n_classes)


def to_json(line: Timeline) -> str:
    """A timeline as text (a served model's ``timeline`` column); ``from_json`` reads it back exactly."""
    return json.dumps({"edges": line.edges.tolist(), "scores": line.scores.tolist()})


def from_json(text: str) -> Timeline:
    values = json.loads(text)
    return Timeline(np.asarray(values["edges"], float), np.asarray(values["scores"], np.float32))


def timeline(starts: np.ndarray, crop: float, window_scores: np.ndarray) -> Timeline:
    """The timeline of windows starting at ``starts`` (seconds), ``crop`` long, scored ``window_scores`` (W, n).

    A stretch no window covers (a hop longer than the crop) scores 0.
    """
    starts = np.asarray(starts, dtype=float)
    edges = np.unique(np.round(np.concatenate([starts, starts + crop]), 6))
    lo, hi = edges[:-1, None], edges[1:, None]
    inside = (starts[None, :] <= lo + 1e-6) & (starts[None, :] + crop >= hi - 1e-6)  # (T, W)
    lowest = np.where(inside[..., None], window_scores[None], np.inf).min(axis=1)
    return Timeline(edges, np.where(inside.any(axis=1)[:, None], lowest, 0.0).astype(np.float32))


def events(line: Timeline, thresholds: np.ndarray, min_gap: float) -> pd.DataFrame:
    """Per species, the stretches scoring at or above its threshold, joined across gaps shorter than ``min_gap``
    seconds: columns species_id, t_start, t_end, score (the peak)."""
    rows = []
    for species in range(line.scores.shape[1]):
        current: list | None = None
        for k in np.flatnonzero(line.scores[:, species] >= thresholds[species]):
            t0, t1, score = float(line.edges[k]), float(line.edges[k + 1]), float(line.scores[k, species])
            if current is not None and t0 - current[2] < max(min_gap, 1e-9):  # touching stretches join
                current[2], current[3] = t1, max(current[3], score)
            else:
                current = [species, t0, t1, score]
                rows.append(current)
    return pd.DataFrame(rows, columns=["species_id", "t_start", "t_end", "score"])


def thresholds(cfg: DetectConfig | PseudoConfig, n_classes: int) -> np.ndarray:
    """Each species' threshold: ``threshold``, or its row of ``thresholds_file`` (of ``detect`` or ``pseudo``)."""
    out = np.full(n_classes, cfg.threshold, np.float32)
    if not cfg.thresholds_file:
        return out
    path = Path(cfg.thresholds_file)
    if not path.is_file():
        section = "pseudo" if isinstance(cfg, PseudoConfig) else "detect"
        raise ConfigError(f"{section}.thresholds_file: {path} is not a file")
    table = read_csv(path)
    if list(table.columns) != ["species_id", "threshold"]:
        raise ConfigError(f"{path}: the header must be species_id,threshold; got {','.join(table.columns)}")
    seen = set()
    for line, (species, value) in enumerate(zip(table["species_id"], table["threshold"]), 2):
        try:
            k, t = int(species), float(value)
        except ValueError:
            raise ConfigError(f"{path} line {line}: species_id must be an integer and threshold a number") from None
        if not 0 <= k < n_classes or not 0.0 <= t <= 1.0 or k in seen:
            raise ConfigError(f"{path} line {line}: species_id must be a new id within 0..{n_classes - 1} and "
                              f"threshold within [0, 1]; got {species},{value}")
        seen.add(k)
        out[k] = t
    return out


def species_table(tp: pd.DataFrame, n_classes: int, fmin: float, fmax: float,
                  names: dict[int, str] | None = None) -> pd.DataFrame:
    """What a run records of its species (``SPECIES_FILE``): species_id, name (``names``, else s<id>) and the
    frequency band of its labelled calls (lowest f_min to highest f_max; ``fmin``-``fmax`` without calls)."""
    bands = tp.groupby("species_id").agg(f_low=("f_min", "min"), f_high=("f_max", "max"))
    bands = bands.reindex(range(n_classes)).fillna({"f_low": fmin, "f_high": fmax})
    bands.insert(0, "name", [species_name(names or {}, k) for k in range(n_classes)])
    return bands.rename_axis("species_id").reset_index()


def detections(recording_id: str, line: Timeline, thresholds: np.ndarray, min_gap: float,
               species: pd.DataFrame) -> pd.DataFrame:
    """``events`` of one recording as rows of detections.csv (DETECTION_COLUMNS), banded by ``species_table``."""
    found = events(line, thresholds, min_gap).merge(species, on="species_id", how="left")
    found.insert(0, "recording_id", recording_id)
    return found[DETECTION_COLUMNS]


def match(found: pd.DataFrame, calls: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(for each detection, whether it overlaps a true call of its species in its recording;
    for each call, whether a detection of its species overlaps it).  ``calls``: test_calls.csv's columns."""
    pairs = found.reset_index().merge(calls.reset_index(), on=["recording_id", "species_id"],
                                      suffixes=("_d", "_c"))
    hit = pairs[(pairs["t_start"] < pairs["t_max"]) & (pairs["t_min"] < pairs["t_end"])]
    return (np.isin(np.arange(len(found)), hit["index_d"].to_numpy()),
            np.isin(np.arange(len(calls)), hit["index_c"].to_numpy()))


def event_scores(found: pd.DataFrame, calls: pd.DataFrame, n_classes: int) -> pd.DataFrame:
    """Event-level precision and recall per species and overall ("all"): a detection is right when it overlaps a
    true call of its species; a call is found when a detection of its species overlaps it."""
    found, calls = found.reset_index(drop=True), calls.reset_index(drop=True)
    right, hit = match(found, calls)
    per = pd.DataFrame({
        "detections": found.groupby("species_id").size(),
        "right": pd.Series(right, dtype=int).groupby(found["species_id"]).sum(),
        "calls": calls.groupby("species_id").size(),
        "found": pd.Series(hit, dtype=int).groupby(calls["species_id"]).sum(),
    }).reindex(range(n_classes)).fillna(0).astype(int)
    per.loc["all"] = per.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        per["precision"] = per["right"] / per["detections"]
        per["recall"] = per["found"] / per["calls"]
    return per.rename_axis("species_id").reset_index()


def picture(features, y: np.ndarray, line: Timeline, found: pd.DataFrame, thresholds: np.ndarray,
            names: dict[int, str], title: str, top: int = 3):
    """A recording ``y`` at a glance: its mel spectrogram (``features``: a ``MelFeatures``) with the detections
    ``found`` drawn as boxes, and below it, on the same time axis, the score curves of its ``top`` species
    and their thresholds."""
    import librosa  # the mel scale, for drawing boxes given in Hz
    from matplotlib.figure import Figure  # without pyplot: no global figure state

    db = features.log_mel(y)
    duration, fmin, fmax = len(y) / features.sample_rate, features.cfg.fmin, features.cfg.fmax
    n_mels = db.shape[0]
    mels = librosa.hz_to_mel(np.array([fmin, fmax]))

    def row(hz):  # a frequency's position on the image's mel axis, in bins
        return n_mels * (librosa.hz_to_mel(np.clip(hz, fmin, fmax)) - mels[0]) / (mels[1] - mels[0])

    fig = Figure(figsize=(12, 6), layout="constrained")
    spec, curves = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    spec.imshow(np.maximum(db, db.max() - 80.0), origin="lower", aspect="auto", cmap="magma",
                extent=(0.0, duration, 0.0, n_mels))
    ticks = [f for f in (100, 250, 500, 1000, 2000, 4000, 8000, 16000) if fmin <= f <= fmax]
    spec.set_yticks([row(f) for f in ticks], [f"{f / 1000:g}k" if f >= 1000 else str(f) for f in ticks])
    spec.set_ylabel("Hz (mel scale)")
    spec.set_title(title)
    species = list(np.argsort(-line.scores.max(axis=0))[:top]) if len(line.scores) else []
    species += [k for k in found["species_id"].unique() if k not in species]
    colours = {k: f"C{i % 10}" for i, k in enumerate(species)}
    for d in found.itertuples(index=False):
        low, high = row(d.f_low), row(d.f_high)
        spec.add_patch(_box(d.t_start, low, d.t_end - d.t_start, high - low, colours[d.species_id]))
        spec.text(d.t_start, high, f"{species_name(names, d.species_id)} {d.score:.2f}",
                  color=colours[d.species_id], fontsize=8, va="bottom")
    for k in species[:top]:
        curves.stairs(line.scores[:, k], line.edges, color=colours[k], label=species_name(names, k))
        curves.axhline(thresholds[k], color=colours[k], linestyle=":", linewidth=0.8)
    curves.set_ylim(0, 1)
    curves.set_xlim(0, duration)
    curves.set_xlabel("time (s)")
    curves.set_ylabel("score")
    if species:
        curves.legend(loc="upper right", fontsize=8)
    return fig


def _box(x, y, width, height, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width, height, fill=False, edgecolor=colour, linewidth=1.5)
