"""An archive of field recordings, and the folder a scoring job writes it to (``python -m rfcx_mlops.score``).

ROOT is walked for .flac and .wav files at any depth (upper-case suffixes too); a symbolic link is
followed only where it stays inside ROOT, and each file is scored once.  A recording's id is its path relative to ROOT (``site-3/2026-02-01/0001.flac``),
so two recorders' ``0001.flac`` never collide; its site is the first folder of that path.

The output folder::

    OUT/job.json                          what the job scores: the model, ROOT and the settings
    OUT/scores/part-NNNNN.parquet         recording_id, site, seconds, s0..s23
    OUT/detections/part-NNNNN.parquet     recording_id, species_id, t_start, t_end, f_low, f_high, score
    OUT/manifest/part-NNNNN.parquet       recording_id, size, mtime_ns, seconds, status, reason
    OUT/raven/<recording id>.Table.1.selections.txt   with --raven
    OUT/failed.csv, OUT/summary.csv       rewritten at the end of each run of the job

A chunk of recordings counts once its manifest part exists: that part is written last, and each
part whole (``atomic_path``).  Parts of a chunk without one (a job killed while writing it) are
removed when the job starts again, and its recordings are scored again: a killed job loses at
most the chunks in flight, and every recording is in the results exactly once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from rfcx_mlops.data.audio import AUDIO_SUFFIXES
from rfcx_mlops.errors import UserError
from rfcx_mlops.files import atomic_path

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
FAILED_FILE = "failed.csv"
SUMMARY_FILE = "summary.csv"
PARTS = ("scores", "detections", "manifest")  # the manifest last: it commits the chunk
MANIFEST_COLUMNS = ["recording_id", "size", "mtime_ns", "seconds", "status", "reason"]
ALL_SITES = "(all sites)"  # summary.csv's rows over every site: not a folder name a walk meets
FAILED = "failed"
SCORED = "scored"
_PART = re.compile(r"part-(\d{5,})\.parquet")
_LOCK = ".lock"


class ArchiveError(UserError):
    """An archive or output folder the job cannot use; the message names it."""


@dataclass(frozen=True)
class Recording:
    """An audio file under ROOT: its id (the path relative to ROOT), where it is, and what it was when found."""

    recording_id: str
    path: Path
    size: int
    mtime_ns: int


def site(recording_id: str) -> str:
    """The first folder of a recording id; "." for a file directly in ROOT."""
    head, sep, _ = recording_id.partition("/")
    return head if sep else "."


def walk(root: Path) -> list[Recording]:
    """Every audio file under ``root``, once, sorted by id.  A link is followed only inside ``root`` and only to
    what the walk has not met yet (so never around a loop); hidden files and folders (``.Trash``, the ``._*``
    copies macOS leaves on SD cards) are passed over."""
    root = root.resolve()
    found, seen = [], {root}
    for folder, dirs, files in os.walk(root, onerror=_unreadable, followlinks=True):
        keep = []
        for name in sorted(dirs):
            real = Path(folder, name).resolve()
            if not name.startswith(".") and real.is_relative_to(root) and real not in seen:
                seen.add(real)
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            path = Path(folder, name)
            real = path.resolve()
            if (name.startswith(".") or path.suffix.lower() not in AUDIO_SUFFIXES or not real.is_relative_to(root)
                    or real in seen or not real.is_file()):
                continue
            seen.add(real)
            stat = real.stat()
            found.append(Recording(path.relative_to(root).as_posix(), path, stat.st_size, stat.st_mtime_ns))
    return sorted(found, key=lambda r: r.recording_id)


def _unreadable(exc: OSError) -> None:
    log.warning("passed over %s: %s", exc.filename, exc.strerror)


def find_audio(root: Path) -> list[Recording]:
    """``walk``, refusing a ROOT that is not a folder or holds no audio."""
    if not root.is_dir():
        raise ArchiveError(f"--audio: {root} is not a folder")
    found = walk(root)
    if not found:
        raise ArchiveError(f"--audio: no .flac or .wav file under {root}")
    return found


def chunks(todo: list[Recording], size: int, first: int) -> list[tuple[int, list[Recording]]]:
    """``todo`` in chunks of ``size`` recordings, numbered from ``first``."""
    return [(first + i, todo[k : k + size]) for i, k in enumerate(range(0, len(todo), size))]


class Out:
    """The output folder of one scoring job (see the module's docstring)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def check(self, job: dict | None = None) -> None:
        """Refuse a file, a folder with something else in it, or (given ``job``) another job's results."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ArchiveError(f"--out: {self.folder} is a file, not a folder")
        if not self.folder.is_dir() or not any(p.name != _LOCK for p in self.folder.iterdir()):
            return
        if not (self.folder / JOB_FILE).is_file():
            raise ArchiveError(f"--out: {self.folder} is not empty and holds no scoring job ({JOB_FILE}): "
                               "choose a new or empty folder")
        if job is None:
            return
        before = json.loads((self.folder / JOB_FILE).read_text())
        changed = [key for key in sorted(set(job) | set(before)) if job.get(key) != before.get(key)]
        if changed:
            raise ArchiveError(f"--out: {self.folder} holds another job's results (its {', '.join(changed)} "
                               f"differ: {before.get(changed[0])!r} there, {job.get(changed[0])!r} now): "
                               "choose a new folder")

    @contextlib.contextmanager
    def opened(self, job: dict) -> Iterator[Out]:
        """The folder held for this job: made where new, locked against a second job at once, its uncommitted
        parts removed."""
        self.check(job)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / _LOCK, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArchiveError(f"--out: {self.folder} is being written by another scoring job") from None
            self.check(job)  # again, held: a job that started at the same time may have made it its own
            if not (self.folder / JOB_FILE).is_file():
                with atomic_path(self.folder / JOB_FILE) as partial:
                    partial.write_text(json.dumps(job, indent=2) + "\n")
            self._drop_uncommitted()
            yield self

    def _parts(self, kind: str) -> dict[int, Path]:
        folder = self.folder / kind
        found = (_PART.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
        return {int(m.group(1)): folder / m.group(0) for m in found if m}

    def _drop_uncommitted(self) -> None:
        """Parts of chunks without a manifest part, and files a killed job was writing (``atomic_path``'s)."""
        committed = set(self._parts("manifest"))
        for kind in PARTS:
            for path in (self.folder / kind).glob(".part-*.partial-*"):
                path.unlink()
            for chunk, path in self._parts(kind).items():
                if chunk not in committed:
                    path.unlink()

    def manifest(self) -> pd.DataFrame:
        """Every committed recording (MANIFEST_COLUMNS), as its latest chunk left it: a failed file tried again
        has a row in each."""
        table = _read(self._parts("manifest"), pd.DataFrame(columns=MANIFEST_COLUMNS))
        return table.drop_duplicates("recording_id", keep="last").reset_index(drop=True)

    def pending(self, found: list[Recording]) -> list[Recording]:
        """The recordings still to score.  A file that failed and has changed since is tried
        again; a scored file that has changed is refused (its results would be stale)."""
        done = self.manifest().set_index("recording_id")
        stale, todo = [], []
        for rec in found:
            if rec.recording_id not in done.index:
                todo.append(rec)
                continue
            row = done.loc[rec.recording_id]
            if (int(row["size"]), int(row["mtime_ns"])) == (rec.size, rec.mtime_ns):
                continue
            if row["status"] == SCORED:
                stale.append(rec.recording_id)
            else:
                todo.append(rec)
        if stale:
            raise ArchiveError(f"--out: {len(stale)} recording(s) changed since {self.folder} scored them "
                               f"(size or time differ: {', '.join(stale[:3])}): score into a new folder")
        return todo

    def next_chunk(self) -> int:
        return max(self._parts("manifest"), default=-1) + 1

    def commit(self, chunk: int, scores: pd.DataFrame, detections: pd.DataFrame, manifest: pd.DataFrame) -> None:
        """Write one chunk's parts, the manifest last."""
        for kind, table in zip(PARTS, (scores, detections, manifest)):
            with atomic_path(self.folder / kind / f"part-{chunk:05d}.parquet") as partial:
                table.to_parquet(partial, index=False)

    def scores(self) -> pd.DataFrame:
        return _read(self._parts("scores"), pd.DataFrame(columns=["recording_id", "site", "seconds"]))

    def detections(self, columns: list[str]) -> pd.DataFrame:
        return _read(self._parts("detections"), pd.DataFrame(columns=columns))


def _read(parts: dict[int, Path], empty: pd.DataFrame) -> pd.DataFrame:
    tables = [t for t in (pd.read_parquet(parts[k]) for k in sorted(parts)) if len(t)]
    return pd.concat(tables, ignore_index=True) if tables else empty


def summary(scores: pd.DataFrame, detections: pd.DataFrame, species: pd.DataFrame) -> pd.DataFrame:
    """Per site and species (and over all sites, ``site`` ALL_SITES): recordings scored, recordings with a
    detection, detected seconds.  ``species``: species_id, name."""
    found = detections.assign(site=detections["recording_id"].map(site),
                              seconds=detections["t_end"] - detections["t_start"])
    rows = []
    for name, recordings, calls in [(ALL_SITES, scores, found), *((s, scores[scores["site"] == s],
                                                               found[found["site"] == s])
                                                              for s in sorted(scores["site"].unique()))]:
        per = calls.groupby("species_id").agg(recordings_with_detection=("recording_id", "nunique"),
                                              detected_seconds=("seconds", "sum"))
        per = per.reindex(species["species_id"]).fillna(0)
        per.insert(0, "recordings", len(recordings))
        per.insert(0, "name", species.set_index("species_id")["name"])
        per.insert(0, "site", name)
        rows.append(per.reset_index())
    table = pd.concat(rows, ignore_index=True)[["site", "species_id", "name", "recordings",
                                                 "recordings_with_detection", "detected_seconds"]]
    return table.astype({"recordings_with_detection": int, "recordings": int, "detected_seconds": float}).round(
        {"detected_seconds": 3})
