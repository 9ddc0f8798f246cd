"""Reading and validating an RFCX data folder (Kaggle layout); its command line: ``python -m rfcx_mlops.dataset``.

    <data_dir>/train_tp.csv          recording_id,species_id,songtype_id,t_min,f_min,t_max,f_max
    <data_dir>/train_fp.csv          optional, same columns: verified absences
    <data_dir>/train/<id>.flac|.wav  the recordings the CSVs name
    <data_dir>/test/<id>.flac|.wav   optional, unlabelled
    <data_dir>/sample_submission.csv optional, recording_id,s0..s23

Everything is checked before a run starts, and every problem is reported as one
line naming the file and the line of the CSV (the header is line 1).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rfcx_mlops.config import Config, read_csv
from rfcx_mlops.data.audio import AUDIO_SUFFIXES, AudioError, AudioInfo, probe
from rfcx_mlops.errors import ConfigError, UserError

TP_FILE = "train_tp.csv"
FP_FILE = "train_fp.csv"
SUBMISSION_FILE = "sample_submission.csv"
COLUMNS = ("recording_id", "species_id", "songtype_id", "t_min", "f_min", "t_max", "f_max")
# The validated tables' dtypes; an empty table keeps them (pandas would make empty columns str).
DTYPES = {"recording_id": "str", "species_id": "int64", "songtype_id": "int64", "t_min": "float64",
          "f_min": "float64", "t_max": "float64", "f_max": "float64", "line": "int64"}
# Annotations are given to a few milliseconds; a box may end a hair past the last frame.
DURATION_TOLERANCE_S = 0.01


class DataError(UserError):
    """The data folder cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Dataset:
    data_dir: Path
    tp: pd.DataFrame  # validated rows of train_tp.csv, with their CSV line numbers in `line`
    fp: pd.DataFrame  # validated rows of train_fp.csv (empty when the file is absent)
    recordings: dict[str, AudioInfo]  # every recording the CSVs reference
    test: dict[str, AudioInfo]
    demo: bool = False  # the built-in demo data set


def no_events() -> pd.DataFrame:
    """An events table with no rows and the validated tables' dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in DTYPES.items()})


def plain_file_name(recording_id: str) -> bool:
    """A recording id names a file inside its folder: no separators, no ``..``, not absolute."""
    return recording_id not in ("", ".", "..") and not any(c in recording_id for c in "/\\\0")


def check_recording_id(recording_id: str, where: str) -> str:
    """``recording_id`` if it is a plain file name, else a ``DataError`` naming it and ``where`` it came from."""
    if not plain_file_name(recording_id):
        raise DataError(f"{where}: recording_id {recording_id!r} is not a plain file name "
                        "(no folders, '..' or absolute paths)")
    return recording_id


def find_audio(folder: Path, recording_id: str) -> Path | None:
    for suffix in AUDIO_SUFFIXES:
        path = folder / f"{recording_id}{suffix}"
        if path.exists():
            return path
    return None


def read_events(path: Path, n_classes: int, sample_rate: int) -> tuple[pd.DataFrame, list[str]]:
    """The rows of a train_tp/train_fp CSV that pass every check, and one line per problem found."""
    name = path.name
    try:
        raw = read_csv(path, DataError)
    except DataError as exc:
        return no_events(), [str(exc)]
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        return no_events(), [f"{name}: missing column(s) {', '.join(missing)}"]
    df = pd.DataFrame({"recording_id": raw["recording_id"].astype("str").str.strip()})
    for col in COLUMNS[1:]:
        df[col] = pd.to_numeric(raw[col].astype("str").str.strip(), errors="coerce").astype("float64")
    df["line"] = np.arange(len(df), dtype=np.int64) + 2
    problems: list[tuple[int, str]] = []
    bad = np.zeros(len(df), dtype=bool)

    def flag(mask: pd.Series, message) -> None:
        nonlocal bad
        mask = mask.to_numpy(dtype=bool) & ~bad  # one problem per row: the first one found
        for i in np.flatnonzero(mask):
            problems.append((i, f"{name} line {df['line'].iat[i]}: {message(df.iloc[i], raw.iloc[i])}"))
        bad |= mask

    flag(df["recording_id"] == "", lambda r, s: "empty recording_id")
    flag(~df["recording_id"].map(plain_file_name).astype(bool),
         lambda r, s: f"recording_id {r.recording_id!r} is not a plain file name (no folders, '..' or absolute paths)")
    for col in COLUMNS[1:]:
        flag(df[col].isna(), lambda r, s, col=col: f"{col} is {s[col]!r}, not a number")
    flag(df["species_id"] % 1 != 0, lambda r, s: f"species_id {s['species_id']} is not a whole number")
    flag(
        (df["species_id"] < 0) | (df["species_id"] >= n_classes),
        lambda r, s: f"species_id {s['species_id']} outside 0..{n_classes - 1}",
    )
    flag(df["t_min"] < 0, lambda r, s: f"t_min {r.t_min} is negative")
    flag(df["t_min"] >= df["t_max"], lambda r, s: f"t_min {r.t_min} is not below t_max {r.t_max}")
    flag(df["f_min"] < 0, lambda r, s: f"f_min {r.f_min} is negative")
    flag(df["f_min"] >= df["f_max"], lambda r, s: f"f_min {r.f_min} is not below f_max {r.f_max}")
    flag(
        df["f_max"] > sample_rate / 2,
        lambda r, s: f"f_max {r.f_max} Hz is above the Nyquist frequency {sample_rate / 2:g} Hz",
    )
    good = df[~bad].astype(DTYPES).reset_index(drop=True)
    return good, [line for _, line in sorted(problems, key=lambda p: p[0])]


def _probe_all(folder: Path, ids, progress: bool) -> tuple[dict[str, AudioInfo], list[str]]:
    infos: dict[str, AudioInfo] = {}
    problems: list[str] = []
    ids = sorted(ids)
    if ids and not folder.is_dir():
        return infos, [f"{folder}: folder missing; the CSVs reference {len(ids)} recordings in it"]
    for n, rid in enumerate(ids, 1):
        path = find_audio(folder, rid)
        if path is None:
            problems.append(f"{folder / rid}.flac: missing (no .flac or .wav)")
        else:
            try:
                infos[rid] = probe(path)
            except AudioError as exc:
                problems.append(str(exc))
        if progress and (n % 200 == 0 or n == len(ids)):
            print(f"  probed {n}/{len(ids)} recordings in {folder}", file=sys.stderr)
    return infos, problems


def _check_durations(df: pd.DataFrame, name: str, infos: dict[str, AudioInfo]) -> tuple[pd.DataFrame, list[str]]:
    duration = df["recording_id"].map({k: v.duration for k, v in infos.items()}).astype("float64")
    present = duration.notna()
    too_long = present & (df["t_max"] > duration + DURATION_TOLERANCE_S)
    problems = [
        f"{name} line {r.line}: t_max {r.t_max} s is beyond the end of {r.recording_id} ({duration[i]:.3f} s)"
        for i, r in df[too_long].iterrows()
    ]
    return df[~too_long].reset_index(drop=True), problems


def _contradictions(tp: pd.DataFrame, fp: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The train_fp rows whose box overlaps, in time and frequency, a train_tp box of the same species in the
    same recording: one sound labelled present and verified absent.  Reported, and left out of the table."""
    pairs = fp.reset_index().merge(tp, on=["recording_id", "species_id"], suffixes=("", "_tp"))
    overlap = pairs[(pairs["t_min"] < pairs["t_max_tp"]) & (pairs["t_min_tp"] < pairs["t_max"])
                    & (pairs["f_min"] < pairs["f_max_tp"]) & (pairs["f_min_tp"] < pairs["f_max"])]
    overlap = overlap.drop_duplicates("index")
    problems = [f"{FP_FILE} line {r.line}: species {r.species_id} at {r.t_min:g}-{r.t_max:g} s in {r.recording_id} "
                f"overlaps {TP_FILE} line {r.line_tp}, a labelled call of that species: one sound labelled present "
                "and verified absent" for r in overlap.itertuples()]
    return fp.drop(index=overlap["index"]).reset_index(drop=True), problems


