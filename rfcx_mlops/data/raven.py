"""Annotation tables: Raven Pro selection tables (read, write, and a folder of them imported as RFCX data)
and Audacity label tracks (write).

A selection table is tab-separated with Raven's column names (Selection, View, Channel,
Begin Time (s), End Time (s), Low Freq (Hz), High Freq (Hz), then annotation columns); the
bioacoustics tools users know (Raven, OpenSoundscape, Koogu, ketos) read and write it.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from rfcx_mlops.data.audio import AudioError, probe
from rfcx_mlops.data.folder import (DURATION_TOLERANCE_S, FP_FILE, SPECIES_MAP, TP_FILE, DataError,
                                    check_recording_id, find_audio, read_species_map)

RAVEN_COLUMNS = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                 "High Freq (Hz)", "Species", "Score"]
RAVEN_SUFFIX = ".Table.1.selections.txt"  # Raven Pro's own name for a recording's first selection table
AUDACITY_SUFFIX = ".labels.txt"


class RavenError(DataError):
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


def species_name(names: dict[int, str], species) -> str:
    """Species ``species``' name in ``names``, else s<id>."""
    return names.get(int(species), f"s{int(species)}")


def write_raven(rows: pd.DataFrame, path: Path, names: dict[int, str] | None = None) -> Path:
    """One recording's detections as a Raven Pro selection table (tab-separated, Raven's column names)."""
    names = names or {}
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, delimiter="\t", lineterminator="\n")
        out.writerow(RAVEN_COLUMNS)
        for selection, row in enumerate(rows.itertuples(index=False), 1):
            out.writerow([selection, "Spectrogram 1", 1, f"{row.t_start:.6f}", f"{row.t_end:.6f}", f"{row.f_low:.3f}",
                          f"{row.f_high:.3f}", species_name(names, row.species_id), f"{row.score:.6f}"])
    return path


def write_audacity(rows: pd.DataFrame, path: Path, names: dict[int, str] | None = None) -> Path:
    """One recording's detections as an Audacity label track: a region label per detection ("name score"),
    followed by its band on a ``\\`` line (Audacity's format with frequency ranges, which its spectrogram
    view shows as a spectral selection)."""
    names = names or {}
    with open(path, "w", newline="") as fh:
        for row in rows.itertuples(index=False):
            fh.write(f"{row.t_start:.6f}\t{row.t_end:.6f}\t{species_name(names, row.species_id)} {row.score:.2f}\n"
                     f"\\\t{row.f_low:.3f}\t{row.f_high:.3f}\n")
    return path


def import_raven(tables: Path, audio_dir: Path, out: Path, *, species_map: Path | None = None,
                 label_column: str = "Species", absent_label: str = "noise", copy: bool = False) -> pd.DataFrame:
    """Raven selection tables (one per audio file, named ``<file stem>.<anything>.txt``) -> an RFCX data folder.

    Boxes labelled with a species become train_tp.csv rows; boxes labelled ``absent_label`` hold
    none of the species, so they become a train_fp.csv row for every species.  Species ids come
    from ``species_map`` (species_id,name), else from the names in sorted order; either way OUT
    gets species.csv.  The audio is linked into OUT/train (copied with ``copy``).  Returns the
    species map.
    """
    files = sorted(tables.glob("*.txt")) if tables.is_dir() else []
    if not files:
        raise DataError(f"{tables}: no selection tables (*.txt)")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty; give a new folder")
    boxes, audio_files = [], []
    for path in files:
        stem = path.name.split(".")[0]
        check_recording_id(stem, str(path))
        audio = find_audio(audio_dir, stem)
        if audio is None:
            raise DataError(f"{path}: no audio file {stem}.flac or {stem}.wav in {audio_dir}")
        rows = read_raven(path, label_column)
        try:
            duration = probe(audio).duration
        except AudioError as exc:
            raise DataError(str(exc)) from None
        late = rows[rows["t_end"] > duration + DURATION_TOLERANCE_S]
        if len(late):
            raise DataError(f"{path} line {late['line'].iloc[0]}: ends at {late['t_end'].iloc[0]:g} s, past the end "
                            f"of {audio.name} ({duration:.2f} s)")
        boxes.append(rows.assign(recording_id=stem, table=str(path)))
        audio_files.append(audio)
    boxes = pd.concat(boxes, ignore_index=True)
    calls = boxes[boxes["label"] != absent_label]
    if species_map is not None:
        names = read_species_map(species_map)
        unknown = calls[~calls["label"].isin(set(names["name"]))]
        if len(unknown):
            first = unknown.iloc[0]
            raise DataError(f"{first['table']} line {first['line']}: species {first['label']!r} is not in "
                            f"{species_map}")
    else:
        names = pd.DataFrame({"name": sorted(set(calls["label"]))})
        names.insert(0, "species_id", range(len(names)))
    ids = dict(zip(names["name"], names["species_id"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train").mkdir()

    def table(rows: pd.DataFrame, species: pd.Series) -> pd.DataFrame:
        return pd.DataFrame({"recording_id": rows["recording_id"].to_numpy(), "species_id": species.to_numpy(),
                             "songtype_id": 1, "t_min": rows["t_start"].to_numpy(), "f_min": rows["f_low"].to_numpy(),
                             "t_max": rows["t_end"].to_numpy(), "f_max": rows["f_high"].to_numpy()})

    noise = boxes[boxes["label"] == absent_label]
    every = noise.loc[noise.index.repeat(len(names))]
    table(calls, calls["label"].map(ids)).to_csv(out / TP_FILE, index=False)
    table(every, pd.Series(np.tile(names["species_id"].to_numpy(), len(noise)))).to_csv(out / FP_FILE, index=False)
    names.to_csv(out / SPECIES_MAP, index=False)
    for audio in audio_files:
        target = out / "train" / audio.name
        if copy:
            shutil.copy2(audio, target)
        else:
            target.symlink_to(audio.resolve())
    return names
