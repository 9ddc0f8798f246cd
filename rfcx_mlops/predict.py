"""Score recordings with a trained run: ``python -m rfcx_mlops.predict --run-id ID``.

Each recording is scored by ``serve.Scorer`` (sliding windows, the maximum over them)
with the run's model, or the mean of a cross-validation run's fold models.  The result
is ``recording_id,s0..s23`` in sample_submission.csv order, written and logged to the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from rfcx_mlops import audio, cli, dataset, detect
from rfcx_mlops.config import Config, DetectConfig, UserError

log = logging.getLogger("rfcx_mlops.predict")
LABELS_FILE = "test_labels.csv"  # the demo data's test truth
CALLS_FILE = "test_calls.csv"  # ... and when each test call happens
DETECTIONS_FILE = "detections.csv"
EVENTS_FILE = "event_scores.csv"


class PredictError(UserError):
    """A run, folder or file prediction cannot use; the message names it."""


def recordings(data_dir: Path, n_classes: int | None) -> tuple[list[str], dict[str, Path]]:
    """Recording ids in submission order and their files: DIR/test/ with DIR/sample_submission.csv, or DIR's own files.

    ``n_classes``: the species columns sample_submission.csv must have (None: not checked yet).
    """
    folder = data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    if not folder.is_dir():
        raise PredictError(f"{data_dir}: no such folder")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in audio.AUDIO_SUFFIXES}
    if not files:
        raise PredictError(f"{folder}: no .flac or .wav files")
    template = data_dir / dataset.SUBMISSION_FILE
    if not template.is_file():
        return sorted(files), files
    header = pd.read_csv(template, nrows=0).columns
    species = [c for c in header if c != "recording_id"]
    if n_classes is not None and species != [f"s{i}" for i in range(n_classes)]:
        raise PredictError(f"{template}: {len(species)} species columns, but the model scores {n_classes} "
                           f"(expected recording_id,s0..s{n_classes - 1})")
    ids = pd.read_csv(template, usecols=["recording_id"], dtype=str, keep_default_na=False)["recording_id"]
    return [dataset.check_recording_id(rid, f"{template} line {line}") for line, rid in enumerate(ids, 2)], files


@dataclasses.dataclass
class Scored:
    """A folder's submission table, each recording's scores over time, and the recordings not scored."""

    submission: pd.DataFrame
    timelines: dict[str, detect.Timeline]
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
    return Scored(table.rename_axis("recording_id").reset_index(), timelines, skipped)


def test_lwlrap(submission: pd.DataFrame, labels_file: Path) -> float | None:
    """LWLRAP against known test labels (the demo data's test_labels.csv), over the scored recordings."""
    from rfcx_mlops.metrics import lwlrap  # scikit-learn: only where there is something to score

    if not labels_file.is_file():
        return None
    truth = pd.read_csv(labels_file).set_index("recording_id").loc[submission["recording_id"]]
    return lwlrap(truth.to_numpy(np.float32), submission.drop(columns="recording_id").to_numpy())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m rfcx_mlops.predict",
                   description="Score recordings with a trained run; write a submission CSV.")
    p.add_argument("--run-id", required=True, help="a training run, or a cross-validation run (its folds averaged)")
    p.add_argument("--data-dir", default="",
                   help="folder with test/ and sample_submission.csv, or a folder of audio files "
                        "(default: the folder the run trained on)")
    p.add_argument("--out", default="submission.csv", help="output CSV (default submission.csv)")
    p.add_argument("--hop", type=lambda s: cli.positive_seconds(s) if s else None, default=None,
                   help="seconds between windows (default: half a window)")
    p.add_argument("--min-lwlrap", type=float, default=None, metavar="X",
                   help=f"exit 1 when the test LWLRAP (the demo data's {LABELS_FILE}) is below X: a gate")
    p.add_argument("--detections", default="", metavar="FILE",
                   help="where the detections go (default: detections.csv beside --out)")
    p.add_argument("--threshold", type=cli.probability, default=None, metavar="X",
                   help="score a detection needs (default: the run's detect.threshold)")
    p.add_argument("--thresholds", default=None, metavar="FILE",
                   help="a CSV species_id,threshold for the species it lists (default: the run's detect.thresholds_file)")
    p.add_argument("--min-gap", type=cli.seconds, default=None, metavar="SECONDS",
                   help="join a species' detections closer than this (default: the run's detect.min_gap_seconds)")
    p.add_argument("--raven", default="", metavar="DIR",
                   help="also write one Raven Pro selection table per recording into DIR")
    p.add_argument("--audacity", default="", metavar="DIR",
                   help="also write one Audacity label track per recording into DIR")
    p.add_argument("--plots", default="", metavar="DIR",
                   help="also draw each recording into DIR: its spectrogram with the detections, its top species' scores")
    cli.add_verbose(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.data_dir:
        recordings(Path(args.data_dir), n_classes=None)  # a bad folder is refused before the models load
    if args.thresholds and not Path(args.thresholds).is_file():
        raise PredictError(f"--thresholds: {args.thresholds} is not a file")
    for flag, folder in (("--raven", args.raven), ("--audacity", args.audacity), ("--plots", args.plots)):
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise PredictError(f"{flag}: {folder} is a file, not a folder")
    serve = cli.import_quietly("rfcx_mlops.serve", args.verbose)
    from mlflow.tracking import MlflowClient  # loaded with the models above

    with tempfile.TemporaryDirectory(prefix="rfcx-predict-") as tmp:
        mlrun, scorer = serve.load_run(args.run_id, Path(tmp), args.hop)
        data_dir = Path(args.data_dir or mlrun.data.tags.get("data_dir", ""))
        if not str(data_dir) or str(data_dir) == ".":
            raise PredictError(f"run {args.run_id} records no data_dir; pass --data-dir")
        ids, files = recordings(data_dir, scorer.n_classes)
        if args.min_lwlrap is not None and not (data_dir / LABELS_FILE).is_file():
            raise PredictError(f"--min-lwlrap: {data_dir} has no {LABELS_FILE} to score against")
        settings = _detect_settings(scorer.cfg, args)
        thresholds = detect.thresholds(settings, scorer.n_classes)
        species = serve.species_table(mlrun, scorer.cfg, Path(tmp))
        log.info("scoring %d recordings in %s: %.1f s windows every %.2f s", len(ids), data_dir, scorer.crop,
                 scorer.hop)
        scored = predict(scorer, ids, files)
    submission = scored.submission
    out = Path(args.out)
    _write_csv(submission, out)
    client = MlflowClient()
    client.log_artifact(args.run_id, str(out))
    print(f"wrote {out}: {len(submission)} recordings, {scorer.n_classes} species (logged to run {args.run_id})")
    found = pd.concat([detect.detections(rid, line, thresholds, settings.min_gap_seconds, species)
                       for rid, line in scored.timelines.items()], ignore_index=True)
    detections_file = Path(args.detections) if args.detections else out.with_name(DETECTIONS_FILE)
    _write_csv(found, detections_file)
    client.log_artifact(args.run_id, str(detections_file))
    print(f"wrote {detections_file}: {len(found)} detections of {found['species_id'].nunique()} species "
          f"in {found['recording_id'].nunique()} recordings (threshold {_threshold_text(settings)}, "
          f"gaps under {settings.min_gap_seconds:g} s joined)")
    names = dict(zip(species["species_id"], species["name"]))
    by_recording = {rid: found[found["recording_id"] == rid] for rid in scored.timelines}
    for where, write, suffix, artifacts, what in (
            (args.raven, detect.write_raven, detect.RAVEN_SUFFIX, "raven", "Raven selection tables"),
            (args.audacity, detect.write_audacity, detect.AUDACITY_SUFFIX, "audacity", "Audacity label tracks")):
        if not where:
            continue
        folder = Path(where)
        folder.mkdir(parents=True, exist_ok=True)
        for rid, rows in by_recording.items():
            write(rows, folder / f"{rid}{suffix}", names)
        client.log_artifacts(args.run_id, str(folder), artifacts)
        print(f"wrote {len(scored.timelines)} {what} into {folder}")
    if args.plots:
        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        for rid, line in tqdm(scored.timelines.items(), desc="pictures", unit="rec", file=sys.stderr):
            fig = detect.picture(scorer.features, scorer.read(files[rid]), line, by_recording[rid], thresholds, names,
                                 rid)
            fig.savefig(folder / f"{rid}.png", dpi=100)
        client.log_artifacts(args.run_id, str(folder), "plots")
        print(f"drew {len(scored.timelines)} recordings into {folder}")
    score = test_lwlrap(submission, data_dir / LABELS_FILE)
    if score is not None:
        client.log_metric(args.run_id, "test_lwlrap", score)
        print(f"test LWLRAP {score:.4f} ({LABELS_FILE}, {len(submission)} recordings)")
    events = event_scores(found, submission["recording_id"], data_dir / CALLS_FILE, scorer.n_classes)
    if events is not None:
        events_file = detections_file.with_name(EVENTS_FILE)
        _write_csv(events, events_file)
        client.log_artifact(args.run_id, str(events_file))
        overall = events.set_index("species_id").loc["all"]
        for name in ("precision", "recall"):
            client.log_metric(args.run_id, f"event_{name}", float(overall[name]))
        print(f"events: precision {overall['precision']:.4f} ({overall['right']:.0f} of {overall['detections']:.0f} "
              f"detections on a true call), recall {overall['recall']:.4f} ({overall['found']:.0f} of "
              f"{overall['calls']:.0f} calls found); per species in {events_file}")
    if scored.skipped:
        print(f"error: {len(scored.skipped)} recording(s) could not be scored and have no row:", file=sys.stderr)
        for line in scored.skipped:
            print(f"  {line}", file=sys.stderr)
        return 1
    if args.min_lwlrap is not None and score < args.min_lwlrap:
        print(f"error: test LWLRAP {score:.4f} is below the gate --min-lwlrap {args.min_lwlrap:g}", file=sys.stderr)
        return 1
    return 0


def _detect_settings(cfg: Config, args: argparse.Namespace) -> DetectConfig:
    """The run's detect settings, with what the command line changes."""
    given = {"threshold": args.threshold, "thresholds_file": args.thresholds, "min_gap_seconds": args.min_gap}
    return dataclasses.replace(cfg.detect, **{k: v for k, v in given.items() if v is not None})


def _threshold_text(settings: DetectConfig) -> str:
    per_species = f", per species from {settings.thresholds_file}" if settings.thresholds_file else ""
    return f"{settings.threshold:g}{per_species}"


def _write_csv(table: pd.DataFrame, out: Path) -> None:
    """``table`` at ``out``, whole or not at all (written beside it, then moved)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    table.to_csv(partial, index=False, float_format="%.6g")
    partial.replace(out)


def event_scores(found: pd.DataFrame, scored_ids: pd.Series, calls_file: Path, n_classes: int) -> pd.DataFrame | None:
    """Event-level precision and recall against the demo data's test_calls.csv, over the scored recordings."""
    if not calls_file.is_file():
        return None
    calls = pd.read_csv(calls_file)
    return detect.event_scores(found, calls[calls["recording_id"].isin(set(scored_ids))], n_classes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup(args.verbose)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
