"""Self-training, tracked as one MLflow run: a teacher, then rounds of students, each taught by the round before.

Round 0 is the teacher: trained here, or a finished run given by its id.  Each later round scores the
fold's training recordings with the previous round's model (``learn.pseudo``: windows every
``pseudo.hop_seconds``, what the rows say kept) and trains a student on the fold's own windows plus
the pseudo-labelled ones (``pseudo.share`` of each batch on the originals).  A teacher that is a
cross-validation run labels out of fold: a recording of fold k by fold k's model, which never trained
on it; any other teacher labels the recordings it trained on.  Rounds stop after ``pseudo.rounds``,
or when ``train.monitor`` has not improved for ``pseudo.patience`` rounds.

Lineage: the parent run holds the config and, per round (step = round), the monitored metric, the
test LWLRAP and event scores where the data has the truth, and the pseudo-labels' size, agreement
with the round before and precision and recall against train_calls.csv where it exists.  Each round
is a nested run tagged with its round and its teacher's run and model; a student logs its
pseudo-label table as an artifact and as its ``pseudo-labels`` dataset input.  The same command with
``resume`` continues after the last finished round (an interrupted round from its checkpoint).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from rfcx_mlops.config import Config, flatten
from rfcx_mlops.data import audio, folder, folds
from rfcx_mlops.data.folder import Dataset
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.infer import detect
from rfcx_mlops.infer.scorer import ModelError, download_weights, load_run
from rfcx_mlops.jobs import fit
from rfcx_mlops.jobs import predict as predicting
from rfcx_mlops.learn import pseudo
from rfcx_mlops.learn.batches import window_labels
from rfcx_mlops.track import checkpoints, runs

log = logging.getLogger("rfcx_mlops.selftrain")
ROUND_TAG = "selftrain_round"
CALLS_FILE = "train_calls.csv"  # the demo data's every call of the training recordings
QUALITY_FILE = "pseudo_quality.csv"
BANDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)  # teacher score bands of the precision table
# The teacher's settings a student must share: the same windows, folds and species.
SHARED_KEYS = ("seed", "folds.n_splits", "data.crop_seconds", "data.n_classes", "data.sample_rate", "train.monitor")


@dataclass(frozen=True)
class Round:
    number: int
    run_id: str
    best: float  # of train.monitor


def selftrain(cfg: Config, fold: int, *, teacher: str | None = None, resume: str | None = None,
              say: Callable[[str], None] = print, force: bool = False) -> tuple[str, list[Round]]:
    """Self-train ``fold`` of ``cfg`` from ``teacher`` (a run id; None: trained as round 0), or continue the
    self-training run ``resume``: its run id and its rounds.  ``force``: train rounds estimated to need more
    memory than this machine has (``fit.check_memory``)."""
    runs.use_default_experiment()
    if teacher:
        _check_teacher(cfg, fold, teacher)
    data = fit.prepare(cfg)
    if teacher:
        _check_teacher_data(teacher, data)
    fit.check_memory(cfg, fit.fold_batches(cfg, fold, data), force)  # before the parent run exists
    with runs.tracked_run(run_id=resume, run_name=None if resume else f"{cfg.name}-selftrain") as parent, \
            tempfile.TemporaryDirectory(prefix="rfcx-selftrain-") as tmp:
        parent_id = parent.info.run_id
        if resume:
            teacher = parent.data.tags.get("teacher_run_id")
        else:
            runs.log_config(cfg)
            mlflow.set_tags(runs.tags(cfg, selftrain="true", fold=fold, **runs.data_tags(data.data_dir, data.demo),
                                      **({"teacher_run_id": teacher} if teacher else {})))
        done = _finished_rounds(parent_id, cfg, fold, teacher)
        if not done:
            done.append(_teacher(cfg, fold, data, parent_id, force))
        recorded = {m.step for m in MlflowClient().get_metric_history(parent_id, f"best_{cfg.train.monitor}")}
        for k, r in enumerate(done):
            if r.number in recorded:
                say(f"round {r.number} (run {r.run_id}): finished before")
            else:
                _record(cfg, fold, data, parent_id, done[: k + 1], say)
        while len(done) <= cfg.pseudo.rounds and not _stalled(done, cfg.pseudo.patience):
            student = _student(cfg, fold, data, parent_id, done[-1], Path(tmp), force)
            if student is None:
                say(f"stopped after round {done[-1].number}: it labels no call at the pseudo-label threshold")
                break
            done.append(student)
            _record(cfg, fold, data, parent_id, done, say)
        else:
            if len(done) <= cfg.pseudo.rounds:
                say(f"stopped after round {done[-1].number}: {cfg.train.monitor} has not improved for "
                    f"{cfg.pseudo.patience} round(s)")
        best = max(done, key=lambda r: r.best)
        mlflow.set_tags({"best_round": best.number, "best_run_id": best.run_id})
    return parent_id, done


def resumable(run_id: str) -> tuple[Config, int]:
    """Self-training run ``run_id``'s config and fold, for ``selftrain(..., resume=run_id)``."""
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"--resume {run_id}: no run with that id in {mlflow.get_tracking_uri()}") from None
    if run.data.tags.get("selftrain") != "true":
        raise ConfigError(f"--resume {run_id}: not a self-training run (python -m rfcx_mlops.train --resume continues "
                          "a training run)")
    runs.hand_launcher_to(run_id)
    return runs.logged_config(run), int(run.data.tags["fold"])


