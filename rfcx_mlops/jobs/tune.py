"""Tuning, tracked in MLflow: a worker's trials of an Optuna study, each training its folds and feeding the pruner.

``run`` opens the study (``study``) and runs trials until it holds ``Tuning.n_trials`` counted
ones; each trial is nested MLflow runs under one parent run per worker, and its final state is
recorded on them.  The command line is ``python -m rfcx_mlops.tune`` (``tune.py``).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from rfcx_mlops import streams
from rfcx_mlops.config import Config, flatten, to_yaml, with_overrides
from rfcx_mlops.data.folder import Dataset
from rfcx_mlops.jobs import fit
from rfcx_mlops.jobs.study import SearchSpace, open_study, redact, scheme, shown
from rfcx_mlops.streams import Purpose
from rfcx_mlops.track import checkpoints, runs

log = logging.getLogger("rfcx_mlops.tune")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --n-trials counts; a failed trial is not counted
MAX_FAILURES_IN_A_ROW = 3


def _trial_runs(parent_run_id: str, study: str, number: int) -> list[mlflow.entities.Run]:
    """The MLflow runs of one trial (a trial run, or a trial run and its folds' runs), found by their tags."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    quoted = study.replace("'", "\\'")
    return client.search_runs([experiment], f"tags.study = '{quoted}' and tags.trial_number = '{number}'")


class RequeueStale:
    """For a trial whose worker stopped sending heartbeats: its MLflow runs end KILLED, its params run again."""

    def __init__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning("trial %d went stale (its worker stopped sending heartbeats): queued again", trial.number)
        parent = trial.user_attrs.get("mlflow_parent_run")
        if parent:
            client = MlflowClient()
            reason = f"trial {trial.number}: its worker stopped sending heartbeats (killed or hung)"
            trial_runs = _trial_runs(parent, study.study_name, trial.number)
            for run in trial_runs:
                client.set_tag(run.info.run_id, "trial_state", TrialState.FAIL.name)
                checkpoints.drop_checkpoints(run.info.run_id, keep_last=False)  # the trial runs again from scratch
            for run in [client.get_run(parent), *trial_runs]:
                if run.info.status == "RUNNING":
                    client.set_tag(run.info.run_id, "failure_reason", reason)
                    client.set_terminated(run.info.run_id, "KILLED")
        self._retry(study, trial)


class _Reporter(keras.callbacks.Callback):
    """Feeds each epoch's ``monitor`` to the pruner; ends the fit, not the run, when the pruner says so."""

    def __init__(self, trial: optuna.Trial, first_step: int, monitor: str):
        super().__init__()
        self.trial = trial
        self.first_step = first_step
        self.monitor = monitor
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        step = self.first_step + epoch + 1
        if self.monitor not in (logs or {}):  # an epoch whose recordings were not scored
            return
        self.trial.report(float(logs[self.monitor]), step)
        if self.trial.should_prune():
            self.pruned_at = step
            self.model.stop_training = True


def state_tag(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """After Optuna records a trial: its final state (and error) on each of its MLflow runs; a failed
    trial's checkpoints go (it is never resumed).

    A trial that failed before training started gets a FAILED run of its own, so that every
    trial shows in the UI.
    """
    client = MlflowClient()
    parent = trial.user_attrs["mlflow_parent_run"]
    tags = {"trial_state": trial.state.name}
    if "error" in trial.user_attrs:
        tags["failure_reason"] = trial.user_attrs["error"]
    trial_runs = _trial_runs(parent, study.study_name, trial.number)
    if not trial_runs:
        run = client.create_run(client.get_run(parent).info.experiment_id, run_name=f"trial-{trial.number}",
                                tags={"mlflow.parentRunId": parent, "study": study.study_name,
                                      "trial_number": str(trial.number)})
        for key, value in trial.params.items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FAILED")
        trial_runs = [run]
    for run in trial_runs:
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
        if trial.state == TrialState.FAIL:  # a failed trial is not resumed: its draw is queued anew or dropped
            checkpoints.drop_checkpoints(run.info.run_id, keep_last=False)


class Objective:
    """One trial: draw values, train each fold in nested MLflow runs, return the mean best ``train.monitor``."""

    def __init__(self, cfg: Config, data: Dataset, folds: list[int], space: SearchSpace, parent_run_id: str,
                 study_name: str, keep_models: bool, force: bool):
        self.cfg, self.data, self.folds, self.space, self.keep_models = cfg, data, folds, space, keep_models
        self.force = force
        self.parent_run_id, self.study_name = parent_run_id, study_name
        self.current: optuna.Trial | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial
        trial.set_user_attr("mlflow_parent_run", self.parent_run_id)
        keras.backend.clear_session()  # the last trial's graphs and layer names are freed
        values = self.space.suggest(trial)
        tags = {"study": self.study_name, "trial_number": str(trial.number)}
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={shown(v)}" for k, v in values.items()))
        try:
            cfg = with_overrides(self.cfg, values)
            if len(self.folds) == 1:
                value, pruned = self._fold(trial, cfg, self.folds[0], 0, self.parent_run_id, tags,
                                           run_name=f"trial-{trial.number}")
            else:
                value, pruned = self._folds(trial, cfg, tags)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:5000])
            self.current = None
            raise
        self.current = None  # only a Ctrl-C leaves it set: that trial is queued again
        if pruned:
            raise optuna.TrialPruned(f"{self.cfg.train.monitor} below the median of earlier trials at epoch {pruned}")
        return value

    def _fold(self, trial, cfg, fold, index, parent, tags, run_name=None) -> tuple[float, int | None]:
        reporter = _Reporter(trial, index * cfg.train.epochs, cfg.train.monitor)
        result = fit.train_fold(cfg, fold, data=self.data, parent_run_id=parent, callbacks=(reporter,), tags=tags,
                                run_name=run_name, log_model=self.keep_models, force=self.force)
        return result.best_value, reporter.pruned_at

    def _folds(self, trial, cfg, tags) -> tuple[float, int | None]:
        """Several folds: a trial run with the mean, the folds' runs nested in it."""
        with runs.tracked_run(run_name=f"trial-{trial.number}", parent_run_id=self.parent_run_id,
                                  nested=True) as run:
            mlflow.set_tags({**tags, "folds": ",".join(map(str, self.folds))})
            runs.log_config(cfg)
            scores = []
            for index, fold in enumerate(self.folds):
                value, pruned = self._fold(trial, cfg, fold, index, run.info.run_id, tags)
                scores.append(value)
                mlflow.log_metric(f"best_{cfg.train.monitor}_fold{fold}", value)
                if pruned:
                    return float(np.mean(scores)), pruned
            mlflow.log_metrics({f"best_{cfg.train.monitor}": float(np.mean(scores)),
                                f"std_{cfg.train.monitor}": float(np.std(scores))})
        return float(np.mean(scores)), None


