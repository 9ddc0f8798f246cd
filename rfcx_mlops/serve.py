"""Scoring whole recordings, and the servable MLflow model (``mlflow models serve -m runs:/<run id>/model``).

``Scorer`` slides windows of the run's crop length over a recording (hop: half a
window by default) through the training's mel path; a species' score is its maximum
over the windows, averaged over the models given (a cross-validation run's folds).
``predict`` uses it on folders; ``SpeciesScorer`` is the same scoring as a pyfunc model.

What a server accepts is the operator's choice, made where it starts, in its environment:

    RFCX_SERVE_AUDIO_ROOT   a folder: rows may name audio files in it by ``path``
                            (relative to it, or absolute inside it).  Unset: audio samples only.
    RFCX_SERVE_MAX_SECONDS  the longest recording scored, by path or as samples (default 600)
    RFCX_SERVE_MAX_MB       the largest file read by path, in MB (default 100)

A request outside these limits gets HTTP 400 (403 for a path outside the root) with
one line saying why, and the server goes on serving.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import soxr
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, PERMISSION_DENIED

from rfcx_mlops import audio, detect
from rfcx_mlops.config import Config, ConfigError, UserError, from_dict, to_yaml
from rfcx_mlops.features import MelFeatures
from rfcx_mlops.model import frame_model

log = logging.getLogger("rfcx_mlops.serve")
MODEL_DIR = "model"  # the run's logged model: runs:/<run id>/model
WEIGHTS_FILE = "servable.keras"  # the best epoch's weights, without optimizer state, inside the logged model


class ModelError(UserError):
    """A run whose models cannot be scored with; the message names it."""


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
        self.hop = self.crop / 2 if hop_seconds is None else hop_seconds
        if self.hop <= 0:
            raise ConfigError(f"--hop must be > 0 seconds; got {self.hop:g}")
        self.features = MelFeatures(cfg.features, self.sample_rate)
        self.n_classes = int(models[0].output_shape[-1])
        frame_models = [frame_model(m) for m in models]
        self.frame_models = None if any(m is None for m in frame_models) else frame_models

    def starts(self, y: np.ndarray) -> np.ndarray:
        """Where ``inputs``' windows of ``y`` start, in seconds."""
        return window_starts(max(len(y), self.cfg.data.window_samples) / self.sample_rate, self.crop, self.hop)

    def inputs(self, y: np.ndarray) -> np.ndarray:
        """The model input for every window of ``y``: images, or the windows themselves where the model makes them."""
        n = self.cfg.data.window_samples
        y = np.pad(y, (0, max(0, n - len(y))))
        starts = self.starts(y)
        windows = np.stack([y[int(round(s * self.sample_rate)):][:n] for s in starts]).astype(np.float32)
        if self.cfg.features.backend == "tensorflow":
            return windows
        return np.stack([self.features(w) for w in windows])[..., None]

    def scores(self, y: np.ndarray) -> np.ndarray:
        """(n_classes,) float32: per model the maximum over windows, then the mean over models."""
        return self.pooled(self.inputs(y))

    def pooled(self, x: np.ndarray) -> np.ndarray:
        """``scores`` from the windows' model input (``inputs``)."""
        return _recording_scores(self.window_scores(x))

    def timeline(self, y: np.ndarray) -> tuple[np.ndarray, detect.Timeline]:
        """``scores(y)``, and the scores over time: of each window (the models' mean), or with an attention head
        of each step within the windows, crop / steps seconds long."""
        x, starts = self.inputs(y), self.starts(y)
        windows = self.window_scores(x)
        scores = _recording_scores(windows)
        if self.frame_models is None:
            return scores, detect.timeline(starts, self.crop, windows.mean(axis=0))
        steps = np.mean([np.asarray(m.predict_on_batch(x)) for m in self.frame_models], axis=0)  # (windows, steps, n)
        step = self.crop / steps.shape[1]
        step_starts = (starts[:, None] + step * np.arange(steps.shape[1])).ravel()
        return scores, detect.timeline(step_starts, step, steps.reshape(-1, steps.shape[2]))

    def window_scores(self, x: np.ndarray) -> np.ndarray:
        """(models, windows, n_classes): each model's scores of each window (``inputs``)."""
        return np.stack([np.asarray(m.predict_on_batch(x)) for m in self.models])

    def read(self, path: str | Path) -> np.ndarray:
        info = audio.probe(path)
        return audio.read_window(info, 0.0, info.duration, self.sample_rate)


def _recording_scores(window_scores: np.ndarray) -> np.ndarray:
    """(models, windows, n_classes) -> (n_classes,): per model the maximum over windows, then the mean over models."""
    return window_scores.max(axis=1).mean(axis=0)


