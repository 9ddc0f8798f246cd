"""Training, tracked in MLflow: one cross-validation fold (``train_fold``) or every fold (``train_cv``).

``train_fold`` reads top to bottom as the run does: data, folds, batches, model,
fit, then the best epoch's per-species scores and model.  Its command line is
``python -m rfcx_mlops.train`` (``train.py``), which ``mlflow run . -P fold=1`` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.data.code_dataset_source import CodeDatasetSource

from rfcx_mlops import streams
from rfcx_mlops.config import Config, check_fold
from rfcx_mlops.data import demo, folder, folds
from rfcx_mlops.data.audio import AudioInfo, read_window
from rfcx_mlops.data.folder import Dataset
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.infer import detect
from rfcx_mlops.infer.scorer import Scorer, window_starts
from rfcx_mlops.infer.servable import log_servable
from rfcx_mlops.learn import memory
from rfcx_mlops.learn.batches import (Batches, Samples, SpectrogramBatches, make_batches, make_samples,
                                     reuse_freed_memory)
from rfcx_mlops.learn.metrics import lwlrap, species_ap
from rfcx_mlops.learn.model import build, for_training, precision_and_devices
from rfcx_mlops.streams import Purpose
from rfcx_mlops.track import checkpoints, plots, runs
from rfcx_mlops.track.checkpoints import weights_only

log = logging.getLogger("rfcx_mlops.fit")
GRID_SAMPLES = 4
# ResNet50 training on a CPU: 1.13 samples/s of 128 x 1876 images on 2 cores (benchmarks/train_step.py)
CPU_PIXELS_PER_CORE_SECOND = 1.13 * 128 * 1876 / 2
SLOW_STEP_SECONDS = 5.0  # from here, a run on a CPU says how long Ctrl-C will take


@dataclass(frozen=True)
class Student:
    """A self-training round's part of a fold's training: the teacher's pseudo-labelled windows (``learn.pseudo``),
    their table, the teacher's model, and where given the weights to start from."""

    samples: Samples
    labels: pd.DataFrame
    teacher_run_id: str
    teacher_model: str  # models:/<id>
    init: Path | None = None  # a .keras file whose weights the student starts from


PSEUDO_LABELS_FILE = "pseudo_labels.csv"


@dataclass(frozen=True)
class FoldResult:
    run_id: str
    fold: int
    best_value: float  # of the monitored metric (train.monitor)
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
    mlflow.log_figure(plots.augmentation_grid(before, [d[0] for d in drawn], titles, shown),
                      "augmentation_samples.png")


class RecordingValidation(keras.callbacks.Callback):
    """Every ``train.recording_eval_every`` epochs: the validation recordings scored whole, as predict
    scores them (sliding windows, each species' maximum over them), against the species with a
    labelled call in each: ``val_recording_lwlrap`` in the epoch's logs.

    The windows' model input is computed once when it fits in ``CACHE_BYTES``, else every time.
    """

    CACHE_BYTES = 1 << 30

    def __init__(self, model: keras.Model, cfg: Config, events: pd.DataFrame, recordings: dict[str, AudioInfo]):
        super().__init__()
        self.every = cfg.train.recording_eval_every
        self.scorer = Scorer([model], cfg, cfg.train.recording_hop_seconds or None)
        ids = sorted(events["recording_id"].unique())
        self.infos = [recordings[rid] for rid in ids]
        self.truth = np.zeros((len(ids), cfg.data.n_classes), np.float32)
        for row, species in enumerate(events.groupby("recording_id")["species_id"].unique().loc[ids]):
            self.truth[row, species] = 1.0
        windows = sum(len(window_starts(i.duration, self.scorer.crop, self.scorer.hop)) for i in self.infos)
        fits = windows * self.scorer.front_end.window_bytes <= self.CACHE_BYTES
        self.cache: dict[int, np.ndarray] | None = {} if fits else None

    def _inputs(self, k: int) -> np.ndarray:
        if self.cache is not None and k in self.cache:
            return self.cache[k]
        info = self.infos[k]
        x = self.scorer.inputs(read_window(info, 0.0, info.duration, self.scorer.sample_rate))
        if self.cache is not None:
            self.cache[k] = x
        return x

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or logs is None:
            return
        scores = np.stack([self.scorer.pooled(self._inputs(k)) for k in range(len(self.infos))])
        logs["val_recording_lwlrap"] = lwlrap(self.truth, scores)