def state_counts(study: optuna.Study) -> dict[str, int]:
    """How many of the study's trials are in each state, by the state's name in lower case."""
    return {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}


def log_study(study: optuna.Study) -> dict[str, Any] | None:
    """Best value and params and Optuna's plots on the active (parent) run; the best trial's summary."""
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    mlflow.log_metrics({f"trials_{k}": v for k, v in state_counts(study).items()})
    if not done:
        return None
    best = study.best_trial
    mlflow.log_metrics({"best_value": best.value, "best_trial": best.number})
    mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
    mlflow.log_dict({"value": best.value, "trial": best.number, "params": best.params}, "best_params.json")
    import matplotlib.pyplot as plt  # Optuna's plots draw on pyplot figures
    from optuna.visualization import matplotlib as plots

    for name in ("optimization_history", "param_importances", "parallel_coordinate", "slice"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(plots, f"plot_{name}")(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("no %s plot yet: %s", name, exc)
            continue
        fig = np.ravel(axes)[0].figure
        fig.set_size_inches(max(fig.get_size_inches()[0], 10), max(fig.get_size_inches()[1], 5))
        mlflow.log_figure(fig, f"plots/{name}.png")
        plt.close(fig)
    return {"value": best.value, "number": best.number, "params": best.params}


@dataclass(frozen=True)
class Tuning:
    """A tuning worker's settings (``python -m rfcx_mlops.tune``'s flags, checked)."""

    config: str  # the preset file
    search: str  # the search space file
    storage: str  # an Optuna storage URL
    study_name: str
    n_trials: int  # completed or pruned trials the study should hold
    timeout: float | None  # seconds after which no trial starts
    folds: tuple[int, ...]  # the folds each trial trains
    keep_models: bool
    heartbeat: int  # seconds between a running trial's heartbeats
    force: bool  # train a trial whose estimated peak memory exceeds what this machine has


def sampler_seed(seed: int, storage_url: str, n_existing: int) -> int:
    """Reproducible for a single SQLite worker; workers sharing a server database draw apart."""
    keys = (n_existing,) if scheme(storage_url) == "sqlite" else (n_existing, os.getpid())
    return int(streams.seed_sequence(seed, Purpose.TUNE_SAMPLER, *keys).generate_state(1)[0])


def run(cfg: Config, space: SearchSpace, tuning: Tuning) -> tuple[optuna.Study, dict[str, Any] | None, str]:
    """Open the study and run this worker's trials: the study, the best trial's summary (None before any
    completed) and, when this worker stopped after ``MAX_FAILURES_IN_A_ROW`` failed trials in a row, the last
    error ("" otherwise)."""
    data = fit.prepare(cfg)  # loaded and checked once: bad data fails here, not in every trial
    preset = flatten(cfg)
    study = open_study(
        tuning.storage, tuning.study_name, heartbeat=tuning.heartbeat, stale_trial=RequeueStale(),
        first_trial=space.first_trial(preset),
        sampler_for=lambda n_existing: optuna.samplers.TPESampler(
            seed=sampler_seed(cfg.seed, tuning.storage, n_existing), n_startup_trials=space.sampler_startup_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=space.pruner_startup_trials,
                                           n_warmup_steps=space.pruner_warmup_epochs))
    runs.use_default_experiment()
    with runs.tracked_run(run_name=f"study-{study.study_name}") as parent:
        # Under `mlflow run -e tune` this is the run MLflow opened, which holds the -P values as plain params.
        _log_worker(cfg, study, tuning)
        objective = Objective(cfg, data, list(tuning.folds), space, parent.info.run_id, study.study_name,
                              tuning.keep_models, tuning.force)
        failures = _FailureLimit(MAX_FAILURES_IN_A_ROW)
        _optimize(study, objective, failures, tuning)
        best = log_study(study)
    return study, best, failures.last_error if failures.tripped else ""


def _log_worker(cfg: Config, study: optuna.Study, tuning: Tuning) -> None:
    folds = ",".join(map(str, tuning.folds))
    mlflow.set_tags(runs.tags(cfg, study=study.study_name, storage=redact(tuning.storage), folds=folds))
    mlflow.log_params({"tune.n_trials": tuning.n_trials, "tune.timeout": tuning.timeout, "tune.folds": folds,
                       "tune.search": tuning.search, "tune.config": tuning.config})
    mlflow.log_text(to_yaml(cfg), "config.yaml")
    mlflow.log_text(Path(tuning.search).read_text(), "search.yaml")


def _optimize(study: optuna.Study, objective: Objective, failures: _FailureLimit, tuning: Tuning) -> None:
    """Trials until the study holds ``tuning.n_trials`` counted ones; a Ctrl-C queues the interrupted draw to run
    first next time."""
    counted = sum(t.state in COUNTED for t in study.trials)
    if counted >= tuning.n_trials:
        log.info("study %s already holds %d completed or pruned trials (--n-trials %d)", study.study_name,
                 counted, tuning.n_trials)
        return
    log.info("study %s: %d of %d trials done", study.study_name, counted, tuning.n_trials)
    enough = optuna.study.MaxTrialsCallback(tuning.n_trials, states=COUNTED)
    try:
        study.optimize(objective, timeout=tuning.timeout, catch=(Exception,), callbacks=[state_tag, enough, failures])
    except KeyboardInterrupt:
        if objective.current is not None:
            study.enqueue_trial(objective.current.params)
            state_tag(study, next(t for t in study.get_trials(deepcopy=False)
                                  if t.number == objective.current.number))
        raise


class _FailureLimit:
    """Stops this worker after ``limit`` failed trials in a row: a broken setup, not an unlucky draw."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.tripped, self.last_error = limit, 0, False, ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.in_a_row = self.in_a_row + 1 if trial.state == TrialState.FAIL else 0
        self.last_error = trial.user_attrs.get("error", "")
        if self.in_a_row >= self.limit:
            self.tripped = True
            study.stop()
