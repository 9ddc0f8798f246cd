"""Training, tracked in MLflow: one cross-validation fold (``train_fold``) or every fold (``train_cv``).

``train_fold`` reads top to bottom as the run does: data, folds, batches, model,
fit, then the best epoch's per-species scores and model.  The command line is
``python -m rfcx_mlops.train`` (``train.py``), which ``mlflow run . -P fold=1`` calls.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from rfcx_mlops import dataset, folds, serve, tracking
from rfcx_mlops.config import Config, ConfigError, check_fold
from rfcx_mlops.audio import AudioInfo
from rfcx_mlops.generator import Batches, Samples, SpectrogramBatches, make_batches, make_samples, reuse_freed_memory
from rfcx_mlops.metrics import lwlrap
from rfcx_mlops.model import build, for_training, precision_and_devices, weights_only

log = logging.getLogger("rfcx_mlops.fit")
GRID_SAMPLES = 4


@dataclass(frozen=True)
class FoldResult:
    run_id: str
    fold: int
    best_val_lwlrap: float
    best_epoch: int
    species_ap: pd.Series  # validation AP per species of the best epoch
    predictions: pd.DataFrame  # the best epoch's validation windows: recording_id, start, fold, y0.., s0..


def _augmentation_grid(cfg: Config, samples: Samples, recordings: dict[str, AudioInfo]) -> None:
    # Images as training draws them, whichever backend makes them: both draw the same.
    batches = SpectrogramBatches(samples, recordings, cfg, training=True)
    idx = range(min(GRID_SAMPLES, len(samples)))
    before = [batches.features(batches.waveform(i)) for i in idx]
    drawn = [batches.sample(i, epoch=0) for i in idx]
    titles = [f"{batches.samples.recording_ids[i]} species "
              + ",".join(str(s) for s in np.flatnonzero(batches.samples.labels[i])) for i in idx]
    # Noise seeds and sample counts are exact but unreadable; the plot shows the physical values.
    shown = [{k: v for k, v in d[1].items() if k not in ("noise_seed", "shift_samples")} for d in drawn]
    mlflow.log_figure(tracking.augmentation_grid(before, [d[0] for d in drawn], titles, shown),
                      "augmentation_samples.png")


def _validation_scores(model: keras.Model, batches: Batches, fold: int) -> tuple[pd.Series, pd.DataFrame]:
    """Per-species AP and the per-window predictions of ``model`` on the validation batches."""
    scores = model.predict(batches, verbose=0)
    truth = batches.samples.labels
    ap = pd.Series(
        {c: average_precision_score(truth[:, c], scores[:, c]) if truth[:, c].any() else np.nan
         for c in range(truth.shape[1])}
    )
    n = truth.shape[1]
    table = pd.concat([
        pd.DataFrame({"recording_id": batches.samples.recording_ids, "start": batches.samples.starts, "fold": fold}),
        pd.DataFrame(truth.astype(int), columns=[f"y{c}" for c in range(n)]),
        pd.DataFrame(scores, columns=[f"s{c}" for c in range(n)]),
    ], axis=1)
    return ap, table


@dataclass(frozen=True)
class _Start:
    """Where training starts: a new model at epoch 0, or a resumed run's last checkpoint.

    ``model`` is what is saved and served; ``trained`` what ``fit`` trains (``model.for_training``).
    """

    model: keras.Model
    trained: keras.Model
    epoch: int = 0
    best: float = -np.inf
    best_epoch: int = 0
    best_weights: list[np.ndarray] | None = None


def _new_run(cfg: Config, fold: int, data: dataset.Dataset, assigned: pd.Series, train_batches: Batches,
             folder: Path, tags: dict[str, str]) -> _Start:
    """A fresh run's record (config, tags, data set, folds, augmentation samples) and its new model."""
    tracking.log_config(cfg)
    digest = dataset.fingerprint(data.data_dir)
    mlflow.set_tags({
        "mlflow.runName": f"{cfg.name}-fold{fold}", "fold": fold, "preset": cfg.name,
        "git_commit": tracking.git_commit(), "dataset_fingerprint": digest,
        "data_dir": str(data.data_dir.resolve()), "demo_data": data.demo, "device": tracking.device(), **tags,
    })
    tracking.log_dataset(data.data_dir, digest, data.demo)
    if data.demo:
        log.info("training on the built-in demo data set (%s); tag demo_data=True", data.data_dir)
    mlflow.log_artifact(str(folds.write_csv(data.tp, assigned, folder / "folds.csv")))
    _augmentation_grid(cfg, train_batches.samples, data.recordings)
    with precision_and_devices(cfg):
        model = build(cfg, len(train_batches))
        return _Start(model, for_training(model, cfg))


def _resumed_run(cfg: Config, run: mlflow.entities.Run, folder: Path) -> _Start:
    """A run's last checkpoint, with its optimizer state, and its best epoch so far."""
    run_id = run.info.run_id
    with precision_and_devices(cfg):
        model = keras.models.load_model(tracking.download_checkpoint(run_id, "last", folder / "resume"))
        trained = for_training(model, cfg)
    epoch = int(run.data.tags.get("checkpoint_epoch", 0))
    best_epoch = int(run.data.tags.get("best_epoch", 0))
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_lwlrap")
    best = next((m.value for m in history if m.step == best_epoch), -np.inf)
    log.info("resuming run %s after epoch %d (best val_lwlrap %.4f)", run_id, epoch, best)
    return _Start(model, trained, epoch, best, best_epoch,
                  tracking.best_weights(run_id, best_epoch, epoch, model, folder / "best"))


