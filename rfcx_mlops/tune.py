"""Tune a preset with Optuna: ``python -m rfcx_mlops.tune --config experiments/quick.yaml --n-trials 20``.

Each trial is ``jobs.fit.train_fold`` on the chosen folds with values drawn from the
search space (``experiments/search.yaml``); its value is the mean best-epoch
value of the config's ``train.monitor`` (val_lwlrap by default).  The study lives in an
Optuna RDB storage (SQLite for one worker, PostgreSQL for many), so the same command
continues it and any number of workers can share it.  Every invocation is one MLflow
parent run with a nested run per trial (``jobs.tune``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from rfcx_mlops import cli
from rfcx_mlops.config import Config, check_files, load, parse_sets
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.jobs import study as studies

DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_SEARCH = "experiments/search.yaml"


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


def retrain_command(args: argparse.Namespace, overrides: dict[str, str], params: dict[str, Any],
                    n_splits: int) -> str:
    sets = {**overrides, **{k: v if isinstance(v, str) else repr(v) for k, v in params.items()}}
    parts = ["python", "-m", "rfcx_mlops.train", "--config", args.config, "--fold", "$fold"]
    for key, value in sets.items():
        parts += ["--set", f"{key}={value}"]
    return f"for fold in {' '.join(map(str, range(1, n_splits + 1)))}; do " + \
        " ".join(p if p == "$fold" else shlex.quote(p) for p in parts) + "; done"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m rfcx_mlops.tune",
                                description="Tune a preset with an Optuna study, tracked in MLflow.")
    p.add_argument("--config", default="experiments/seed.yaml", help="preset to tune (default experiments/seed.yaml)")
    p.add_argument("--n-trials", type=int, default=20,
                   help="run until the study holds this many completed or pruned trials (default 20)")
    p.add_argument("--timeout", type=lambda s: cli.positive_seconds(s) if s else None, default=None,
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
    cli.add_force(p)
    cli.add_verbose(p)
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats; a trial silent for 3 of them is "
                        "taken as lost and queued again (default 60)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.n_trials <= 0:
        raise ConfigError(f"--n-trials must be > 0; got {args.n_trials}")
    if args.heartbeat <= 0:
        raise ConfigError(f"--heartbeat must be > 0; got {args.heartbeat}")
    overrides = parse_sets(args.set)
    sources = {}
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
        sources["data.data_dir"] = f"--data-dir {args.data_dir}"
    cfg = load(args.config, overrides, sources)
    check_files(cfg)
    space = studies.load_space(args.search)
    folds = tuple(parse_folds(args.folds, cfg.folds.n_splits))
    space.check(cfg)  # every value the space can draw must make a valid config with the preset
    studies.scheme(args.storage)
    tuning = cli.import_quietly("rfcx_mlops.jobs.tune", args.verbose)
    settings = tuning.Tuning(args.config, args.search, args.storage, args.study_name or cfg.name, args.n_trials,
                             args.timeout, folds, args.keep_models, args.heartbeat, args.force)
    study, best, failed_with = tuning.run(cfg, space, settings)
    _summary(study, tuning.state_counts(study), best, args, overrides, cfg)
    if failed_with:
        print(f"error: the last {tuning.MAX_FAILURES_IN_A_ROW} trials of this worker failed; the last with: "
              f"{failed_with}", file=sys.stderr)
        return cli.Exit.PROBLEMS
    return cli.Exit.OK


def _summary(study, counts: dict[str, int], best: dict[str, Any] | None, args: argparse.Namespace,
             overrides: dict[str, str], cfg: Config) -> None:
    print(f"\nstudy {study.study_name} ({studies.redact(args.storage)}): "
          + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    if best is None:
        print("no trial has completed yet")
        return
    preset = next((t for t in study.trials if t.user_attrs.get("preset") and t.state.name == "COMPLETE"), None)
    print(f"best {cfg.train.monitor} {best['value']:.4f} (trial {best['number']})"
          + (f"; the preset's own values (trial {preset.number}): {preset.value:.4f}" if preset else ""))
    for key, value in best["params"].items():
        print(f"  {key} = {studies.shown(value)}")
    print("retrain the best configuration on every fold:")
    print("  " + retrain_command(args, overrides, best["params"], cfg.folds.n_splits))


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, parse_args(argv),
                   interrupted="the running trial is marked failed and queued to run first next time",
                   stopping=cli.STOPPING)


if __name__ == "__main__":
    sys.exit(main())