def _samples(cfg: Config, data: Dataset, train_events: pd.DataFrame,
             val_events: pd.DataFrame) -> tuple[Samples, Samples]:
    """Training and validation windows; with ``train.fp_windows``, training windows on train_fp rows too,
    and with ``train.random_windows`` at random places of the training recordings.

    Rows of train_fp mark species known absent in both; those of the validation recordings
    never become training windows.
    """
    args = (data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    in_val = data.fp["recording_id"].isin(set(val_events["recording_id"]))
    train_fp, val_fp = data.fp[~in_val], data.fp[in_val]
    n = min(len(train_fp), round(cfg.train.fp_windows * len(train_events)))
    chosen = np.sort(streams.rng(cfg.seed, Purpose.FP_WINDOWS).choice(len(train_fp), n, replace=False))
    pool = sorted(set(train_events["recording_id"]) | set(train_fp["recording_id"] if n else ()))
    placed = _random_windows(pool, data.recordings, cfg, round(cfg.train.random_windows * len(train_events)))
    log.info("training windows: %d on train_tp rows, %d on train_fp rows, %d at random places",
             len(train_events), n, len(placed))
    return (make_samples(train_events, *args, absences=train_fp, centred_on_absences=train_fp.iloc[chosen],
                         placed=placed),
            make_samples(val_events, *args, absences=val_fp))


def _random_windows(pool: list[str], recordings: dict[str, AudioInfo], cfg: Config, n: int) -> pd.DataFrame:
    """``n`` windows at uniform places of recordings drawn uniformly from ``pool``: mostly no labelled call,
    so that a sigmoid model hears what the recordings sound like between calls."""
    rng = streams.rng(cfg.seed, Purpose.RANDOM_WINDOWS)
    ids = np.asarray(pool, dtype=str)[rng.integers(len(pool), size=n)]
    room = np.array([recordings[rid].duration for rid in ids]) - cfg.data.crop_seconds
    return pd.DataFrame({"recording_id": ids, "start": rng.random(n) * np.maximum(room, 0.0)})


@functools.cache
def _warn_without_gpu(cfg: Config, samples_per_epoch: int) -> None:
    """Where a run would take hours on this machine's CPU, one line: the estimate and the CPU-sized preset.
    Where a step takes long, one line on how long Ctrl-C takes: Keras looks for it between steps only."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    cores = os.cpu_count() or 1
    seconds = cfg.features.n_mels * cfg.features.frames / (CPU_PIXELS_PER_CORE_SECOND * cores)  # a sample's
    epoch = samples_per_epoch * seconds
    if epoch * cfg.train.epochs > 3600:
        log.warning("no GPU here: %s takes about %.0f min an epoch on this CPU (%d cores), %.1f h for %d epochs; "
                    "experiments/quick.yaml is sized for a CPU", cfg.name, epoch / 60, cores,
                    epoch * cfg.train.epochs / 3600, cfg.train.epochs)
    step = memory.micro_batch(cfg) * seconds
    if step >= SLOW_STEP_SECONDS:
        log.info("Ctrl-C takes effect after the current step, about %.0f s on this CPU (micro-batches of %d; "
                 "train.accumulate_steps makes them smaller)", step, memory.micro_batch(cfg))


def _validation_scores(model: keras.Model, batches: Batches, fold: int) -> tuple[pd.Series, pd.DataFrame]:
    """Per-species AP and the per-window predictions of ``model`` on the validation batches."""
    scores = model.predict(batches, verbose=0)
    truth = batches.samples.labels
    ap = species_ap(truth, scores)
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


def check_memory(cfg: Config, batches: FoldBatches, force: bool = False) -> memory.Estimate:
    """The run's peak memory, estimated (``learn.memory``) and held against what this machine has: a run that
    cannot fit is refused (``memory.MemoryRefused``) unless ``force``, one that barely fits is a warning."""
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    replicas = gpus if cfg.train.distribute else min(gpus, 1)
    estimated = memory.estimate(cfg, len(batches.train.samples), len(batches.val.samples), replicas)
    free = memory.gpu_free() if gpus else None
    if gpus and free is None:
        log.info("memory: about %.1f GB of the GPU's; its free memory is unknown (no nvidia-smi): not checked",
                 estimated.total / memory.GB)
        return estimated
    available, where = (free, "the GPU has") if gpus else (memory.ram_available(), "available RAM is")
    warning = memory.check(cfg, estimated, available, where, force)
    if warning:
        log.warning("%s", warning)
    log.info("memory: about %.1f GB at the peak (process %.1f, step %.1f, caches %.1f); %s %.1f GB", estimated.total
             / memory.GB, estimated.process / memory.GB, estimated.step / memory.GB, estimated.caches / memory.GB,
             where, available / memory.GB)
    return estimated


def _new_run(cfg: Config, fold: int, data: Dataset, batches: FoldBatches, scratch: Path,
             tags: dict[str, str], student: Student | None, estimated: memory.Estimate) -> _Start:
    """A fresh run's record (config, memory estimate, tags, data set, folds, augmentation samples, a student's
    pseudo-labels) and its new model."""
    runs.log_config(cfg)
    mlflow.log_param("memory_estimate_gb", round(estimated.total / memory.GB, 2))
    digest = folder.fingerprint(data.data_dir)
    mlflow.set_tags(runs.tags(cfg, fold=fold, dataset_fingerprint=digest, device=runs.device(),
                              **runs.data_tags(data.data_dir, data.demo), **tags))
    runs.log_dataset(data.data_dir, digest, data.demo)
    if data.demo:
        log.info("training on the built-in demo data set (%s); tag demo_data=True", data.data_dir)
    mlflow.log_artifact(str(folds.write_csv(data.tp, batches.assigned, scratch / "folds.csv")))
    _log_species(cfg, data)
    _augmentation_grid(cfg, batches.train.samples, data.recordings)
    if student is not None:
        _log_pseudo_labels(student, scratch)
    with precision_and_devices(cfg):
        model = build(cfg, batches.train.steps)
        if student is not None and student.init is not None:
            model.set_weights(keras.models.load_model(student.init, compile=False).get_weights())
        return _Start(model, for_training(model, cfg))


def _log_pseudo_labels(student: Student, scratch: Path) -> None:
    """The student's pseudo-label table, as an artifact and as its dataset input (context ``pseudo-labels``,
    source: the teacher's model), so the runs list shows which labels made which model."""
    path = scratch / PSEUDO_LABELS_FILE
    student.labels.to_csv(path, index=False)  # full precision: a resumed round reads back the same windows
    mlflow.log_artifact(str(path))
    source = CodeDatasetSource({"teacher_run_id": student.teacher_run_id, "teacher_model": student.teacher_model})
    with warnings.catch_warnings():  # a hint that integer columns cannot hold missing values: these never do
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(student.labels, source=source, name="pseudo-labels", targets="target")
        mlflow.log_input(dataset, context="pseudo-labels")