def _refuse(message: str, code=INVALID_PARAMETER_VALUE) -> MlflowException:
    return MlflowException(message, error_code=code)  # the scoring server answers 400 (403 for PERMISSION_DENIED)


@dataclass(frozen=True)
class Limits:
    """What a served model reads: see the module's docstring."""

    audio_root: Path | None = None
    max_seconds: float = 600.0
    max_mb: float = 100.0

    @classmethod
    def from_environment(cls) -> Limits:
        def number(name: str, default: float) -> float:
            text = os.environ.get(name, "")
            try:
                value = float(text) if text else default
            except ValueError:
                value = -1.0
            if not value > 0:
                raise ConfigError(f"{name}={text!r}: expected a number > 0")
            return value

        root = os.environ.get("RFCX_SERVE_AUDIO_ROOT", "")
        if root and not Path(root).is_dir():
            raise ConfigError(f"RFCX_SERVE_AUDIO_ROOT={root}: no such folder")
        return cls(Path(root).resolve() if root else None, number("RFCX_SERVE_MAX_SECONDS", cls.max_seconds),
                   number("RFCX_SERVE_MAX_MB", cls.max_mb))

    def file(self, path: str) -> audio.AudioInfo:
        """The audio file a request names, once it passes every limit."""
        if self.audio_root is None:
            raise _refuse("this server reads no files: send audio samples and their sample_rate "
                          "(reading files is enabled where the server starts, with RFCX_SERVE_AUDIO_ROOT)",
                          PERMISSION_DENIED)
        resolved = (self.audio_root / path).resolve()
        if not resolved.is_relative_to(self.audio_root):
            raise _refuse(f"path {path!r} is outside the folder this server reads ({self.audio_root})",
                          PERMISSION_DENIED)
        if not resolved.is_file():
            raise _refuse(f"path {path!r}: no such file under {self.audio_root}")
        size_mb = resolved.stat().st_size / 1e6
        if size_mb > self.max_mb:
            raise _refuse(f"path {path!r}: {size_mb:.1f} MB is over this server's limit of {self.max_mb:g} MB")
        try:
            info = audio.probe(resolved)
        except audio.AudioError as exc:
            raise _refuse(str(exc).replace(str(resolved), repr(path))) from None
        self.duration(info.duration, f"path {path!r}")
        return info

    def duration(self, seconds: float, what: str) -> None:
        if seconds > self.max_seconds:
            raise _refuse(f"{what}: {seconds:.1f} s of audio is over this server's limit of {self.max_seconds:g} s")


class SpeciesScorer(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: rows of ``audio`` (samples) with ``sample_rate``, or of ``path`` where allowed -> s0..s23."""

    def load_context(self, context):
        self.limits = Limits.from_environment()
        cfg = from_dict(yaml.safe_load(Path(context.artifacts["config"]).read_text()))
        self.scorer = Scorer([keras.models.load_model(context.artifacts["keras_model"], compile=False)], cfg)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rate_out = self.scorer.sample_rate
        scores = []
        for row in model_input.to_dict("records"):
            path, samples = row.get("path"), row.get("audio")
            if isinstance(path, str) and path:
                info = self.limits.file(path)
                y = audio.read_window(info, 0.0, info.duration, rate_out)
            elif samples is not None and not (np.isscalar(samples) and pd.isna(samples)):
                rate = int(row.get("sample_rate") or 0)
                if not 0 < rate <= 384_000:
                    raise _refuse(f"a row with audio needs its sample_rate (1..384000 Hz); got {rate}")
                self.limits.duration(len(samples) / rate, "audio")
                y = np.asarray(samples, dtype=np.float32)
                if rate != rate_out:
                    y = soxr.resample(y, rate, rate_out, quality="HQ").astype(np.float32)
            else:
                raise _refuse("each row needs audio samples and their sample_rate (or a path, where the server "
                              "reads files)")
            scores.append(self.scorer.scores(y))
        return pd.DataFrame(scores, columns=[f"s{i}" for i in range(self.scorer.n_classes)])


def log_servable(model: keras.Model, cfg: Config, folder: Path) -> str:
    """Log ``model`` (uncompiled: ``model.weights_only``) with its config as the run's pyfunc model; its URI.

    MLflow 3 stores it as a logged model linked to the run: ``runs:/<run id>/model``,
    or the ``models:/<model id>`` URI the run's ``model_uri`` tag holds.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    weights = folder / WEIGHTS_FILE
    model.save(weights)
    (folder / "servable.yaml").write_text(to_yaml(cfg))
    n = int(model.output_shape[-1])
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "path", required=False),
                       ColSpec(Array(DataType.double), "audio", required=False),
                       ColSpec(DataType.long, "sample_rate", required=False)]),
        outputs=Schema([ColSpec(DataType.float, f"s{i}") for i in range(n)]),
    )
    example = pd.DataFrame({"audio": [[0.0] * 1600], "sample_rate": [16000]})
    info = mlflow.pyfunc.log_model(name=MODEL_DIR, python_model=str(Path(__file__).with_name("servable_model.py")),
                                   signature=signature,
                                   input_example=example,
                                   artifacts={"keras_model": str(weights), "config": str(folder / "servable.yaml")},
                                   code_paths=[str(Path(__file__).parent)], pip_requirements=_requirements())
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri


