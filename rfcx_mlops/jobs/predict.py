"""Scoring a folder of recordings with a trained run: the submission, detections, annotation tables, pictures.

Each recording is scored by ``scorer.Scorer`` (sliding windows, the maximum over them) with
the run's model, or the mean of a cross-validation run's fold models.  The submission is
``recording_id,s0..s23`` in sample_submission.csv order; everything written is logged to the
run.  The command line is ``python -m rfcx_mlops.predict`` (``predict.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from rfcx_mlops.config import DetectConfig
from rfcx_mlops.data import audio, raven
from rfcx_mlops.data.evaluation import CALLS_FILE, LABELS_FILE
from rfcx_mlops.data.folder import recordings_to_score
from rfcx_mlops.errors import UserError
from rfcx_mlops.files import atomic_path
from rfcx_mlops.infer import detect
from rfcx_mlops.infer.scorer import Scorer, load_run, species_table
from rfcx_mlops.learn.metrics import lwlrap

log = logging.getLogger("rfcx_mlops.predict")
DETECTIONS_FILE = "detections.csv"
EVENTS_FILE = "event_scores.csv"


class PredictError(UserError):
    """A run or folder prediction cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What to score and what to write (``python -m rfcx_mlops.predict``'s flags)."""

    run_id: str
    out: Path  # the submission CSV
    data_dir: str = ""  # "": the folder the run trained on
    hop: float | None = None  # seconds between windows; None: half a window
    detections: Path | None = None  # None: detections.csv beside ``out``
    detect: dict = dataclasses.field(default_factory=dict)  # DetectConfig values that replace the run's
    raven: Path | None = None  # a folder for Raven selection tables
    audacity: Path | None = None  # a folder for Audacity label tracks
    plots: Path | None = None  # a folder for pictures
    need_labels: bool = False  # the folder must hold LABELS_FILE (a gate on the test LWLRAP)
    folds: list[str] | None = None  # a registered cross-validation version's fold models (``check_ensemble``)

    @property
    def detections_file(self) -> Path:
        return self.detections or self.out.with_name(DETECTIONS_FILE)


@dataclasses.dataclass
class Scored:
    """A folder's submission table, each recording's scores over time and file, and the recordings not scored."""

    submission: pd.DataFrame
    timelines: dict[str, detect.Timeline]
    files: dict[str, Path]
    skipped: list[str]


def predict(scorer, ids: list[str], files: dict[str, Path]) -> Scored:
    """Every recording's scores (the submission) and scores over time; missing or unreadable files are skipped."""
    rows, timelines, skipped = {}, {}, []
    for rid in tqdm(ids, desc="recordings", unit="rec", file=sys.stderr):
        try:
            if rid not in files:
                raise audio.AudioError(f"{rid}: no .flac or .wav file")
            y = scorer.read(files[rid])
        except audio.AudioError as exc:
            log.warning("skipped %s", exc)
            skipped.append(str(exc))
            continue
        rows[rid], timelines[rid] = scorer.timeline(y)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[f"s{i}" for i in range(scorer.n_classes)])
    return Scored(table.rename_axis("recording_id").reset_index(), timelines, files, skipped)


def test_lwlrap(submission: pd.DataFrame, labels_file: Path) -> float | None:
    """LWLRAP against known test labels (the demo data's test_labels.csv), over the scored recordings."""
    if not labels_file.is_file():
        return None
    truth = pd.read_csv(labels_file).set_index("recording_id").loc[submission["recording_id"]]
    return lwlrap(truth.to_numpy(np.float32), submission.drop(columns="recording_id").to_numpy())


def run(request: Request, say: Callable[[str], None] = print) -> tuple[float | None, list[str]]:
    """Score the folder, write and log every output, ``say`` what was written: the test LWLRAP (None without
    test labels) and the recordings that could not be scored."""
    with tempfile.TemporaryDirectory(prefix="rfcx-predict-") as tmp:
        mlrun, scorer = load_run(request.run_id, Path(tmp), request.hop, request.folds)
        data_dir = Path(request.data_dir or mlrun.data.tags.get("data_dir", ""))
        if not str(data_dir) or str(data_dir) == ".":
            raise PredictError(f"run {request.run_id} records no data_dir; pass --data-dir")
        ids, files = recordings_to_score(data_dir, scorer.n_classes)
        if request.need_labels and not (data_dir / LABELS_FILE).is_file():
            raise PredictError(f"--min-lwlrap: {data_dir} has no {LABELS_FILE} to score against")
        settings = dataclasses.replace(scorer.cfg.detect, **request.detect)
        thresholds = detect.thresholds(settings, scorer.n_classes)  # a bad file is refused before scoring
        species = species_table(mlrun, scorer.cfg, Path(tmp))
        log.info("scoring %d recordings in %s: %.1f s windows every %.2f s", len(ids), data_dir, scorer.crop,
                 scorer.hop)
        scored = predict(scorer, ids, files)
    outputs = _Outputs(MlflowClient(), request.run_id, say)
    outputs.csv(scored.submission, request.out,
                f"{len(scored.submission)} recordings, {scorer.n_classes} species (logged to run {request.run_id})")
    found = _detections(scored, scorer, settings, thresholds, species, request, outputs)
    score = test_lwlrap(scored.submission, data_dir / LABELS_FILE)
    if score is not None:
        outputs.client.log_metric(request.run_id, "test_lwlrap", score)
        say(f"test LWLRAP {score:.4f} ({LABELS_FILE}, {len(scored.submission)} recordings)")
    _events(found, scored, data_dir, scorer.n_classes, request, outputs)
    return score, scored.skipped


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """Writes files whole, logs them to the run, and says so."""

    client: MlflowClient
    run_id: str
    say: Callable[[str], None]

    def csv(self, table: pd.DataFrame, out: Path, what: str) -> None:
        write_csv(table, out)
        self.client.log_artifact(self.run_id, str(out))
        self.say(f"wrote {out}: {what}")

    def folder(self, folder: Path, artifacts: str, what: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifacts)
        self.say(what)