def _species(cfg: Config, data: Dataset) -> pd.DataFrame:
    return detect.species_table(data.tp, cfg.data.n_classes, cfg.features.fmin, cfg.features.fmax,
                                folder.species_names(data.data_dir))


def _log_species(cfg: Config, data: Dataset) -> None:
    """species.csv: what predict names and bands its detections with (names from the data folder's species.csv)."""
    mlflow.log_text(_species(cfg, data).to_csv(index=False), detect.SPECIES_FILE)


PICTURED = 3  # validation recordings a run draws at its best epoch, as predict --plots draws them


def _log_pictures(model: keras.Model, cfg: Config, data: Dataset, val_events: pd.DataFrame) -> None:
    """The first validation recordings scored over time by the best epoch's model, their detections drawn."""
    scorer = Scorer([model], cfg, cfg.train.recording_hop_seconds or None)
    species = _species(cfg, data)
    names = dict(zip(species["species_id"], species["name"]))
    thresholds = detect.thresholds(cfg.detect, cfg.data.n_classes)
    for rid in sorted(val_events["recording_id"].unique())[:PICTURED]:
        info = data.recordings[rid]
        y = read_window(info, 0.0, info.duration, cfg.data.sample_rate)
        _, line = scorer.timeline(y)
        found = detect.detections(rid, line, thresholds, cfg.detect.min_gap_seconds, species)
        labelled = ", ".join(names[k] for k in sorted(val_events.loc[val_events["recording_id"] == rid, "species_id"]
                                                       .unique()))
        fig = detect.picture(scorer.features, y, line, found, thresholds, names, f"{rid} (labelled: {labelled})")
        mlflow.log_figure(fig, f"pictures/{rid}.png")