def _check_teacher(cfg: Config, fold: int, run_id: str) -> None:
    """A finished run, trained with the windows, folds and species the students use: a cross-validation run, or
    a run of the students' fold (one of another fold trained on their validation recordings); with
    ``pseudo.from_teacher``, of their model too."""
    try:
        run = MlflowClient().get_run(run_id)
        teacher_cfg = runs.logged_config(run)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"--teacher {run_id}: no training run with that id in {mlflow.get_tracking_uri()}") from None
    if run.info.status != "FINISHED":
        raise ConfigError(f"--teacher {run_id}: the run is {run.info.status}; a teacher must have finished")
    if run.data.tags.get("cv") != "true" and run.data.tags.get("fold") != str(fold):
        raise ConfigError(f"--teacher {run_id} validated on fold {run.data.tags.get('fold')}, not on fold {fold}: "
                          f"it trained on the students' validation recordings")
    ours, theirs = flatten(cfg), flatten(teacher_cfg)
    keys = [*SHARED_KEYS, *(k for k in ours if k.startswith(("model.", "features.")) and cfg.pseudo.from_teacher)]
    differ = [f"{k} {theirs[k]} (here {ours[k]})" for k in keys if ours[k] != theirs[k]]
    if differ:
        raise ConfigError(f"--teacher {run_id} was trained with other settings: {', '.join(differ)}")
    if f"best_{cfg.train.monitor}" not in _fold_run(run, fold).data.metrics:
        raise ConfigError(f"--teacher {run_id} has no best_{cfg.train.monitor}: not a finished training run")


def _check_teacher_data(run_id: str, data: Dataset) -> None:
    """The teacher trained on this data set: its folds are the students' folds."""
    logged = MlflowClient().get_run(run_id).data.tags.get("dataset_fingerprint")
    if logged != folder.fingerprint(data.data_dir):
        raise ConfigError(f"--teacher {run_id} was trained on another data set than {data.data_dir} "
                          f"(its dataset_fingerprint {logged})")


def _fold_run(run: Run, fold: int) -> Run:
    """A cross-validation run's run of ``fold`` (the model that never trained on the students' validation
    recordings), or ``run`` itself."""
    if run.data.tags.get("cv") != "true":
        return run
    found = [r for r in _children(run.info.run_id) if r.data.tags.get("fold") == str(fold)
             and r.info.status == "FINISHED"]
    if not found:
        raise ModelError(f"teacher {run.info.run_id}: no finished run of fold {fold}")
    return found[0]


