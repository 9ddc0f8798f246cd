"""An evaluation set: recordings with their whole-recording truth, named and digested so that figures measured
on it can be compared and found again.

Two kinds of folder hold such truth:

    <dir>/test_labels.csv + <dir>/test/   recording_id,s0..s23 per recording (the demo data's test set);
                                          <dir>/test_calls.csv, where present, times every call
    <dir>/train_tp.csv + <dir>/train/     a labelled data folder (``dataset import-raven`` writes one): a
                                          species calls in a recording when a row names it there

A labelled folder may be narrowed to some of its recordings (a fold's validation recordings).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rfcx_mlops.config import read_csv
from rfcx_mlops.data import folder
from rfcx_mlops.data.folder import DataError

LABELS_FILE = "test_labels.csv"  # the demo data's test truth
CALLS_FILE = "test_calls.csv"  # ... and when each test call happens


@dataclass(frozen=True)
class EvaluationSet:
    folder: Path
    name: str  # the folder's name, and which of its recordings: "n480/test", "n480/fold1"
    digest: str  # of the truth and the audio files' names and sizes
    files: dict[str, Path]  # recording id -> audio file, in evaluation order
    truth: np.ndarray  # (recordings, n_classes) 0/1
    calls: pd.DataFrame | None  # recording_id,species_id,t_min,t_max of the calls, where they are timed
    labelled: bool  # the truth is a labelled data folder's rows, not a complete test truth

    @property
    def ids(self) -> list[str]:
        return list(self.files)


def evaluation_set(data_dir: Path, n_classes: int, sample_rate: int, only: set[str] | None = None,
                   part: str = "") -> EvaluationSet:
    """The evaluation set in ``data_dir`` (see the module), or one ``DataError`` line saying what is missing.

    ``only``: the recordings of its labelled folder to keep (a test set beside it aside), called ``part`` in the
    set's name.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder")
    if only is None and (data_dir / LABELS_FILE).is_file():
        return _test_set(data_dir, n_classes)
    if (data_dir / folder.TP_FILE).is_file():
        return _labelled_set(data_dir, n_classes, sample_rate, only, part)
    raise DataError(f"{data_dir}: no truth to evaluate against: it needs {LABELS_FILE} beside test/ (as the demo "
                    f"data has), or {folder.TP_FILE} beside train/ (as dataset import-raven writes)")


def _test_set(data_dir: Path, n_classes: int) -> EvaluationSet:
    path = data_dir / LABELS_FILE
    labels = read_csv(path, DataError)
    columns = ["recording_id"] + [f"s{i}" for i in range(n_classes)]
    if list(labels.columns) != columns:
        raise DataError(f"{path}: expected the columns recording_id,s0..s{n_classes - 1} (the model scores "
                        f"{n_classes} species)")
    ids = labels["recording_id"].astype(str).tolist()
    files = {}
    for line, rid in enumerate(ids, 2):
        found = folder.find_audio(data_dir / "test", folder.check_recording_id(rid, f"{path} line {line}"))
        if found is None:
            raise DataError(f"{path} line {line}: no audio file {rid}.flac or {rid}.wav in {data_dir / 'test'}")
        files[rid] = found
    truth = labels[columns[1:]].apply(pd.to_numeric, errors="coerce").to_numpy()
    bad = np.argwhere(~np.isin(truth, (0, 1)))
    if len(bad):
        raise DataError(f"{path} line {bad[0][0] + 2}: species columns hold 0 or 1")
    calls = _calls(data_dir / CALLS_FILE) if (data_dir / CALLS_FILE).is_file() else None
    extra = [LABELS_FILE] + ([CALLS_FILE] if calls is not None else [])
    return EvaluationSet(data_dir, f"{data_dir.name}/test", _digest(data_dir, files, extra), files,
                         truth.astype(np.float32), calls, labelled=False)


def _calls(path: Path) -> pd.DataFrame:
    table = read_csv(path, DataError)
    columns = ["recording_id", "species_id", "t_min", "t_max"]
    if not set(columns) <= set(table.columns):
        raise DataError(f"{path}: needs the columns {','.join(columns)}")
    numbers = table[columns[1:]].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1).to_numpy().nonzero()[0]
    if len(bad):
        raise DataError(f"{path} line {bad[0] + 2}: species_id, t_min and t_max must be numbers")
    return pd.concat([table["recording_id"], numbers.astype({"species_id": int})], axis=1)


def _labelled_set(data_dir: Path, n_classes: int, sample_rate: int, only: set[str] | None,
                  part: str) -> EvaluationSet:
    data = folder.load(data_dir, n_classes, sample_rate)
    ids = sorted(set(data.tp["recording_id"]) | set(data.fp["recording_id"]))
    if only is not None:
        ids = [rid for rid in ids if rid in only]
        if not ids:
            raise DataError(f"{data_dir}: none of its recordings is in {part or 'the recordings asked for'}")
    files = {rid: data.recordings[rid].path for rid in ids}
    truth = np.zeros((len(ids), n_classes), np.float32)
    row = {rid: i for i, rid in enumerate(ids)}
    tp = data.tp[data.tp["recording_id"].isin(row)]
    truth[tp["recording_id"].map(row).to_numpy(), tp["species_id"].to_numpy()] = 1
    calls = tp[["recording_id", "species_id", "t_min", "t_max"]].reset_index(drop=True)
    name = data_dir.name + (f"/{part}" if part else "")
    return EvaluationSet(data_dir, name, _digest(data_dir, files, [folder.TP_FILE, folder.FP_FILE]), files, truth,
                         calls, labelled=True)


def _digest(data_dir: Path, files: dict[str, Path], tables: list[str]) -> str:
    digest = hashlib.sha256()
    for name in tables:
        if (data_dir / name).is_file():
            digest.update(name.encode() + (data_dir / name).read_bytes())
    for rid, path in files.items():
        digest.update(f"{rid}:{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
