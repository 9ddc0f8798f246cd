"""Scoring whole recordings with a run's models.

``Scorer`` slides windows of the run's crop length over a recording (hop: half a window by
default) through the training's mel path; a species' score is its maximum over the windows,
averaged over the models given (a cross-validation run's folds).  ``load_run`` reads a run's
models back: its own, or each fold's of a cross-validation run.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from rfcx_mlops.config import Config
from rfcx_mlops.data import audio
from rfcx_mlops.errors import ConfigError, UserError
from rfcx_mlops.infer import detect
from rfcx_mlops.learn.features import front_end
from rfcx_mlops.learn.model import frame_model
from rfcx_mlops.track import runs

log = logging.getLogger("rfcx_mlops.scorer")
K = TypeVar("K")
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
        self.front_end = front_end(cfg)
        self.features = self.front_end.mel
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
        return self.front_end.model_inputs(windows)

    def scores(self, y: np.ndarray) -> np.ndarray:
        """(n_classes,) float32: per model the maximum over windows, then the mean over models."""
        return self.pooled(self.inputs(y))

    def pooled(self, x: np.ndarray) -> np.ndarray:
        """``scores`` from the windows' model input (``inputs``)."""
        return recording_scores(self.window_scores(x))

    def timeline(self, y: np.ndarray) -> tuple[np.ndarray, detect.Timeline]:
        """``scores(y)``, and the scores over time: of each window (the models' mean), or with an attention head
        of each step within the windows, crop / steps seconds long."""
        return self._line(self.starts(y), *self._predict(self.inputs(y)))

    def timelines(self, recordings: Iterable[tuple[K, np.ndarray]], batch: int
                  ) -> Iterator[tuple[K, np.ndarray, detect.Timeline]]:
        """``timeline`` of each ``(key, y)`` in turn, the models fed ``batch`` windows at a time across
        recordings; only the windows of one recording and one batch are held at once."""
        queue: collections.deque = collections.deque()  # (key, starts, windows) waiting for their scores
        waiting = None  # windows not yet scored
        outputs: list[tuple[np.ndarray, np.ndarray | None]] = []
        for key, y in recordings:
            x = self.inputs(y)
            queue.append((key, self.starts(y), len(x)))
            waiting = x if waiting is None or not len(waiting) else np.concatenate([waiting, x])
            full = len(waiting) // batch * batch
            outputs += [self._predict(waiting[i : i + batch]) for i in range(0, full, batch)]
            waiting = waiting[full:]
            yield from self._hand_out(queue, outputs)
        if waiting is not None and len(waiting):
            outputs.append(self._predict(waiting))
        yield from self._hand_out(queue, outputs)

    def _hand_out(self, queue: collections.deque, outputs: list) -> Iterator[tuple]:
        """The timelines of the recordings at the head of ``queue`` whose windows are all in ``outputs``."""
        if not outputs:
            return
        windows = np.concatenate([w for w, _ in outputs], axis=1)
        steps = None if outputs[0][1] is None else np.concatenate([s for _, s in outputs])
        used = 0
        while queue and queue[0][2] <= windows.shape[1] - used:
            key, starts, n = queue.popleft()
            yield key, *self._line(starts, windows[:, used : used + n],
                                   None if steps is None else steps[used : used + n])
            used += n
        outputs[:] = [(windows[:, used:], None if steps is None else steps[used:])] if windows.shape[1] > used else []

    def _predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(models, windows, n_classes): each model's scores of each window (``inputs``); with attention heads
        also (windows, steps, n_classes): the models' mean score of each step."""
        steps = None if self.frame_models is None else np.mean(
            [np.asarray(m.predict_on_batch(x)) for m in self.frame_models], axis=0)
        return self.window_scores(x), steps

    def _line(self, starts: np.ndarray, windows: np.ndarray, steps: np.ndarray | None
              ) -> tuple[np.ndarray, detect.Timeline]:
        scores = recording_scores(windows)
        if steps is None:
            return scores, detect.timeline(starts, self.crop, windows.mean(axis=0))
        step = self.crop / steps.shape[1]
        step_starts = (starts[:, None] + step * np.arange(steps.shape[1])).ravel()
        return scores, detect.timeline(step_starts, step, steps.reshape(-1, steps.shape[2]))

    def window_scores(self, x: np.ndarray) -> np.ndarray:
        """(models, windows, n_classes): each model's scores of each window (``inputs``)."""
        return np.stack([np.asarray(m.predict_on_batch(x)) for m in self.models])

    def read(self, path: str | Path) -> np.ndarray:
        info = audio.probe(path)
        return audio.read_window(info, 0.0, info.duration, self.sample_rate)