def _children(parent_id: str) -> list[Run]:
    experiment = MlflowClient().get_run(parent_id).info.experiment_id
    return MlflowClient().search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'",
                                      order_by=["attributes.start_time ASC"])


def _finished_rounds(parent_id: str, cfg: Config, fold: int, teacher: str | None) -> list[Round]:
    """The rounds a resumed self-training has finished, in order (the given teacher as round 0, scored as its run
    of ``fold``, like the students)."""
    monitor = f"best_{cfg.train.monitor}"
    found = {int(r.data.tags[ROUND_TAG]): Round(int(r.data.tags[ROUND_TAG]), r.info.run_id, r.data.metrics[monitor])
             for r in _children(parent_id) if ROUND_TAG in r.data.tags and r.info.status == "FINISHED"}
    if teacher:
        found[0] = Round(0, teacher, _fold_run(MlflowClient().get_run(teacher), fold).data.metrics[monitor])
    done = []
    while len(done) in found:
        done.append(found[len(done)])
    return done


def _unfinished(parent_id: str, number: int) -> str | None:
    """An interrupted run of round ``number`` that can go on from its checkpoint; one that cannot stays as it
    ended and the round starts anew."""
    for r in _children(parent_id)[::-1]:
        if r.data.tags.get(ROUND_TAG) == str(number) and r.info.status != "FINISHED":
            try:
                checkpoints.check_resumable(r.info.run_id)
            except ConfigError:
                return None
            return r.info.run_id
    return None


def _teacher(cfg: Config, fold: int, data: Dataset, parent_id: str, force: bool) -> Round:
    resume = _unfinished(parent_id, 0)
    result = fit.train_fold(cfg, fold, data=data, parent_run_id=parent_id, resume=resume,
                            run_name=f"{cfg.name}-round0", tags={ROUND_TAG: "0"}, force=force)
    return Round(0, result.run_id, result.best_value)


def _student(cfg: Config, fold: int, data: Dataset, parent_id: str, teacher: Round, scratch: Path,
             force: bool) -> Round | None:
    """Round ``teacher.number + 1``: labelled by ``teacher``, trained on the fold's windows and those; None where
    the teacher labels nothing."""
    number = teacher.number + 1
    resume = _unfinished(parent_id, number)
    labels = (_logged_labels(resume, scratch) if resume else
              label(cfg, data, fold, teacher.run_id, scratch / f"teacher{teacher.number}"))
    if not (labels["target"] > 0).any():
        return None
    teacher_run = MlflowClient().get_run(teacher.run_id)
    # A cross-validation teacher labels with every fold's model; a student starts from its fold's.
    model_uri = _fold_run(teacher_run, fold).data.tags.get("model_uri", "")
    init = (download_weights(model_uri, scratch / f"init{number}")
            if cfg.pseudo.from_teacher and model_uri and not resume else None)
    student = fit.Student(pseudo.samples(labels, data.tp, data.fp, cfg.data.crop_seconds, cfg.data.n_classes),
                          labels, teacher.run_id, model_uri, init)
    out_of_fold = teacher_run.data.tags.get("cv") == "true"
    labelled_by = [r.data.tags.get("model_uri", "") for r in _children(teacher.run_id)
                   if r.info.status == "FINISHED"] if out_of_fold else [model_uri]
    tags = {ROUND_TAG: str(number), "teacher_run_id": teacher.run_id,
            "teacher_model_id": ",".join(m.removeprefix("models:/") for m in labelled_by),
            "pseudo_out_of_fold": str(out_of_fold).lower()}
    result = fit.train_fold(cfg, fold, data=data, parent_run_id=parent_id, resume=resume, student=student,
                            run_name=f"{cfg.name}-round{number}", tags=tags, force=force)
    return Round(number, result.run_id, result.best_value)


def _logged_labels(run_id: str, scratch: Path) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=fit.PSEUDO_LABELS_FILE,
                                               dst_path=str(scratch / run_id))
    return pd.read_csv(path, dtype={"recording_id": str})