def _resumed_run(cfg: Config, run: mlflow.entities.Run, scratch: Path) -> _Start:
    """A run's last checkpoint, with its optimizer state, and its best epoch so far."""
    run_id = run.info.run_id
    with precision_and_devices(cfg):
        model = keras.models.load_model(checkpoints.download_checkpoint(run_id, "last", scratch / "resume"))
        trained = for_training(model, cfg)
    epoch = int(run.data.tags.get("checkpoint_epoch", 0))
    best_epoch = int(run.data.tags.get("best_epoch", 0))
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, cfg.train.monitor)
    best = next((m.value for m in history if m.step == best_epoch), -np.inf)
    log.info("resuming run %s after epoch %d (best %s %.4f)", run_id, epoch, cfg.train.monitor, best)
    return _Start(model, trained, epoch, best, best_epoch,
                  checkpoints.best_weights(run_id, best_epoch, epoch, model, scratch / "best"))


def prepare(cfg: Config) -> Dataset:
    """The data set a run of ``cfg`` trains on, loaded and validated: the configured folder, or the demo data
    set (built the first time).  Prepared once, it serves every fold of a cross-validation run and every trial
    of a study."""
    if cfg.data.data_dir:
        return folder.load(cfg.data.data_dir, cfg.data.n_classes, cfg.data.sample_rate)
    return dataclasses.replace(folder.load(demo.cached(cfg), cfg.data.n_classes, cfg.data.sample_rate), demo=True)


@dataclass(frozen=True)
class FoldBatches:
    """A fold's recordings (``folds.assign_folds``), validation calls and batches."""

    assigned: pd.Series
    val_events: pd.DataFrame
    train: Batches
    val: Batches


def fold_batches(cfg: Config, fold: int, data: Dataset, pseudo: Samples | None = None) -> FoldBatches:
    """Fold ``fold``'s training and validation batches (the training ones with ``pseudo``'s windows)."""
    check_fold(cfg, fold)
    folder.check_crop(cfg, data)
    assigned = folds.assign_folds(data.tp, cfg.folds.n_splits, cfg.seed)
    train_events, val_events = folds.by_fold(data.tp, assigned, fold)
    if val_events.empty or train_events.empty:
        raise ConfigError(f"fold {fold} of {cfg.folds.n_splits} leaves no training or no validation samples")
    workers = cfg.train.workers or os.cpu_count() or 1
    reuse_freed_memory()  # process-wide: the batches' workers allocate many 2-8 MB arrays a sample
    train_samples, val_samples = _samples(cfg, data, train_events, val_events)
    if pseudo is not None:
        if set(pseudo.recording_ids) & set(val_events["recording_id"]):
            raise ValueError(f"pseudo-labelled windows in the validation recordings of fold {fold}")
        train_samples = train_samples + pseudo
    batches = FoldBatches(assigned, val_events,
                          make_batches(train_samples, data.recordings, cfg, training=True, workers=workers),
                          make_batches(val_samples, data.recordings, cfg, training=False, workers=workers))
    pseudo_labelled = f" ({train_samples.pseudo.sum()} pseudo-labelled)" if pseudo is not None else ""
    micro = f" of {cfg.train.accumulate_steps} micro-batches" if cfg.train.accumulate_steps > 1 else ""
    log.info("fold %d: %d training windows%s and %d validation windows, %d steps%s an epoch",
             fold, len(train_samples), pseudo_labelled, len(val_samples), batches.train.steps, micro)
    return batches


