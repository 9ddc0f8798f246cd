"""Training, tracked in MLflow: one cross-validation fold (``train_fold``) or every fold (``train_cv``).

``train_fold`` reads top to bottom as the run does: data, folds, batches, model,
fit, then the best epoch's per-species scores and model.  The command line is
``python -m rfcx_mlops.train`` (``train.py``), which ``mlflow run . -P fold=1`` calls.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from rfcx_mlops import dataset, folds, serve, synth, tracking
from rfcx_mlops.config import Config, ConfigError, check_fold
from rfcx_mlops.generator import SpectrogramBatches, make_batches, make_samples
from rfcx_mlops.metrics import lwlrap
from rfcx_mlops.model import build, precision_and_devices, weights_only

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


def resolve_data_dir(cfg: Config) -> tuple[Path, bool]:
    """The configured data folder, or the demo data set (built once, then reused). True when it is the demo."""
    if cfg.data.data_dir:
        return Path(cfg.data.data_dir), False
    name = f"n{cfg.data.demo_recordings}-seed{cfg.data.demo_seed}-v{synth.GENERATOR_VERSION}"
    folder = Path(cfg.data.demo_dir) / name
    if (folder / dataset.TP_FILE).is_file():
        log.info("using the cached demo data set in %s", folder)
        return folder, True
    log.info("no data_dir given: building the demo data set (%d recordings) in %s", cfg.data.demo_recordings, folder)
    tmp = folder.with_name(f".{name}.partial-{os.getpid()}")
    try:
        synth.build(tmp, recordings=cfg.data.demo_recordings, seed=cfg.data.demo_seed)
        os.replace(tmp, folder)  # a half-built demo set is never taken for a cached one
    except OSError:
        if not (folder / dataset.TP_FILE).is_file():
            raise
        log.info("another run built %s first; using it", folder)  # two folds started at once
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


def _check_crop(cfg: Config, data: dataset.Dataset) -> None:
    shortest = min(data.recordings[rid].duration for rid in data.tp["recording_id"].unique())
    if cfg.data.crop_seconds > shortest:
        raise ConfigError(f"data.crop_seconds {cfg.data.crop_seconds} is longer than the shortest recording "
                          f"({shortest:.2f} s)")


def _augmentation_grid(batches: SpectrogramBatches) -> None:
    idx = range(min(GRID_SAMPLES, len(batches.samples)))
    before = [batches.features(batches.waveform(i)) for i in idx]
    drawn = [batches.sample(i, epoch=0) for i in idx]
    titles = [f"{batches.samples.recording_ids[i]} species "
              + ",".join(str(s) for s in np.flatnonzero(batches.samples.labels[i])) for i in idx]
    # Noise seeds and sample counts are exact but unreadable; the plot shows the physical values.
    shown = [{k: v for k, v in d[1].items() if k not in ("noise_seed", "shift_samples")} for d in drawn]
    mlflow.log_figure(tracking.augmentation_grid(before, [d[0] for d in drawn], titles, shown),
                      "augmentation_samples.png")


def _validation_scores(model: keras.Model, batches: SpectrogramBatches, fold: int) -> tuple[pd.Series, pd.DataFrame]:
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


def train_fold(cfg: Config, fold: int, *, resume: str | None = None, parent_run_id: str | None = None,
               callbacks: tuple[keras.callbacks.Callback, ...] = (), tags: dict[str, str] | None = None,
               log_model: bool = True) -> FoldResult:
    """Train ``fold`` (1..n_splits) of ``cfg`` in an MLflow run; ``resume`` continues an earlier run by its id.

    A finished run keeps the best epoch's weights as its servable model (unless ``log_model`` is
    false) and drops the checkpoints it could have resumed from (``train.keep_checkpoint``).
    """
    check_fold(cfg, fold)
    data_dir, is_demo = resolve_data_dir(cfg)
    data = dataset.load(data_dir, cfg.data.n_classes, cfg.data.sample_rate)
    _check_crop(cfg, data)
    train_events, val_events = folds.split(data.tp, fold, cfg.folds.n_splits, cfg.seed)
    if val_events.empty or train_events.empty:
        raise ConfigError(f"fold {fold} of {cfg.folds.n_splits} leaves no training or no validation samples")
    sample_args = (data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    workers = cfg.train.workers or os.cpu_count() or 1
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
    run = mlflow.start_run(run_id=resume, run_name=f"{cfg.name}-fold{fold}", parent_run_id=parent_run_id,
                           nested=parent_run_id is not None, log_system_metrics=cfg.train.system_metrics)
    run_id = run.info.run_id
    scratch = tempfile.TemporaryDirectory(prefix="rfcx-run-")
    folder = Path(scratch.name)
    try:
        keras.utils.set_random_seed(cfg.seed)  # weight initialisation, dropout
        devices = precision_and_devices(cfg)
        if resume:
            with devices:
                model = keras.models.load_model(tracking.download_checkpoint(run_id, "last", folder / "resume"))
            initial_epoch = int(run.data.tags.get("checkpoint_epoch", 0))
            best_epoch = int(run.data.tags.get("best_epoch", 0))
            history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_lwlrap")
            best = next((m.value for m in history if m.step == best_epoch), -np.inf)
            best_weights = tracking.best_weights(run_id, best_epoch, model, folder / "best")
            train_batches.set_epoch(initial_epoch)
            log.info("resuming run %s after epoch %d (best val_lwlrap %.4f)", run_id, initial_epoch, best)
        else:
            tracking.log_config(cfg)
            digest = dataset.fingerprint(data_dir)
            mlflow.set_tags({
                "mlflow.runName": f"{cfg.name}-fold{fold}", "fold": fold, "preset": cfg.name,
                "git_commit": tracking.git_commit(), "dataset_fingerprint": digest,
                "data_dir": str(data_dir.resolve()), "demo_data": is_demo, "device": tracking.device(), **(tags or {}),
            })
            tracking.log_dataset(data_dir, digest, is_demo)
            if is_demo:
                log.info("training on the built-in demo data set (%s); tag demo_data=True", data_dir)
            csv = folds.write_csv(data.tp, cfg.folds.n_splits, cfg.seed, folder / "folds.csv")
            mlflow.log_artifact(str(csv))
            _augmentation_grid(train_batches)
            with devices:
                model = build(cfg, len(train_batches))
            initial_epoch, best_epoch, best, best_weights = 0, 0, -np.inf, None
        logger = tracking.EpochLogger(train_batches.samples_per_epoch, folder, best_so_far=best,
                                      best_epoch=best_epoch, best_weights=best_weights)
        model.run_eagerly = cfg.train.run_eagerly
        # The batches shuffle themselves from the seed; Keras' own shuffle would use Python's global RNG.
        model.fit(train_batches, validation_data=val_batches, epochs=cfg.train.epochs, initial_epoch=initial_epoch,
                  shuffle=False, callbacks=[logger, *callbacks], verbose=1 if sys.stdout.isatty() else 2)
        if logger.best_weights is None:
            raise RuntimeError("no epoch produced a finite val_lwlrap")
        best_model = weights_only(model, logger.best_weights)
        ap, predictions = _validation_scores(best_model, val_batches, fold)
        check = lwlrap(val_batches.samples.labels, predictions.filter(regex=r"^s\d+$").to_numpy())
        tracking.log_species_ap(ap, f"Per-species validation average precision, best epoch ({logger.best_epoch})")
        if log_model:
            serve.log_servable(best_model, cfg, folder)
        mlflow.log_metrics({"best_val_lwlrap": logger.best, "best_epoch": logger.best_epoch})
        tracking.drop_checkpoints(run_id, keep_last=cfg.train.keep_checkpoint == "always")
        log.info("fold %d: best val_lwlrap %.4f at epoch %d (recomputed with scikit-learn: %.4f)", fold,
                 logger.best, logger.best_epoch, check)
    except KeyboardInterrupt:
        # `mlflow run` follows Ctrl-C with SIGTERM: a second interrupt must not cut this short.
        ignore_interrupts()
        mlflow.set_tag("failure_reason", "interrupted (Ctrl-C or SIGTERM)")
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag("failure_reason", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED")
        raise
    finally:
        scratch.cleanup()
    mlflow.end_run("FINISHED")
    return FoldResult(run_id, fold, logger.best, logger.best_epoch, ap, predictions)


def train_cv(cfg: Config, *, tags: dict[str, str] | None = None) -> tuple[str, list[FoldResult]]:
    """Every fold as a nested run under one cross-validation run, which gets the folds' summary."""
    data_dir, is_demo = resolve_data_dir(cfg)  # the demo data is built once, before the folds
    with mlflow.start_run(run_name=f"{cfg.name}-cv") as parent:
        tracking.log_config(cfg)
        mlflow.set_tags({"mlflow.runName": f"{cfg.name}-cv", "cv": "true", "fold": "all", "preset": cfg.name,
                         "git_commit": tracking.git_commit(), "data_dir": str(data_dir.resolve()),
                         "demo_data": is_demo, **(tags or {})})
        try:
            results = [train_fold(cfg, fold, parent_run_id=parent.info.run_id)
                       for fold in range(1, cfg.folds.n_splits + 1)]
        except KeyboardInterrupt:
            mlflow.set_tag("failure_reason", "interrupted (Ctrl-C or SIGTERM)")
            mlflow.end_run("KILLED")
            raise
        tracking.log_cv_summary(results)
    return parent.info.run_id, results


def resumed_config(run_id: str) -> Config:
    """The config a run was started with, read back from its config.yaml artifact."""
    try:
        return tracking.logged_config(mlflow.get_run(run_id))
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"resume: run {run_id} not found or has no config.yaml ({str(exc).splitlines()[0]})") from None


def ignore_interrupts() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