def _detections(scored: Scored, scorer: Scorer, settings: DetectConfig, thresholds: np.ndarray,
                species: pd.DataFrame, request: Request, outputs: _Outputs) -> pd.DataFrame:
    """detections.csv, and where asked, a Raven selection table, an Audacity label track and a picture of each
    recording."""
    found = pd.concat([detect.detections(rid, line, thresholds, settings.min_gap_seconds, species)
                       for rid, line in scored.timelines.items()], ignore_index=True)
    per_species = f", per species from {settings.thresholds_file}" if settings.thresholds_file else ""
    outputs.csv(found, request.detections_file,
                f"{len(found)} detections of {found['species_id'].nunique()} species in "
                f"{found['recording_id'].nunique()} recordings (threshold {settings.threshold:g}{per_species}, "
                f"gaps under {settings.min_gap_seconds:g} s joined)")
    names = dict(zip(species["species_id"], species["name"]))
    by_recording = {rid: found[found["recording_id"] == rid] for rid in scored.timelines}
    for folder, write, suffix, artifacts, what in (
            (request.raven, raven.write_raven, raven.RAVEN_SUFFIX, "raven", "Raven selection tables"),
            (request.audacity, raven.write_audacity, raven.AUDACITY_SUFFIX, "audacity", "Audacity label tracks")):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            for rid, rows in by_recording.items():
                write(rows, folder / f"{rid}{suffix}", names)
            outputs.folder(folder, artifacts, f"wrote {len(by_recording)} {what} into {folder}")
    if request.plots:
        request.plots.mkdir(parents=True, exist_ok=True)
        for rid, line in tqdm(scored.timelines.items(), desc="pictures", unit="rec", file=sys.stderr):
            fig = detect.picture(scorer.features, scorer.read(scored.files[rid]), line,
                                 by_recording[rid], thresholds, names, rid)
            fig.savefig(request.plots / f"{rid}.png", dpi=100)
        outputs.folder(request.plots, "plots", f"drew {len(scored.timelines)} recordings into {request.plots}")
    return found


def _events(found: pd.DataFrame, scored: Scored, data_dir: Path, n_classes: int, request: Request,
            outputs: _Outputs) -> None:
    """Event-level precision and recall, where the folder holds every call (the demo data's test_calls.csv)."""
    events = event_scores(found, scored.submission["recording_id"], data_dir / CALLS_FILE, n_classes)
    if events is None:
        return
    overall = events.set_index("species_id").loc["all"]
    for name in ("precision", "recall"):
        outputs.client.log_metric(request.run_id, f"event_{name}", float(overall[name]))
    events_file = request.detections_file.with_name(EVENTS_FILE)
    outputs.csv(events, events_file, "per species event scores")
    outputs.say(f"events: precision {overall['precision']:.4f} ({overall['right']:.0f} of "
                f"{overall['detections']:.0f} detections on a true call), recall {overall['recall']:.4f} "
                f"({overall['found']:.0f} of {overall['calls']:.0f} calls found)")


def write_csv(table: pd.DataFrame, out: Path) -> None:
    """``table`` at ``out``, whole or not at all."""
    with atomic_path(out) as partial:
        table.to_csv(partial, index=False, float_format="%.6g")


def event_scores(found: pd.DataFrame, scored_ids: pd.Series, calls_file: Path, n_classes: int) -> pd.DataFrame | None:
    """Event-level precision and recall against the demo data's test_calls.csv, over the scored recordings."""
    if not calls_file.is_file():
        return None
    calls = pd.read_csv(calls_file)
    return detect.event_scores(found, calls[calls["recording_id"].isin(set(scored_ids))], n_classes)