def train_fold(cfg: Config, fold: int, *, data: Dataset | None = None, resume: str | None = None,
               parent_run_id: str | None = None, callbacks: tuple[keras.callbacks.Callback, ...] = (),
               tags: dict[str, str] | None = None, run_name: str | None = None,
               log_model: bool = True, student: Student | None = None, force: bool = False) -> FoldResult:
    """Train ``fold`` (1..n_splits) of ``cfg`` in an MLflow run (named ``run_name``, by default
    <preset>-fold<fold>); ``resume`` continues an earlier run by its id.

    ``data``: the prepared data set (``prepare(cfg)``), when several runs share it.
    ``student``: a self-training round's pseudo-labelled windows, trained on with the fold's own.
    A finished run keeps the best epoch's weights as its servable model (unless ``log_model`` is
    false) and drops the checkpoints it could have resumed from (``train.keep_checkpoint``).
    A run estimated to need more memory than the machine has is refused before it starts, unless ``force``.
    """
    data = data or prepare(cfg)
    batches = fold_batches(cfg, fold, data, student and student.samples)
    estimated = check_memory(cfg, batches, force)
    _warn_without_gpu(cfg, batches.train.samples_per_epoch)
    if resume:
        checkpoints.check_resumable(resume)
    with runs.tracked_run(run_id=resume, run_name=run_name or f"{cfg.name}-fold{fold}",
                          parent_run_id=parent_run_id, nested=parent_run_id is not None,
                          log_system_metrics=cfg.train.system_metrics) as run, \
            tempfile.TemporaryDirectory(prefix="rfcx-run-") as tmp:
        scratch = Path(tmp)
        keras.utils.set_random_seed(cfg.seed)  # weight initialisation, dropout
        if resume:
            start = _resumed_run(cfg, run, scratch)
            batches.train.set_epoch(start.epoch)
        else:
            start = _new_run(cfg, fold, data, batches, scratch, tags or {}, student, estimated)
        logger = _fit(cfg, start, batches, data, scratch, callbacks)
        result = _finish(cfg, fold, run.info.run_id, logger, batches, data, scratch, log_model)
    return result


def _fit(cfg: Config, start: _Start, batches: FoldBatches, data: Dataset, scratch: Path,
         callbacks: tuple[keras.callbacks.Callback, ...]) -> checkpoints.EpochLogger:
    """Train from ``start`` to ``train.epochs``; the logger holds the best epoch."""
    logger = checkpoints.EpochLogger(batches.train.samples_per_epoch, scratch, start.model, cfg.train.monitor,
                                     best_so_far=start.best, best_epoch=start.best_epoch,
                                     best_weights=start.best_weights)
    # Before the logger, which reads what it adds to the epoch's logs.
    scoring = [RecordingValidation(start.model, cfg, batches.val_events, data.recordings)] \
        if cfg.train.recording_eval_every else []
    start.trained.run_eagerly = cfg.train.run_eagerly
    # The batches shuffle themselves from the seed; Keras' own shuffle would use Python's global RNG.
    start.trained.fit(batches.train, validation_data=batches.val, epochs=cfg.train.epochs, initial_epoch=start.epoch,
                      shuffle=False, callbacks=[*scoring, logger, *callbacks], verbose=1 if sys.stdout.isatty() else 2)
    if logger.best_weights is None:
        raise RuntimeError(f"no epoch produced a finite {cfg.train.monitor}")
    return logger


