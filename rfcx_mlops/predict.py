"""Score recordings with a trained run: ``python -m rfcx_mlops.predict --run-id ID``.

Windows of the run's crop length slide over each recording (hop: half a window by
default) through the same mel path as training; a species' score is its maximum over
the windows.  A cross-validation run's fold models are averaged.  The result is
``recording_id,s0..s23`` in sample_submission.csv order, written and logged to the
run.  ``SpeciesScorer`` is the same scoring as an MLflow pyfunc model.
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
import soxr
import yaml
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from rfcx_mlops import audio, dataset, tracking
from rfcx_mlops.config import Config, ConfigError, from_dict, to_yaml
from rfcx_mlops.features import MelFeatures
from rfcx_mlops.metrics import lwlrap

log = logging.getLogger("rfcx_mlops.predict")
LABELS_FILE = "test_labels.csv"  # the demo data's test truth
MODEL_DIR = "model"


class PredictError(ValueError):
    """A run, folder or file prediction cannot use; the message names it."""


def window_starts(duration: float, crop: float, hop: float) -> np.ndarray:
    """Window starts from 0 every ``hop`` seconds; the last window ends with the recording."""
    if duration <= crop:
        return np.zeros(1)
    starts = np.arange(0.0, duration - crop, hop)
    return np.append(starts, duration - crop)


class Scorer:
    """Keras models trained on one config -> species scores of a whole recording."""

    def __init__(self, models: list[keras.Model], cfg: Config, hop_seconds: float | None = None):
        self.models, self.cfg = models, cfg
        self.sample_rate = cfg.data.sample_rate
        self.crop = cfg.data.crop_seconds
        self.hop = hop_seconds or self.crop / 2
        if self.hop <= 0:
            raise ConfigError(f"--hop must be > 0 seconds; got {self.hop:g}")
        self.features = MelFeatures(cfg.features, self.sample_rate)
        self.n_classes = int(models[0].output_shape[-1])

    def inputs(self, y: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """The model input for every window of ``y``: images, or the windows themselves where the model makes them."""
        n = int(round(self.crop * self.sample_rate))
        y = np.pad(y, (0, max(0, n - len(y))))
        starts = window_starts(len(y) / self.sample_rate, self.crop, self.hop)
        windows = np.stack([y[int(round(s * self.sample_rate)):][:n] for s in starts]).astype(np.float32)
        if self.cfg.features.backend == "tensorflow":
            return {"audio": windows, "semitones": np.zeros(len(windows), np.int32),
                    "gain_db": np.zeros(len(windows), np.float32)}
        return np.stack([self.features(w) for w in windows])[..., None]

    def scores(self, y: np.ndarray) -> np.ndarray:
        """(n_classes,) float32: per model the maximum over windows, then the mean over models."""
        x = self.inputs(y)
        return np.mean([np.asarray(m.predict_on_batch(x)).max(axis=0) for m in self.models], axis=0)

    def read(self, path: str | Path) -> np.ndarray:
        info = audio.probe(path)
        return audio.read_window(info, 0.0, info.duration, self.sample_rate)


def _run_models(run: mlflow.entities.Run, folder: Path) -> tuple[list[keras.Model], list[str]]:
    """The best checkpoint of the run, or of each fold of a cross-validation run."""
    client = MlflowClient()
    if run.data.tags.get("cv") == "true":
        folds = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                   "and attributes.status = 'FINISHED'", order_by=["tags.fold ASC"])
        if not folds:
            raise PredictError(f"run {run.info.run_id} is a cross-validation run with no finished fold")
        ids = [r.info.run_id for r in folds]
    else:
        ids = [run.info.run_id]
    models = []
    for rid in ids:
        try:
            path = tracking.download_checkpoint(rid, "best", folder / rid)
        except mlflow.exceptions.MlflowException:
            raise PredictError(f"run {rid} has no model (checkpoints/best.keras); did it finish an epoch?") from None
        models.append(keras.models.load_model(path, compile=False))
    return models, ids


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
    return pd.read_csv(template, usecols=["recording_id"])["recording_id"].astype(str).tolist(), files


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


# --- the servable model --------------------------------------------------------------------------------------


class SpeciesScorer(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: rows of ``path`` (an audio file) or ``audio`` (samples) with ``sample_rate`` -> s0..s23."""

    def load_context(self, context):
        cfg = from_dict(yaml.safe_load(Path(context.artifacts["config"]).read_text()))
        self.scorer = Scorer([keras.models.load_model(context.artifacts["keras_model"], compile=False)], cfg)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        scores = []
        for row in model_input.to_dict("records"):
            path, samples = row.get("path"), row.get("audio")
            if isinstance(path, str) and path:
                y = self.scorer.read(path)
            elif samples is not None and not (np.isscalar(samples) and pd.isna(samples)):
                rate = int(row.get("sample_rate") or 0)
                if rate <= 0:
                    raise ValueError("a row with audio needs its sample_rate")
                y = np.asarray(samples, dtype=np.float32)
                if rate != self.scorer.sample_rate:
                    y = soxr.resample(y, rate, self.scorer.sample_rate, quality="HQ").astype(np.float32)
            else:
                raise ValueError("each row needs a path to an audio file, or audio samples and their sample_rate")
            scores.append(self.scorer.scores(y))
        return pd.DataFrame(scores, columns=[f"s{i}" for i in range(self.scorer.n_classes)])


def log_servable(model: keras.Model, cfg: Config, folder: Path) -> None:
    """Log ``model`` (weights only) with its config as the run's pyfunc model ``model``.

    MLflow 3 stores it as a logged model linked to the run: ``runs:/<run id>/model``,
    or the ``models:/<model id>`` URI the run's ``model_uri`` tag holds.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    weights = folder / "servable.keras"
    clone = keras.models.clone_model(model)  # uncompiled: saved without optimizer state
    clone.set_weights(model.get_weights())
    clone.save(weights)
    (folder / "servable.yaml").write_text(to_yaml(cfg))
    n = int(model.output_shape[-1])
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "path", required=False),
                       ColSpec(Array(DataType.double), "audio", required=False),
                       ColSpec(DataType.long, "sample_rate", required=False)]),
        outputs=Schema([ColSpec(DataType.float, f"s{i}") for i in range(n)]),
    )
    example = pd.DataFrame({"audio": [[0.0] * 1600], "sample_rate": [16000]})
    info = mlflow.pyfunc.log_model(name=MODEL_DIR, python_model=SpeciesScorer(), signature=signature,
                                   input_example=example,
                                   artifacts={"keras_model": str(weights), "config": str(folder / "servable.yaml")},
                                   code_paths=[str(Path(__file__).parent)], pip_requirements=_requirements())
    mlflow.set_tag("model_uri", info.model_uri)


def _requirements() -> list[str]:
    """The package's pinned dependencies: a model served elsewhere gets the versions it was trained with."""
    from importlib.metadata import requires

    return [r for r in requires("rfcx_mlops") or [] if "extra ==" not in r]


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
    except (PredictError, ConfigError, audio.AudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
