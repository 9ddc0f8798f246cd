"""Tune a preset with Optuna: ``python -m rfcx_mlops.tune --config experiments/quick.yaml --n-trials 20``.

Each trial is ``train.train_fold`` on the chosen folds with values drawn from the
search space (``experiments/search.yaml``); its value is the mean best-epoch
val_lwlrap.  The study lives in an Optuna RDB storage (SQLite for one worker,
PostgreSQL for many), so the same command continues it and any number of workers
can share it.  Every invocation is one MLflow parent run with a nested run per trial.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
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

from rfcx_mlops import dataset, tracking, train
from rfcx_mlops.study import open_study, redact
from rfcx_mlops.config import Config, ConfigError, flatten, from_dict, load, parse_sets, read_yaml, to_dict, to_yaml

log = logging.getLogger("rfcx_mlops.tune")
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_SEARCH = "experiments/search.yaml"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --n-trials counts; a failed trial is not counted
MAX_FAILURES_IN_A_ROW = 3


@dataclass(frozen=True)
class Range:
    key: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    above: str | None = None
    integer: bool = False

    def suggest(self, trial: optuna.Trial, drawn: dict[str, float]) -> float:
        low = max(self.low, drawn[self.above]) if self.above else self.low
        if self.integer:
            return trial.suggest_int(self.key, math.ceil(low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, low, self.high, log=self.log, step=self.step)


@dataclass(frozen=True)
class SearchSpace:
    ranges: tuple[Range, ...]
    sampler_startup_trials: int = 4
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int = 6

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        drawn: dict[str, float] = {}
        for r in self.ranges:
            drawn[r.key] = r.suggest(trial, drawn)
        return drawn


def load_space(path: str | Path) -> SearchSpace:
    """The search space file; every inconsistency is a ``ConfigError`` naming the file and key."""
    path = Path(path)
    doc = read_yaml(path, "search space file")

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{path}: {msg}")

    if not isinstance(doc, dict) or set(doc) - {"space", "sampler", "pruner"}:
        raise fail("expected the sections space, sampler and pruner")
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise fail("space: no ranges to search")
    defaults = flatten(Config())
    ranges: list[Range] = []
    for key, spec in space.items():
        default = defaults.get(key)
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise fail(f"{key}: not a numeric config key")
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or \
                set(spec) - {"low", "high", "log", "step", "above"}:
            raise fail(f"{key}: expected {{low, high}} and optionally log, step, above; got {spec!r}")
        try:
            r = Range(key, float(spec["low"]), float(spec["high"]), bool(spec.get("log", False)),
                      None if spec.get("step") is None else float(spec["step"]), spec.get("above"),
                      isinstance(default, int))
        except (TypeError, ValueError):
            raise fail(f"{key}: low, high and step must be numbers; got {spec!r}") from None
        if not r.low < r.high:
            raise fail(f"{key}: empty or inverted range: low {r.low:g} must be below high {r.high:g}")
        if r.log and r.low <= 0:
            raise fail(f"{key}: a log range needs low > 0; got {r.low:g}")
        if r.step is not None and not 0 < r.step <= r.high - r.low:
            raise fail(f"{key}: step must be within (0, high - low]; got {r.step:g}")
        if r.above is not None:
            ref = next((x for x in ranges if x.key == r.above), None)
            if ref is None:
                raise fail(f"{key}: above: {r.above} must be a range listed before it")
            if ref.high >= r.high:
                raise fail(f"{key}: high {r.high:g} must exceed the high of {r.above} ({ref.high:g})")
        ranges.append(r)

    def count(section: str, name: str, default: int) -> int:
        value = (doc.get(section) or {}).get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(f"{section}.{name} must be an integer >= 0; got {value!r}")
        return value

    return SearchSpace(tuple(ranges), count("sampler", "startup_trials", 4), count("pruner", "startup_trials", 3),
                       count("pruner", "warmup_epochs", 6))


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted ``values`` replaced; the config's own checks apply."""
    nested = to_dict(cfg)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(nested)


