"""Scoring an archive's recordings a chunk at a time: what each worker process of ``jobs.score`` runs.

A worker is one core's share of the job: it decodes its chunk's recordings, makes their model
input and runs the models itself, one thread each, feeding them full batches of windows across
recordings.  It hands back the chunk's tables (``Chunk``); the recordings it could not score are
rows of the manifest with their reason, not errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from rfcx_mlops.config import Config
from rfcx_mlops.data import audio
from rfcx_mlops.data.archive import FAILED, MANIFEST_COLUMNS, SCORED, Recording, site
from rfcx_mlops.files import stderr_to_devnull
from rfcx_mlops.infer import detect


@dataclass(frozen=True)
class Settings:
    """How a job scores and detects (``python -m rfcx_mlops.score``'s flags over the run's config)."""

    thresholds: np.ndarray  # per species
    min_gap: float  # seconds: detections of a species closer than this are joined
    min_seconds: float  # a shorter recording is not scored
    batch: int  # windows per call of the models
    species: pd.DataFrame  # species_id, name, f_low, f_high (``detect.species_table``)


@dataclass(frozen=True)
class Outcome:
    """One recording: its scores and scores over time, or why it has none."""

    recording: Recording
    seconds: float = float("nan")
    scores: np.ndarray | None = None
    line: detect.Timeline | None = None
    reason: str = ""


@dataclass(frozen=True)
class Chunk:
    """A chunk's rows of the output folder's tables (``data.archive``)."""

    scores: pd.DataFrame
    detections: pd.DataFrame
    manifest: pd.DataFrame


def too_short(seconds: float, settings: Settings) -> str:
    """Why a recording is not scored for its length; "" when it is long enough."""
    if seconds < settings.min_seconds:
        return f"too short: {seconds:.2f} s of audio, under --min-seconds {settings.min_seconds:g}"
    return ""


DETECTION_DTYPES = {"recording_id": str, "species_id": "int64", "t_start": "float64", "t_end": "float64",
                    "f_low": "float64", "f_high": "float64", "score": "float64"}
# One thread for TensorFlow and for numpy's BLAS in each worker or Spark task: a worker is one core.
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1",
              "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tables(outcomes: list[Outcome], settings: Settings, n_classes: int) -> Chunk:
    """A chunk's tables from its recordings' outcomes (typed alike when a chunk has no scored recording)."""
    scored = [o for o in outcomes if not o.reason]
    scores = pd.DataFrame(np.array([o.scores for o in scored], np.float32).reshape(-1, n_classes),
                          columns=[f"s{k}" for k in range(n_classes)])
    scores.insert(0, "seconds", pd.Series([o.seconds for o in scored], dtype="float64"))
    scores.insert(0, "site", pd.Series([site(o.recording.recording_id) for o in scored], dtype=str))
    scores.insert(0, "recording_id", pd.Series([o.recording.recording_id for o in scored], dtype=str))
    found = [detect.detections(o.recording.recording_id, o.line, settings.thresholds, settings.min_gap,
                               settings.species) for o in scored]
    detections = (pd.concat(found, ignore_index=True) if found
                  else pd.DataFrame(columns=detect.DETECTION_COLUMNS)).astype(DETECTION_DTYPES)
    manifest = pd.DataFrame([(o.recording.recording_id, o.recording.size, o.recording.mtime_ns, o.seconds,
                              FAILED if o.reason else SCORED, o.reason) for o in outcomes], columns=MANIFEST_COLUMNS)
    return Chunk(scores, detections, manifest)


def score_recordings(scorer, recordings: list[Recording], settings: Settings) -> Iterator[Outcome]:
    """Each recording's ``Outcome``; ``scorer``: a ``scorer.Scorer``."""
    failed: list[Outcome] = []

    def readable() -> Iterable[tuple[tuple[Recording, float], np.ndarray]]:
        for rec in recordings:
            try:
                info = audio.probe(rec.path)
                reason = too_short(info.duration, settings)
                if not reason:
                    yield (rec, info.duration), audio.read_window(info, 0.0, info.duration, scorer.sample_rate)
                    continue
            except audio.AudioError as exc:
                reason = str(exc).removeprefix(f"{rec.path}: ")
            except Exception as exc:  # noqa: BLE001 (one odd file must not stop the archive)
                reason = f"{type(exc).__name__}: {exc}"
            failed.append(Outcome(rec, reason=reason))

    for (rec, seconds), scores, line in scorer.timelines(readable(), settings.batch):
        yield Outcome(rec, seconds, scores, line)
    yield from failed


# One scorer per worker process, loaded once by ``start_worker``.
_worker: dict = {}


def start_worker(job: int, weights: list[str], cfg: Config, hop: float | None, settings: Settings,
                 verbose: bool) -> None:
    """A pool's initializer: the models on one thread, Ctrl-C left to the job (process ``job``), an end when the
    job ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not verbose:  # a resampled file is not news from a worker, nor is TensorFlow's start-up
        logging.getLogger("rfcx_mlops").setLevel(logging.ERROR)
    threading.Thread(target=_end_with, args=(job,), daemon=True).start()
    with contextlib.nullcontext() if verbose else stderr_to_devnull():
        from rfcx_mlops.infer.scorer import Scorer, load_models  # TensorFlow: its start-up log to /dev/null

        _worker.update(scorer=Scorer(load_models(map(Path, weights)), cfg, hop), settings=settings)


def score_chunk(recordings: list[Recording]) -> Chunk:
    """A worker's task: one chunk."""
    scorer, settings = _worker["scorer"], _worker["settings"]
    return tables(list(score_recordings(scorer, recordings, settings)), settings, scorer.n_classes)


def _end_with(job: int) -> None:
    """A worker whose job was killed (kill -9) would wait for work forever, and keep the pool's forkserver
    alive: it ends when the job's process does."""
    while True:
        try:
            os.kill(job, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its number taken by another user's process)
            os._exit(1)
        time.sleep(1.0)
