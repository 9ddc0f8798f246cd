"""Where and when: species events from scores over time, Raven Pro selection tables and Audacity label tracks,
event-level scores.

A recording's ``Timeline`` holds its species scores over time: each stretch between window
edges gets, per species, the lowest score of the windows that contain it all, so a call lights
up only the stretches every window around it agrees on (with windows every half crop, a
resolution of half a crop; a smaller ``--hop`` refines it).  ``events`` turns a timeline into
detections: stretches at or above a species' threshold, merged across gaps shorter than
``detect.min_gap_seconds``, each with its peak score and the species' frequency band.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rfcx_mlops.config import ConfigError, DetectConfig, read_csv

DETECTION_COLUMNS = ["recording_id", "species_id", "t_start", "t_end", "f_low", "f_high", "score"]
RAVEN_COLUMNS = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                 "High Freq (Hz)", "Species", "Score"]
SPECIES_FILE = "species.csv"  # a run's species: id, name, frequency band
RAVEN_SUFFIX = ".Table.1.selections.txt"  # Raven Pro's own name for a recording's first selection table
AUDACITY_SUFFIX = ".labels.txt"


@dataclass(frozen=True)
class Timeline:
    """Species scores over a recording: row k scores the stretch from ``edges[k]`` to ``edges[k + 1]`` seconds."""

    edges: np.ndarray  # (T + 1,)
    scores: np.ndarray  # (T, n_classes)


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


def thresholds(cfg: DetectConfig, n_classes: int) -> np.ndarray:
    """Each species' threshold: ``detect.threshold``, or its row of ``detect.thresholds_file``."""
    out = np.full(n_classes, cfg.threshold, np.float32)
    if not cfg.thresholds_file:
        return out
    path = Path(cfg.thresholds_file)
    if not path.is_file():
        raise ConfigError(f"detect.thresholds_file: {path} is not a file")
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


def _name(names: dict[int, str], species) -> str:
    return names.get(int(species), f"s{int(species)}")


def species_table(tp: pd.DataFrame, n_classes: int, fmin: float, fmax: float,
                  names: dict[int, str] | None = None) -> pd.DataFrame:
    """What a run records of its species (``SPECIES_FILE``): species_id, name (``names``, else s<id>) and the
    frequency band of its labelled calls (lowest f_min to highest f_max; ``fmin``-``fmax`` without calls)."""
    bands = tp.groupby("species_id").agg(f_low=("f_min", "min"), f_high=("f_max", "max"))
    bands = bands.reindex(range(n_classes)).fillna({"f_low": fmin, "f_high": fmax})
    bands.insert(0, "name", [_name(names or {}, k) for k in range(n_classes)])
    return bands.rename_axis("species_id").reset_index()


def detections(recording_id: str, line: Timeline, thresholds: np.ndarray, min_gap: float,
               species: pd.DataFrame) -> pd.DataFrame:
    """``events`` of one recording as rows of detections.csv (DETECTION_COLUMNS), banded by ``species_table``."""
    found = events(line, thresholds, min_gap).merge(species, on="species_id", how="left")
    found.insert(0, "recording_id", recording_id)
    return found[DETECTION_COLUMNS]


def write_raven(rows: pd.DataFrame, path: Path, names: dict[int, str] | None = None) -> Path:
    """One recording's detections as a Raven Pro selection table (tab-separated, Raven's column names)."""
    names = names or {}
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, delimiter="\t", lineterminator="\n")
        out.writerow(RAVEN_COLUMNS)
        for selection, row in enumerate(rows.itertuples(index=False), 1):
            out.writerow([selection, "Spectrogram 1", 1, f"{row.t_start:.6f}", f"{row.t_end:.6f}", f"{row.f_low:.3f}",
                          f"{row.f_high:.3f}", _name(names, row.species_id), f"{row.score:.6f}"])
    return path


def write_audacity(rows: pd.DataFrame, path: Path, names: dict[int, str] | None = None) -> Path:
    """One recording's detections as an Audacity label track: a region label per detection ("name score"),
    followed by its band on a ``\\`` line (Audacity's format with frequency ranges, which its spectrogram
    view shows as a spectral selection)."""
    names = names or {}
    with open(path, "w", newline="") as fh:
        for row in rows.itertuples(index=False):
            fh.write(f"{row.t_start:.6f}\t{row.t_end:.6f}\t{_name(names, row.species_id)} {row.score:.2f}\n"
                     f"\\\t{row.f_low:.3f}\t{row.f_high:.3f}\n")
    return path


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


class RavenError(ValueError):
    """A selection table that cannot be read; the message names the file and line."""


RAVEN_NEEDED = ["Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)"]


def read_raven(path: Path, label_column: str = "Species") -> pd.DataFrame:
    """A Raven selection table's boxes: columns selection, t_start, t_end, f_low, f_high, label, line.

    Raven lists a selection once per view (waveform and spectrogram rows share its number): one
    row per selection is kept.  A selection number twice in one view is refused.
    """
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise RavenError(f"{path}: not a tab-separated selection table ({str(exc).strip()})") from None
    missing = [c for c in ["Selection", *RAVEN_NEEDED, label_column] if c not in table.columns]
    if missing:
        raise RavenError(f"{path}: no column {', '.join(repr(c) for c in missing)} "
                         f"(it has {', '.join(repr(c) for c in table.columns)})")
    table["line"] = np.arange(2, len(table) + 2)
    view = table["View"] if "View" in table.columns else pd.Series("", index=table.index)
    twice = table[table.assign(view=view).duplicated(["Selection", "view"], keep=False)]
    if len(twice):
        first = twice.iloc[0]
        lines = twice.loc[twice["Selection"] == first["Selection"], "line"].tolist()
        raise RavenError(f"{path}: selection {first['Selection']} appears twice in one view (lines "
                         f"{', '.join(map(str, lines))})")
    table = table.drop_duplicates("Selection")
    out = pd.DataFrame({"selection": table["Selection"], "label": table[label_column].str.strip(),
                        "line": table["line"]})
    for column, name in zip(RAVEN_NEEDED, ["t_start", "t_end", "f_low", "f_high"]):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.loc[values.isna(), "line"]
        if len(bad):
            raise RavenError(f"{path} line {bad.iloc[0]}: {column} is not a number")
        out[name] = values.to_numpy(float)
    wrong = out[(out["t_end"] <= out["t_start"]) | (out["f_high"] <= out["f_low"]) | (out["t_start"] < 0)]
    if len(wrong):
        raise RavenError(f"{path} line {wrong['line'].iloc[0]}: the box must have 0 <= begin < end time and "
                         f"low < high frequency")
    return out.reset_index(drop=True)


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
        spec.text(d.t_start, high, f"{_name(names, d.species_id)} {d.score:.2f}",
                  color=colours[d.species_id], fontsize=8, va="bottom")
    for k in species[:top]:
        curves.stairs(line.scores[:, k], line.edges, color=colours[k], label=_name(names, k))
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