def _run_models(run: mlflow.entities.Run, folder: Path) -> tuple[list[keras.Model], list[str]]:
    """The logged model (the best epoch's weights) of the run, or of each fold of a cross-validation run."""
    client = MlflowClient()
    if run.data.tags.get("cv") == "true":
        runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                  "and attributes.status = 'FINISHED'", order_by=["tags.fold ASC"])
        if not runs:
            raise ModelError(f"run {run.info.run_id} is a cross-validation run with no finished fold")
    else:
        runs = [run]
    models = []
    for r in runs:
        model_uri = r.data.tags.get("model_uri")
        if not model_uri and r.info.status == "FINISHED":
            raise ModelError(f"run {r.info.run_id} has no model: a tuning trial keeps none (unless tune "
                             "--keep-models); retrain its values with python -m rfcx_mlops.train")
        if not model_uri:
            raise ModelError(f"run {r.info.run_id} has no model: it is {r.info.status} (a model is logged when "
                             f"training finishes; resume it with python -m rfcx_mlops.train --resume {r.info.run_id})")
        try:
            path = download_weights(model_uri, folder / r.info.run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise ModelError(f"run {r.info.run_id}: its model {model_uri} cannot be read "
                             f"({str(exc).splitlines()[0]})") from None
        models.append(keras.models.load_model(path, compile=False))
    return models, [r.info.run_id for r in runs]


def load_run(run_id: str, folder: Path, hop_seconds: float | None = None) -> tuple[mlflow.entities.Run, Scorer]:
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"run {run_id} not found in {mlflow.get_tracking_uri()}") from None
    try:
        cfg = logged_config(run)
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"run {run_id} has no config.yaml: not a training run") from None
    models, ids = _run_models(run, folder)
    log.info("run %s: %d model(s) from %s", run_id, len(models), ", ".join(ids))
    return run, Scorer(models, cfg, hop_seconds)


def species_table(run: mlflow.entities.Run, cfg: Config, folder: Path) -> pd.DataFrame:
    """The run's species.csv (``detect.species_table``); a run from before it was logged gets every species
    named s<id>, over the features' band."""
    try:
        return pd.read_csv(MlflowClient().download_artifacts(run.info.run_id, detect.SPECIES_FILE, str(folder)))
    except (mlflow.exceptions.MlflowException, OSError):
        log.warning("run %s has no %s: detections are banded %g-%g Hz", run.info.run_id, detect.SPECIES_FILE,
                    cfg.features.fmin, cfg.features.fmax)
        return detect.species_table(pd.DataFrame(columns=["species_id", "f_min", "f_max"]), cfg.data.n_classes,
                                    cfg.features.fmin, cfg.features.fmax)


def logged_config(run: mlflow.entities.Run) -> Config:
    """The config ``run`` was started with, read back from its config.yaml (MlflowException where it has none)."""
    return from_dict(yaml.safe_load(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")))


def download_weights(model_uri: str, dst: Path, client: MlflowClient | None = None) -> Path:
    """The Keras file inside a logged model (``models:/<id>``, a run's ``model_uri`` tag), downloaded to ``dst``."""
    client = client or MlflowClient()
    model = client.get_logged_model(model_uri.removeprefix("models:/"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/artifacts/{WEIGHTS_FILE}",
                                                    dst_path=str(dst), tracking_uri=client.tracking_uri))


# What this module and the modules it imports need, which is all a served model runs.
SERVING_PACKAGES = ("tensorflow", "keras", "numpy", "pandas", "scipy", "librosa", "soundfile", "soxr", "pyyaml",
                    "mlflow")


def _requirements() -> list[str]:
    """The pins of the packages serving needs: a model served elsewhere gets the versions it was trained with."""
    from importlib.metadata import requires

    pins = [r for r in requires("rfcx_mlops") or [] if "extra ==" not in r]
    return [r for r in pins if r.split("==")[0].lower() in SERVING_PACKAGES]
