"""Score recordings with a trained run: ``python -m rfcx_mlops.predict --run-id ID``.

Each recording is scored by ``serve.Scorer`` (sliding windows, the maximum over them)
with the run's model, or the mean of a cross-validation run's fold models.  The result
is ``recording_id,s0..s23`` in sample_submission.csv order, written and logged to the run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from rfcx_mlops import audio, dataset, tracking
from rfcx_mlops.config import ConfigError
from rfcx_mlops.metrics import lwlrap
from rfcx_mlops.serve import Scorer, download_weights

log = logging.getLogger("rfcx_mlops.predict")
LABELS_FILE = "test_labels.csv"  # the demo data's test truth


class PredictError(ValueError):
    """A run, folder or file prediction cannot use; the message names it."""


def _run_models(run: mlflow.entities.Run, folder: Path) -> tuple[list[keras.Model], list[str]]:
    """The logged model (the best epoch's weights) of the run, or of each fold of a cross-validation run."""
    client = MlflowClient()
    if run.data.tags.get("cv") == "true":
        runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                  "and attributes.status = 'FINISHED'", order_by=["tags.fold ASC"])
        if not runs:
            raise PredictError(f"run {run.info.run_id} is a cross-validation run with no finished fold")
    else:
        runs = [run]
    models = []
    for r in runs:
        model_uri = r.data.tags.get("model_uri")
        if not model_uri:
            raise PredictError(f"run {r.info.run_id} has no model: it is {r.info.status} (a model is logged when "
                               "training finishes; resume it with python -m rfcx_mlops.train --resume "
                               f"{r.info.run_id})")
        try:
            path = download_weights(model_uri, folder / r.info.run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise PredictError(f"run {r.info.run_id}: its model {model_uri} cannot be read "
                               f"({str(exc).splitlines()[0]})") from None
        models.append(keras.models.load_model(path, compile=False))
    return models, [r.info.run_id for r in runs]


def load_run(run_id: str, folder: Path, hop_seconds: float | None = None) -> tuple[mlflow.entities.Run, Scorer]:
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PredictError(f"run {run_id} not found in {mlflow.get_tracking_uri()}") from None
    try:
        cfg = tracking.logged_config(run)
    except mlflow.exceptions.MlflowException:
        raise PredictError(f"run {run_id} has no config.yaml: not a training run") from None
    models, ids = _run_models(run, folder)
    log.info("run %s: %d model(s) from %s", run_id, len(models), ", ".join(ids))
    return run, Scorer(models, cfg, hop_seconds)


def recordings(data_dir: Path, n_classes: int) -> tuple[list[str], dict[str, Path]]:
    """Recording ids in submission order and their files: DIR/test/ with DIR/sample_submission.csv, or DIR's own files."""
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
    if species != [f"s{i}" for i in range(n_classes)]:
        raise PredictError(f"{template}: {len(species)} species columns, but the model scores {n_classes} "
                           f"(expected recording_id,s0..s{n_classes - 1})")
    ids = pd.read_csv(template, usecols=["recording_id"], dtype=str, keep_default_na=False)["recording_id"]
    return [dataset.check_recording_id(rid, f"{template} line {line}") for line, rid in enumerate(ids, 2)], files


def predict(scorer: Scorer, ids: list[str], files: dict[str, Path]) -> tuple[pd.DataFrame, list[str]]:
    """The submission table and the recordings that could not be scored (missing or unreadable)."""
    rows, skipped = {}, []
    for rid in tqdm(ids, desc="recordings", unit="rec", file=sys.stderr):
        try:
            if rid not in files:
                raise audio.AudioError(f"{rid}: no .flac or .wav file")
            rows[rid] = scorer.scores(scorer.read(files[rid]))
        except audio.AudioError as exc:
            log.warning("skipped %s", exc)
            skipped.append(str(exc))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[f"s{i}" for i in range(scorer.n_classes)])
    return table.rename_axis("recording_id").reset_index(), skipped


def test_lwlrap(submission: pd.DataFrame, labels_file: Path) -> float | None:
    """LWLRAP against known test labels (the demo data's test_labels.csv), over the scored recordings."""
    if not labels_file.is_file():
        return None
    truth = pd.read_csv(labels_file).set_index("recording_id").loc[submission["recording_id"]]
    return lwlrap(truth.to_numpy(np.float32), submission.drop(columns="recording_id").to_numpy())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rfcx_mlops.predict",
                                description="Score recordings with a trained run; write a submission CSV.")
    p.add_argument("--run-id", required=True, help="a training run, or a cross-validation run (its folds averaged)")
    p.add_argument("--data-dir", default="",
                   help="folder with test/ and sample_submission.csv, or a folder of audio files "
                        "(default: the folder the run trained on)")
    p.add_argument("--out", default="submission.csv", help="output CSV (default submission.csv)")
    p.add_argument("--hop", type=lambda s: float(s) if s else None, default=None,
                   help="seconds between windows (default: half a window)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="rfcx-predict-") as tmp:
        mlrun, scorer = load_run(args.run_id, Path(tmp), args.hop)
        data_dir = Path(args.data_dir or mlrun.data.tags.get("data_dir", ""))
        if not str(data_dir) or str(data_dir) == ".":
            raise PredictError(f"run {args.run_id} records no data_dir; pass --data-dir")
        ids, files = recordings(data_dir, scorer.n_classes)
        log.info("scoring %d recordings in %s: %.1f s windows every %.2f s", len(ids), data_dir, scorer.crop,
                 scorer.hop)
        submission, skipped = predict(scorer, ids, files)
    out = Path(args.out)
    tmp_out = out.with_name(f".{out.name}.partial")
    submission.to_csv(tmp_out, index=False, float_format="%.6g")
    tmp_out.replace(out)
    client = MlflowClient()
    client.log_artifact(args.run_id, str(out))
    print(f"wrote {out}: {len(submission)} recordings, {scorer.n_classes} species (logged to run {args.run_id})")
    score = test_lwlrap(submission, data_dir / LABELS_FILE)
    if score is not None:
        client.log_metric(args.run_id, "test_lwlrap", score)
        print(f"test LWLRAP {score:.4f} ({LABELS_FILE}, {len(submission)} recordings)")
    if skipped:
        print(f"error: {len(skipped)} recording(s) could not be scored and have no row:", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except (PredictError, ConfigError, dataset.DataError, audio.AudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