def _finish(cfg: Config, fold: int, run_id: str, logger: checkpoints.EpochLogger, batches: FoldBatches,
            data: Dataset, scratch: Path, log_model: bool) -> FoldResult:
    """The best epoch's model scored, drawn and logged; the checkpoints dropped."""
    best_model = weights_only(logger.checkpointed, logger.best_weights)
    ap, predictions = _validation_scores(best_model, batches.val, fold)
    check = lwlrap(batches.val.samples.labels, predictions.filter(regex=r"^s\d+$").to_numpy())
    plots.log_species_ap(ap, f"Per-species validation average precision, best epoch ({logger.best_epoch})")
    plots.log_species_pr(predictions, f"Per-species precision and recall, best epoch ({logger.best_epoch})")
    _log_pictures(best_model, cfg, data, batches.val_events)
    if log_model:
        log_servable(best_model, cfg, scratch)
    mlflow.log_metrics({f"best_{cfg.train.monitor}": logger.best, "best_epoch": logger.best_epoch})
    checkpoints.drop_checkpoints(run_id, keep_last=cfg.train.keep_checkpoint == "always")
    log.info("fold %d: best %s %.4f at epoch %d (its val_lwlrap recomputed with scikit-learn: %.4f)", fold,
             cfg.train.monitor, logger.best, logger.best_epoch, check)
    return FoldResult(run_id, fold, logger.best, logger.best_epoch, ap, predictions)


def train(cfg: Config, fold: int | None, *, force: bool = False) -> tuple[str | None, list[FoldResult]]:
    """What ``python -m rfcx_mlops.train`` runs, in the default experiment (``runs.use_default_experiment``):
    ``fold``, or every fold under a cross-validation run (None).  The cross-validation run's id (None for one
    fold) and each fold's result."""
    runs.use_default_experiment()
    if fold is not None:
        return None, [train_fold(cfg, fold, force=force)]
    return train_cv(cfg, force=force)


def train_cv(cfg: Config, *, tags: dict[str, str] | None = None,
             force: bool = False) -> tuple[str, list[FoldResult]]:
    """Every fold as a nested run under one cross-validation run, which gets the folds' summary."""
    data = prepare(cfg)  # loaded and checked once, for every fold
    check_memory(cfg, fold_batches(cfg, 1, data), force)  # before the parent run: a refusal leaves none behind
    with runs.tracked_run(run_name=f"{cfg.name}-cv") as parent:
        runs.log_config(cfg)
        _log_species(cfg, data)
        mlflow.set_tags(runs.tags(cfg, cv="true", fold="all", **runs.data_tags(data.data_dir, data.demo),
                                  **(tags or {})))
        results = [train_fold(cfg, fold, data=data, parent_run_id=parent.info.run_id, force=force)
                   for fold in range(1, cfg.folds.n_splits + 1)]
        plots.log_cv_summary(results, cfg.train.monitor)
    return parent.info.run_id, results


def resume(run_id: str, *, force: bool = False) -> tuple[Config, FoldResult | None]:
    """Continue run ``run_id`` from its last checkpoint, with its own config and fold: its config, and the result
    (None where the run has finished: nothing is left to train)."""
    try:
        run = mlflow.get_run(run_id)
        cfg = runs.logged_config(run)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"resume: run {run_id} not found or has no config.yaml "
                          f"({str(exc).splitlines()[0]})") from None
    if run.info.status == "FINISHED":
        return cfg, None
    runs.hand_launcher_to(run_id)
    return cfg, train_fold(cfg, int(run.data.tags.get("fold", 1)), resume=run_id, force=force)