def recording_scores(window_scores: np.ndarray) -> np.ndarray:
    """(models, windows, n_classes) -> (n_classes,): per model the maximum over windows, then the mean over models."""
    return window_scores.max(axis=1).mean(axis=0)


def model_runs(run: mlflow.entities.Run) -> list[mlflow.entities.Run]:
    """The runs whose models score for ``run``: itself, or each finished fold of a cross-validation run."""
    if run.data.tags.get("cv") != "true":
        return [run]
    folds = MlflowClient().search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                       "and attributes.status = 'FINISHED'", order_by=["tags.fold ASC"])
    if not folds:
        raise ModelError(f"run {run.info.run_id} is a cross-validation run with no finished fold")
    return folds


def model_uri(run: mlflow.entities.Run) -> str:
    """The ``models:/<model id>`` of the model a training run logged, or one line saying why it has none."""
    uri = run.data.tags.get("model_uri")
    if not uri and run.data.tags.get("selftrain") == "true":
        best = run.data.tags.get("best_run_id")
        raise ModelError(f"run {run.info.run_id} is a self-training run: its rounds hold the models"
                         + (f" (the best: run {best})" if best else ""))
    if not uri and run.info.status == "FINISHED":
        raise ModelError(f"run {run.info.run_id} has no model: a tuning trial keeps none (unless tune "
                         "--keep-models); retrain its values with python -m rfcx_mlops.train")
    if not uri:
        raise ModelError(f"run {run.info.run_id} has no model: it is {run.info.status} (a model is logged when "
                         f"training finishes; resume it with python -m rfcx_mlops.train --resume {run.info.run_id})")
    return uri


def check_ensemble(run: mlflow.entities.Run, registered: list[str] | None) -> None:
    """A cross-validation run scores with the fold models it was registered with (``registered``: their model
    ids; None: not an ensemble), not with folds finished, resumed or deleted since."""
    if registered is None:
        return
    now = [model_uri(r).removeprefix("models:/") for r in model_runs(run)]
    if now != registered:
        raise ModelError(f"run {run.info.run_id}'s fold models changed since it was registered (then "
                         f"{', '.join(registered)}; now {', '.join(now)}): register it again")


def model_files(run: mlflow.entities.Run, folder: Path) -> dict[str, Path]:
    """The Keras file of the logged model (the best epoch's weights) of the run, or of each fold of a
    cross-validation run, downloaded into ``folder``: by the id of the run that logged it."""
    files = {}
    for r in model_runs(run):
        uri = model_uri(r)
        try:
            files[r.info.run_id] = download_weights(uri, folder / r.info.run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise ModelError(f"run {r.info.run_id}: its model {uri} cannot be read "
                             f"({str(exc).splitlines()[0]})") from None
    return files


def load_models(files: Iterable[Path]) -> list[keras.Model]:
    return [keras.models.load_model(path, compile=False) for path in files]


def training_run(run_id: str) -> mlflow.entities.Run:
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"run {run_id} not found in {mlflow.get_tracking_uri()}") from None


def run_config(run: mlflow.entities.Run) -> Config:
    try:
        return runs.logged_config(run)
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"run {run.info.run_id} has no config.yaml: not a training run") from None


def load_run(run_id: str, folder: Path, hop_seconds: float | None = None,
             registered: list[str] | None = None) -> tuple[mlflow.entities.Run, Scorer]:
    """The run and a ``Scorer`` of its models (``registered``: see ``check_ensemble``)."""
    run = training_run(run_id)
    cfg = run_config(run)
    check_ensemble(run, registered)
    files = model_files(run, folder)
    models = load_models(files.values())
    log.info("run %s: %d model(s) from %s", run_id, len(models), ", ".join(files))
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


def download_weights(model_uri: str, dst: Path, client: MlflowClient | None = None) -> Path:
    """The Keras file inside a logged model (``models:/<id>``, a run's ``model_uri`` tag), downloaded to ``dst``."""
    client = client or MlflowClient()
    model = client.get_logged_model(model_uri.removeprefix("models:/"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/artifacts/{WEIGHTS_FILE}",
                                                    dst_path=str(dst), tracking_uri=client.tracking_uri))