def _trial_runs(parent_run_id: str, study: str, number: int) -> list[mlflow.entities.Run]:
    """The MLflow runs of one trial (a trial run, or a trial run and its folds' runs), found by their tags."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    quoted = study.replace("'", "\\'")
    return client.search_runs([experiment], f"tags.study = '{quoted}' and tags.trial_number = '{number}'")


class _RequeueStale:
    """For a trial whose worker stopped sending heartbeats: its MLflow runs end KILLED, its params run again."""

    def __init__(self):
        self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning("trial %d went stale (its worker stopped sending heartbeats): queued again", trial.number)
        parent = trial.user_attrs.get("mlflow_parent_run")
        if parent:
            client = MlflowClient()
            reason = f"trial {trial.number}: its worker stopped sending heartbeats (killed or hung)"
            runs = _trial_runs(parent, study.study_name, trial.number)
            for run in runs:
                client.set_tag(run.info.run_id, "trial_state", TrialState.FAIL.name)
                tracking.drop_checkpoints(run.info.run_id, keep_last=False)  # the trial runs again from scratch
            for run in [client.get_run(parent), *runs]:
                if run.info.status == "RUNNING":
                    client.set_tag(run.info.run_id, "failure_reason", reason)
                    client.set_terminated(run.info.run_id, "KILLED")
        self._retry(study, trial)


class _Reporter(keras.callbacks.Callback):
    """Feeds each epoch's val_lwlrap to the pruner; ends the fit, not the run, when the pruner says so."""

    def __init__(self, trial: optuna.Trial, first_step: int):
        super().__init__()
        self.trial = trial
        self.first_step = first_step
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        step = self.first_step + epoch + 1
        self.trial.report(float((logs or {}).get("val_lwlrap", np.nan)), step)
        if self.trial.should_prune():
            self.pruned_at = step
            self.model.stop_training = True


def _state_tag(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
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
    runs = _trial_runs(parent, study.study_name, trial.number)
    if not runs:
        run = client.create_run(client.get_run(parent).info.experiment_id, run_name=f"trial-{trial.number}",
                                tags={"mlflow.parentRunId": parent, "study": study.study_name,
                                      "trial_number": str(trial.number)})
        for key, value in trial.params.items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FAILED")
        runs = [run]
    for run in runs:
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
        if trial.state == TrialState.FAIL:  # a failed trial is not resumed: its draw is queued anew or dropped
            tracking.drop_checkpoints(run.info.run_id, keep_last=False)


class Objective:
    """One trial: draw values, train each fold in nested MLflow runs, return the mean best val_lwlrap."""

    def __init__(self, cfg: Config, folds: list[int], space: SearchSpace, parent_run_id: str, study_name: str,
                 keep_models: bool):
        self.cfg, self.folds, self.space, self.keep_models = cfg, folds, space, keep_models
        self.parent_run_id, self.study_name = parent_run_id, study_name
        self.current: optuna.Trial | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial
        trial.set_user_attr("mlflow_parent_run", self.parent_run_id)
        keras.backend.clear_session()  # the last trial's graphs and layer names are freed
        values = self.space.suggest(trial)
        tags = {"study": self.study_name, "trial_number": str(trial.number)}
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
        try:
            cfg = with_values(self.cfg, values)
            if len(self.folds) == 1:
                value, pruned = self._fold(trial, cfg, self.folds[0], 0, self.parent_run_id,
                                           {**tags, "mlflow.runName": f"trial-{trial.number}"})
            else:
                value, pruned = self._folds(trial, cfg, tags)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:5000])
            self.current = None
            raise
        self.current = None  # only a Ctrl-C leaves it set: that trial is queued again
        if pruned:
            raise optuna.TrialPruned(f"val_lwlrap below the median of earlier trials at epoch {pruned}")
        return value

    def _fold(self, trial, cfg, fold, index, parent, tags) -> tuple[float, int | None]:
        reporter = _Reporter(trial, index * cfg.train.epochs)
        result = train.train_fold(cfg, fold, parent_run_id=parent, callbacks=(reporter,), tags=tags,
                                  log_model=self.keep_models)
        return result.best_val_lwlrap, reporter.pruned_at

    def _folds(self, trial, cfg, tags) -> tuple[float, int | None]:
        """Several folds: a trial run with the mean, the folds' runs nested in it."""
        with mlflow.start_run(run_name=f"trial-{trial.number}", parent_run_id=self.parent_run_id, nested=True) as run:
            mlflow.set_tags({**tags, "folds": ",".join(map(str, self.folds))})
            tracking.log_config(cfg)
            scores = []
            for index, fold in enumerate(self.folds):
                value, pruned = self._fold(trial, cfg, fold, index, run.info.run_id, tags)
                scores.append(value)
                mlflow.log_metric(f"best_val_lwlrap_fold{fold}", value)
                if pruned:
                    return float(np.mean(scores)), pruned
            mlflow.log_metrics({"best_val_lwlrap": float(np.mean(scores)), "std_val_lwlrap": float(np.std(scores))})
        return float(np.mean(scores)), None