def _labels_of(r: Round) -> pd.DataFrame | None:
    """The pseudo-labels round ``r`` trained on (None for the teacher)."""
    if r.number == 0:
        return None
    with tempfile.TemporaryDirectory(prefix="rfcx-labels-") as tmp:
        return _logged_labels(r.run_id, Path(tmp))


def labellers(teacher: Run, fold_of: dict[str, int], recordings: list[str]) -> dict[str, str]:
    """Which run's model labels each recording: a cross-validation teacher's fold-k model labels the recordings
    of fold k (``fold_of``: recording -> fold), which it validated on and never trained on; any other teacher
    its own run."""
    if teacher.data.tags.get("cv") != "true":
        return {rid: teacher.info.run_id for rid in recordings}
    by_fold = {int(r.data.tags["fold"]): r.info.run_id for r in _children(teacher.info.run_id)
               if r.info.status == "FINISHED"}
    missing = sorted({fold_of[rid] for rid in recordings} - set(by_fold))
    if missing:
        raise ModelError(f"teacher {teacher.info.run_id}: no finished run of fold(s) "
                         f"{', '.join(map(str, missing))} to label their recordings out of fold")
    return {rid: by_fold[fold_of[rid]] for rid in recordings}


def _training_recordings(cfg: Config, data: Dataset, fold: int) -> tuple[list[str], dict[str, int]]:
    """The recordings the students of ``fold`` train on, and every recording's fold."""
    assigned = folds.assign_folds(data.tp, cfg.folds.n_splits, cfg.seed)
    train_events, _ = folds.by_fold(data.tp, assigned, fold)
    return sorted(train_events["recording_id"].unique()), dict(zip(data.tp["recording_id"], assigned.astype(int)))


def label(cfg: Config, data: Dataset, fold: int, teacher_id: str, scratch: Path) -> pd.DataFrame:
    """The pseudo-label table (``learn.pseudo.table``) of the fold's training recordings by the teacher."""
    recordings, fold_of = _training_recordings(cfg, data, fold)
    plan = labellers(MlflowClient().get_run(teacher_id), fold_of, recordings)
    thresholds = detect.thresholds(cfg.pseudo, cfg.data.n_classes)
    tables = []
    for run_id in sorted(set(plan.values())):
        _, scorer = load_run(run_id, scratch, cfg.pseudo.hop_seconds or None)
        mine = [rid for rid in recordings if plan[rid] == run_id]
        for rid in tqdm(mine, desc=f"labelling with {run_id[:8]}", unit="rec", file=sys.stderr):
            info = data.recordings[rid]
            y = audio.read_window(info, 0.0, info.duration, scorer.sample_rate)
            scores = scorer.window_scores(scorer.inputs(y)).mean(axis=0)
            starts = scorer.starts(y)
            ids = np.full(len(starts), rid)
            known = window_labels(ids, starts, data.tp, data.fp, cfg.data.crop_seconds, cfg.data.n_classes).known
            tables.append(pseudo.table(ids, starts, scores, thresholds, known, cfg.pseudo))
    labels = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=pseudo.COLUMNS)
    labelled = data.tp[data.tp["recording_id"].isin(set(recordings))].groupby("species_id").size()
    return pseudo.balanced(labels, labelled, cfg.pseudo.per_call)