def train_fold(cfg: Config, fold: int, *, data: dataset.Dataset | None = None, resume: str | None = None,
               parent_run_id: str | None = None, callbacks: tuple[keras.callbacks.Callback, ...] = (),
               tags: dict[str, str] | None = None, log_model: bool = True) -> FoldResult:
    """Train ``fold`` (1..n_splits) of ``cfg`` in an MLflow run; ``resume`` continues an earlier run by its id.

    ``data``: the prepared data set (``dataset.prepare(cfg)``), when several runs share it.
    A finished run keeps the best epoch's weights as its servable model (unless ``log_model`` is
    false) and drops the checkpoints it could have resumed from (``train.keep_checkpoint``).
    """
    check_fold(cfg, fold)
    data = data or dataset.prepare(cfg)
    dataset.check_crop(cfg, data)
    assigned = folds.assign_folds(data.tp, cfg.folds.n_splits, cfg.seed)
    train_events, val_events = folds.by_fold(data.tp, assigned, fold)
    if val_events.empty or train_events.empty:
        raise ConfigError(f"fold {fold} of {cfg.folds.n_splits} leaves no training or no validation samples")
    sample_args = (data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    workers = cfg.train.workers or os.cpu_count() or 1
    reuse_freed_memory()  # process-wide: the batches' workers allocate many 2-8 MB arrays a sample
    train_batches = make_batches(make_samples(train_events, *sample_args), data.recordings, cfg, training=True,
                                 workers=workers)
    val_batches = make_batches(make_samples(val_events, *sample_args), data.recordings, cfg, training=False,
                               workers=workers)
    log.info("fold %d: %d training and %d validation samples, %d steps an epoch", fold,
             len(train_batches.samples), len(val_batches.samples), len(train_batches))
    if resume and f"{tracking.CHECKPOINT_DIR}/last.keras" not in {
            a.path for a in mlflow.MlflowClient().list_artifacts(resume, tracking.CHECKPOINT_DIR)}:
        raise ConfigError(f"resume: run {resume} has no checkpoint: it stopped before its first epoch ended; "
                          "start a new run")

    with tracking.tracked_run(run_id=resume, run_name=f"{cfg.name}-fold{fold}", parent_run_id=parent_run_id,
                              nested=parent_run_id is not None, log_system_metrics=cfg.train.system_metrics) as run, \
            tempfile.TemporaryDirectory(prefix="rfcx-run-") as scratch:
        folder = Path(scratch)
        keras.utils.set_random_seed(cfg.seed)  # weight initialisation, dropout
        if resume:
            start = _resumed_run(cfg, run, folder)
            train_batches.set_epoch(start.epoch)
        else:
            start = _new_run(cfg, fold, data, assigned, train_batches, folder, tags or {})
        logger = tracking.EpochLogger(train_batches.samples_per_epoch, folder, start.model, best_so_far=start.best,
                                      best_epoch=start.best_epoch, best_weights=start.best_weights)
        start.trained.run_eagerly = cfg.train.run_eagerly
        # The batches shuffle themselves from the seed; Keras' own shuffle would use Python's global RNG.
        start.trained.fit(train_batches, validation_data=val_batches, epochs=cfg.train.epochs, initial_epoch=start.epoch,
                  shuffle=False, callbacks=[logger, *callbacks], verbose=1 if sys.stdout.isatty() else 2)
        if logger.best_weights is None:
            raise RuntimeError("no epoch produced a finite val_lwlrap")

        best_model = weights_only(start.model, logger.best_weights)
        ap, predictions = _validation_scores(best_model, val_batches, fold)
        check = lwlrap(val_batches.samples.labels, predictions.filter(regex=r"^s\d+$").to_numpy())
        tracking.log_species_ap(ap, f"Per-species validation average precision, best epoch ({logger.best_epoch})")
        if log_model:
            serve.log_servable(best_model, cfg, folder)
        mlflow.log_metrics({"best_val_lwlrap": logger.best, "best_epoch": logger.best_epoch})
        tracking.drop_checkpoints(run.info.run_id, keep_last=cfg.train.keep_checkpoint == "always")
        log.info("fold %d: best val_lwlrap %.4f at epoch %d (recomputed with scikit-learn: %.4f)", fold,
                 logger.best, logger.best_epoch, check)
    return FoldResult(run.info.run_id, fold, logger.best, logger.best_epoch, ap, predictions)


def train_cv(cfg: Config, *, tags: dict[str, str] | None = None) -> tuple[str, list[FoldResult]]:
    """Every fold as a nested run under one cross-validation run, which gets the folds' summary."""
    data = dataset.prepare(cfg)  # loaded and checked once, for every fold
    with tracking.tracked_run(run_name=f"{cfg.name}-cv") as parent:
        tracking.log_config(cfg)
        mlflow.set_tags({"mlflow.runName": f"{cfg.name}-cv", "cv": "true", "fold": "all", "preset": cfg.name,
                         "git_commit": tracking.git_commit(), "data_dir": str(data.data_dir.resolve()),
                         "demo_data": data.demo, **(tags or {})})
        results = [train_fold(cfg, fold, data=data, parent_run_id=parent.info.run_id)
                   for fold in range(1, cfg.folds.n_splits + 1)]
        tracking.log_cv_summary(results)
    return parent.info.run_id, results


def resumed_config(run_id: str) -> Config:
    """The config a run was started with, read back from its config.yaml artifact."""
    try:
        return serve.logged_config(mlflow.get_run(run_id))
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"resume: run {run_id} not found or has no config.yaml ({str(exc).splitlines()[0]})") from None