def parse_folds(text: str, n_splits: int) -> list[int]:
    if text.strip() == "all":
        return list(range(1, n_splits + 1))
    try:
        folds = [int(f) for f in text.split(",")]
    except ValueError:
        raise ConfigError(f"--folds expects fold numbers like 1 or 1,2,3 or all; got {text!r}") from None
    bad = [f for f in folds if not 1 <= f <= n_splits]
    if bad or len(set(folds)) != len(folds):
        raise ConfigError(f"--folds {text}: each fold once, within 1..{n_splits} (folds.n_splits)")
    return folds


def log_study(study: optuna.Study) -> dict[str, Any] | None:
    """Best value and params and Optuna's plots on the active (parent) run; the best trial's summary."""
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
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


def retrain_command(args: argparse.Namespace, overrides: dict[str, str], params: dict[str, Any],
                    n_splits: int) -> str:
    sets = {**overrides, **{k: repr(v) for k, v in params.items()}}
    parts = ["python", "-m", "rfcx_mlops.train", "--config", args.config, "--fold", "$fold"]
    for key, value in sets.items():
        parts += ["--set", f"{key}={value}"]
    return f"for fold in {' '.join(map(str, range(1, n_splits + 1)))}; do " + \
        " ".join(p if p == "$fold" else shlex.quote(p) for p in parts) + "; done"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rfcx_mlops.tune",
                                description="Tune a preset with an Optuna study, tracked in MLflow.")
    p.add_argument("--config", default="experiments/seed.yaml", help="preset to tune (default experiments/seed.yaml)")
    p.add_argument("--n-trials", type=int, default=20,
                   help="run until the study holds this many completed or pruned trials (default 20)")
    p.add_argument("--timeout", type=lambda s: float(s) if s else None, default=None,
                   help="stop starting trials after this many seconds")
    p.add_argument("--study-name", default="", help="default: the preset's name")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage URL (default {DEFAULT_STORAGE}; postgresql://... for many workers)")
    p.add_argument("--folds", default="1", help="folds each trial trains: 1, 1,2,3 or all (default 1)")
    p.add_argument("--data-dir", default="", help="RFCX data folder (default: the demo data)")
    p.add_argument("--search", default=DEFAULT_SEARCH, help=f"search space file (default {DEFAULT_SEARCH})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every trial, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--keep-models", action="store_true",
                   help="log each trial's servable model (about 100 MB each for ResNet50); by default trials keep "
                        "their metrics and plots, and the best configuration is retrained")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats; a trial silent for 3 of them is "
                        "taken as lost and queued again (default 60)")
    return p.parse_args(argv)


def _sampler_seed(seed: int, storage_url: str, n_existing: int) -> int:
    """Reproducible for a single SQLite worker; workers sharing a server database draw apart."""
    parts = [seed, n_existing] + ([] if storage_url.startswith("sqlite") else [os.getpid()])
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def run(args: argparse.Namespace) -> int:
    if args.n_trials <= 0:
        raise ConfigError(f"--n-trials must be > 0; got {args.n_trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0; got {args.timeout:g}")
    if args.heartbeat <= 0:
        raise ConfigError(f"--heartbeat must be > 0; got {args.heartbeat}")
    overrides = parse_sets(args.set)
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    cfg = load(args.config, overrides)
    space = load_space(args.search)
    folds = parse_folds(args.folds, cfg.folds.n_splits)
    for r in space.ranges:  # every corner of the space must make a valid config
        for value in (r.low, r.high):
            with_values(cfg, {r.key: int(value) if r.integer else value})
    data_dir, _ = train.resolve_data_dir(cfg)
    dataset.load(data_dir, cfg.data.n_classes, cfg.data.sample_rate)  # bad data fails here, not in every trial

    preset = flatten(cfg)
    study = open_study(
        args.storage, args.study_name or cfg.name, heartbeat=args.heartbeat, stale_trial=_RequeueStale(),
        first_trial={r.key: preset[r.key] for r in space.ranges},
        sampler_for=lambda n_existing: optuna.samplers.TPESampler(
            seed=_sampler_seed(cfg.seed, args.storage, n_existing), n_startup_trials=space.sampler_startup_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=space.pruner_startup_trials,
                                           n_warmup_steps=space.pruner_warmup_epochs))
    return optimize(study, cfg, folds, space, args, overrides)