def quality(labels: pd.DataFrame, recordings: list[str], data: Dataset, crop_seconds: float,
            n_classes: int) -> pd.DataFrame | None:
    """The pseudo-labels against every call of the labelled recordings (the demo data's train_calls.csv), None
    without it: per species and overall ("all"), precision (a present label right where a call of its species
    overlaps the window) and recall (of the calls no train_tp row labels in the labelled ``recordings``, those a
    present label overlaps); then the precision per band of the teacher's score.  Columns as
    ``detect.event_scores``', a label for a detection."""
    path = Path(data.data_dir) / CALLS_FILE
    if not path.is_file():
        return None
    calls = pd.read_csv(path, dtype={"recording_id": str})
    calls = calls[calls["recording_id"].isin(set(recordings))].reset_index(drop=True)
    labelled = data.tp.rename(columns={"t_min": "t_start", "t_max": "t_end"})
    calls = calls[~detect.match(labelled, calls)[1]]
    present = labels[labels["target"] > 0]
    found = present.assign(t_start=present["start"], t_end=present["start"] + crop_seconds)
    scores = detect.event_scores(found, calls, n_classes)
    right, _ = detect.match(found.reset_index(drop=True), calls.reset_index(drop=True))
    names = [f"score {lo:g}-{hi:g}" for lo, hi in zip(BANDS[:-1], BANDS[1:])]
    band = pd.cut(present["score"], [*BANDS[:-1], np.inf], right=False, labels=names)
    by_band = pd.Series(right, index=present.index).groupby(band, observed=False).agg(["size", "mean"])
    bands = pd.DataFrame({"species_id": names, "detections": by_band["size"].to_numpy(),
                          "precision": by_band["mean"].to_numpy()})
    return pd.concat([scores, bands], ignore_index=True)


def _record(cfg: Config, fold: int, data: Dataset, parent_id: str, done: list[Round],
            say: Callable[[str], None]) -> None:
    """The last round's figures on the parent run (step = round), its test scores and pseudo-label quality on its
    own run."""
    client = MlflowClient()
    r, labels = done[-1], _labels_of(done[-1])
    previous = _labels_of(done[-2]) if len(done) > 1 else None
    metrics = {f"best_{cfg.train.monitor}": r.best}
    line = f"round {r.number} (run {r.run_id}): best {cfg.train.monitor} {r.best:.4f}"
    if labels is not None:
        present = labels[labels["target"] > 0]
        metrics |= {"pseudo_rows": len(present), "pseudo_recordings": present["recording_id"].nunique(),
                    "pseudo_species": present["species_id"].nunique()}
        line += f"; {len(present)} pseudo-labels in {metrics['pseudo_recordings']} recordings"
        if previous is not None:
            metrics["pseudo_agreement"] = pseudo.agreement(labels, previous)
        table = quality(labels, _training_recordings(cfg, data, fold)[0], data, cfg.data.crop_seconds,
                        cfg.data.n_classes)
        if table is not None:
            overall = table.set_index("species_id").loc["all"]
            metrics |= {"pseudo_precision": float(overall["precision"]), "pseudo_recall": float(overall["recall"])}
            client.log_text(r.run_id, table.to_csv(index=False, float_format="%.4f"), QUALITY_FILE)
            line += f", precision {overall['precision']:.3f} recall {overall['recall']:.3f} ({CALLS_FILE})"
    if (Path(data.data_dir) / predicting.LABELS_FILE).is_file():
        metrics |= _test_scores(r.run_id, data)
        line += f"; test LWLRAP {metrics['test_lwlrap']:.4f}"
    for key, value in metrics.items():
        client.log_metric(parent_id, key, float(value), step=r.number)
    say(line)


def _test_scores(run_id: str, data: Dataset) -> dict[str, float]:
    """The round's model on the test recordings, as ``predict`` scores them (logged to its run too); a given
    teacher scored before is not scored again."""
    if "test_lwlrap" not in MlflowClient().get_run(run_id).data.metrics:
        with tempfile.TemporaryDirectory(prefix="rfcx-selftest-") as tmp:
            predicting.run(predicting.Request(run_id=run_id, out=Path(tmp) / "submission.csv",
                                              data_dir=str(data.data_dir)), say=log.debug)
    logged = MlflowClient().get_run(run_id).data.metrics
    return {k: logged[k] for k in ("test_lwlrap", "event_precision", "event_recall") if k in logged}


def _stalled(done: list[Round], patience: int) -> bool:
    """No round in the last ``patience`` beat the best before them."""
    best = int(np.argmax([r.best for r in done]))
    return len(done) - 1 - best >= patience