def scan(data_dir: str | Path, n_classes: int, sample_rate: int, *, with_test: bool = False,
         progress: bool = False) -> tuple[Dataset, list[str]]:
    """Read and validate everything; the problems come back as lines rather than exceptions."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    problems: list[str] = []
    tables = {}
    for name, required in ((TP_FILE, True), (FP_FILE, False)):
        path = data_dir / name
        if path.is_file():
            tables[name], found = read_events(path, n_classes, sample_rate)
            problems += found
        else:
            if required:
                problems.append(f"{data_dir / name}: missing (the labelled calls are read from it)")
            tables[name] = no_events()
    ids = set(tables[TP_FILE]["recording_id"]) | set(tables[FP_FILE]["recording_id"])
    recordings, found = _probe_all(data_dir / "train", ids, progress)
    problems += found
    for name in tables:
        tables[name], found = _check_durations(tables[name], name, recordings)
        problems += found
    tables[FP_FILE], found = _contradictions(tables[TP_FILE], tables[FP_FILE])
    problems += found
    test: dict[str, AudioInfo] = {}
    if with_test and (data_dir / "test").is_dir():
        test_ids = {p.stem for p in (data_dir / "test").iterdir() if p.suffix in AUDIO_SUFFIXES}
        test, found = _probe_all(data_dir / "test", test_ids, progress)
        problems += found
    return Dataset(data_dir, tables[TP_FILE], tables[FP_FILE], recordings, test), problems


def load(data_dir: str | Path, n_classes: int, sample_rate: int) -> Dataset:
    """A validated data set, or a one-line ``DataError`` counting the problems and naming the first."""
    dataset, problems = scan(data_dir, n_classes, sample_rate)
    if problems:
        more = f" (and {len(problems) - 1} more; run: python -m rfcx_mlops.dataset check {data_dir})"
        raise DataError(problems[0] + (more if len(problems) > 1 else ""))
    if dataset.tp.empty:
        raise DataError(f"{Path(data_dir) / TP_FILE}: holds no labelled calls")
    return dataset


def check_crop(cfg: Config, data: Dataset) -> None:
    """A training window must fit in every recording it is cut from: the labelled ones, and with
    ``train.fp_windows`` those of train_fp.csv."""
    ids = set(data.tp["recording_id"]) | (set(data.fp["recording_id"]) if cfg.train.fp_windows else set())
    shortest = min(data.recordings[rid].duration for rid in ids)
    if cfg.data.crop_seconds > shortest:
        raise ConfigError(f"data.crop_seconds {cfg.data.crop_seconds} is longer than the shortest recording "
                          f"({shortest:.2f} s)")


def fingerprint(data_dir: str | Path) -> str:
    """A short hash of the CSVs' bytes and the names and sizes of the audio files."""
    data_dir = Path(data_dir)
    digest = hashlib.sha256()
    for name in (TP_FILE, FP_FILE, SUBMISSION_FILE):
        if (data_dir / name).is_file():
            digest.update(name.encode() + (data_dir / name).read_bytes())
    for sub in ("train", "test"):
        if (data_dir / sub).is_dir():
            for path in sorted((data_dir / sub).iterdir()):
                digest.update(f"{sub}/{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def summary(dataset: Dataset) -> str:
    tp = dataset.tp
    lines = [f"data folder: {dataset.data_dir}"]
    lines.append(f"{TP_FILE}: {len(tp)} calls in {tp['recording_id'].nunique()} recordings, "
                 f"{tp['species_id'].nunique()} species")
    if len(tp):
        per_species = tp.groupby("species_id").size()
        lines.append("calls per species: " + ", ".join(f"{k}:{v}" for k, v in per_species.items()))
        dur = tp["t_max"] - tp["t_min"]
        lines.append(f"call duration: min {dur.min():.2f} s, median {dur.median():.2f} s, max {dur.max():.2f} s")
        n_species = tp.groupby("recording_id")["species_id"].nunique()
        lines.append(f"recordings holding 2 or more species: {(n_species > 1).sum()}")
    lines.append(f"{FP_FILE}: {len(dataset.fp)} verified absences in {dataset.fp['recording_id'].nunique()} recordings")
    for label, infos in (("train audio", dataset.recordings), ("test audio", dataset.test)):
        if infos:
            rates = pd.Series([i.sample_rate for i in infos.values()]).value_counts()
            durations = np.array([i.duration for i in infos.values()])
            lines.append(
                f"{label}: {len(infos)} recordings, "
                + ", ".join(f"{n} at {r} Hz" for r, n in rates.items())
                + f", {durations.min():.1f}-{durations.max():.1f} s"
            )
    return "\n".join(lines)


SPECIES_MAP = "species.csv"  # species_id,name: what the ids of a data folder stand for


def species_names(data_dir: Path) -> dict[int, str]:
    """The names of DIR/species.csv (``import-raven`` writes it), or none."""
    path = Path(data_dir) / SPECIES_MAP
    if not path.is_file():
        return {}
    table = read_species_map(path)
    return dict(zip(table["species_id"], table["name"]))


def read_species_map(path: Path) -> pd.DataFrame:
    table = read_csv(path, DataError)
    if not {"species_id", "name"} <= set(table.columns):
        raise DataError(f"{path}: needs the columns species_id and name; it has {', '.join(table.columns)}")
    ids = pd.to_numeric(table["species_id"], errors="coerce")
    for line, (k, name) in enumerate(zip(ids, table["name"]), 2):
        if not (k >= 0 and float(k).is_integer()) or not name.strip():
            raise DataError(f"{path} line {line}: species_id must be an integer >= 0 and name not empty")
    table = pd.DataFrame({"species_id": ids.astype(int), "name": table["name"].str.strip()})
    for column in ("species_id", "name"):
        twice = table[table[column].duplicated()]
        if len(twice):
            raise DataError(f"{path} line {twice.index[0] + 2}: {column} {twice[column].iloc[0]!r} appears twice")
    return table


def recordings_to_score(data_dir: Path, n_classes: int | None) -> tuple[list[str], dict[str, Path]]:
    """The recordings to score in ``data_dir``, ids in submission order, and their files: DIR/test/ with
    DIR/sample_submission.csv, or DIR's own files.

    ``n_classes``: the species columns sample_submission.csv must have (None: not checked yet).
    """
    folder = data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    if not folder.is_dir():
        raise DataError(f"{data_dir}: no such folder")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES}
    if not files:
        raise DataError(f"{folder}: no .flac or .wav files")
    template = data_dir / SUBMISSION_FILE
    if not template.is_file():
        return sorted(files), files
    header = pd.read_csv(template, nrows=0).columns
    species = [c for c in header if c != "recording_id"]
    if n_classes is not None and species != [f"s{i}" for i in range(n_classes)]:
        raise DataError(f"{template}: {len(species)} species columns, but the model scores {n_classes} "
                           f"(expected recording_id,s0..s{n_classes - 1})")
    ids = pd.read_csv(template, usecols=["recording_id"], dtype=str, keep_default_na=False)["recording_id"]
    return [check_recording_id(rid, f"{template} line {line}") for line, rid in enumerate(ids, 2)], files