def optimize(study: optuna.Study, cfg: Config, folds: list[int], space: SearchSpace, args: argparse.Namespace,
             overrides: dict[str, str]) -> int:
    counted = sum(t.state in COUNTED for t in study.trials)
    remaining = args.n_trials - counted
    tracking.use_default_experiment()
    with mlflow.start_run(run_name=f"study-{study.study_name}") as parent:
        # Under `mlflow run -e tune` this is the run MLflow opened, which holds the -P values as plain params.
        mlflow.set_tags({"mlflow.runName": f"study-{study.study_name}", "study": study.study_name,
                         "storage": redact(args.storage), "preset": cfg.name, "git_commit": tracking.git_commit(),
                         "folds": ",".join(map(str, folds))})
        mlflow.log_params({"tune.n_trials": args.n_trials, "tune.timeout": args.timeout, "tune.folds": args.folds,
                           "tune.search": args.search, "tune.config": args.config})
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.log_text(Path(args.search).read_text(), "search.yaml")
        objective = Objective(cfg, folds, space, parent.info.run_id, study.study_name, args.keep_models)
        failures = _FailureLimit(MAX_FAILURES_IN_A_ROW)
        if remaining > 0:
            log.info("study %s: %d of %d trials done", study.study_name, counted, args.n_trials)
            enough = optuna.study.MaxTrialsCallback(args.n_trials, states=COUNTED)
            try:
                study.optimize(objective, timeout=args.timeout, catch=(Exception,),
                               callbacks=[_state_tag, enough, failures])
            except KeyboardInterrupt:
                if objective.current is not None:  # the interrupted draw runs first next time
                    study.enqueue_trial(objective.current.params)
                    _state_tag(study, next(t for t in study.get_trials(deepcopy=False)
                                           if t.number == objective.current.number))
                mlflow.set_tag("failure_reason", "interrupted (Ctrl-C or SIGTERM)")
                mlflow.end_run("KILLED")
                raise
        else:
            log.info("study %s already holds %d completed or pruned trials (--n-trials %d)", study.study_name,
                     counted, args.n_trials)
        best = log_study(study)
    _summary(study, best, args, overrides, cfg.folds.n_splits)
    if failures.tripped:
        print(f"error: the last {MAX_FAILURES_IN_A_ROW} trials of this worker failed; the last with: "
              f"{failures.last_error}", file=sys.stderr)
        return 1
    return 0


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


def _summary(study: optuna.Study, best: dict[str, Any] | None, args, overrides, n_splits: int) -> None:
    states = {s: sum(t.state == s for t in study.trials) for s in TrialState}
    print(f"\nstudy {study.study_name} ({redact(args.storage)}): "
          + ", ".join(f"{n} {s.name.lower()}" for s, n in states.items() if n))
    if best is None:
        print("no trial has completed yet")
        return
    preset = next((t for t in study.trials if t.user_attrs.get("preset") and t.state == TrialState.COMPLETE), None)
    print(f"best val_lwlrap {best['value']:.4f} (trial {best['number']})"
          + (f"; the preset's own values (trial {preset.number}): {preset.value:.4f}" if preset else ""))
    for key, value in best["params"].items():
        print(f"  {key} = {value:.6g}")
    print("retrain the best configuration on every fold:")
    print("  " + retrain_command(args, overrides, best["params"], n_splits))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    train.interrupt_on_sigterm()
    try:
        return run(args)
    except train.USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial is marked failed and queued to run first next time",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
