"""Train one cross-validation fold, tracked in MLflow: ``python -m rfcx_mlops.train --fold 1``.

The command line of ``jobs.fit.train_fold`` (``jobs.fit.train_cv`` for ``--fold all``, ``jobs.fit.resume`` for
``--resume``); ``mlflow run . -P fold=1`` calls it.  Arguments and the config are checked before TensorFlow is
imported.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from rfcx_mlops import cli
from rfcx_mlops.config import Config, check_files, check_fold, load
from rfcx_mlops.errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m rfcx_mlops.train", description="Train one fold, tracked in MLflow.")
    parser.add_argument("--fold", default="1",
                        help="validation fold, 1..folds.n_splits, or all: every fold under one CV run (default 1)")
    parser.add_argument("--config", default="experiments/seed.yaml", help="preset file (default experiments/seed.yaml)")
    cli.add_overrides(parser, "model.bn_momentum=0.9")
    parser.add_argument("--resume", default="", help="run id to continue from its last checkpoint")
    cli.add_force(parser)
    cli.add_verbose(parser)
    return parser.parse_args(argv)


def _fold(text: str) -> int | None:
    """None for all."""
    if text == "all":
        return None
    if not text.isdigit():
        raise ConfigError(f"--fold must be a number or all; got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    overrides, sources = cli.overrides_from(args)
    fold = _fold(args.fold)
    if args.resume:
        return _resume(args, overrides, fold)
    cfg = load(args.config, overrides, sources)
    check_files(cfg)
    if fold is not None:
        try:
            check_fold(cfg, fold)
        except ConfigError as exc:
            raise ConfigError(f"--fold {fold}: {exc}") from None
    fit = cli.import_quietly("rfcx_mlops.jobs.fit", args.verbose)
    cv_run_id, results = fit.train(cfg, fold, force=args.force)
    for r in results:
        _print_fold(cfg, r)
    if cv_run_id is None:
        return cli.Exit.OK
    best = [r.best_value for r in results]
    print(f"cross-validation run {cv_run_id}: best {cfg.train.monitor} {np.mean(best):.4f} +- {np.std(best):.4f} "
          f"over {len(results)} folds")
    return cli.Exit.OK


def _resume(args: argparse.Namespace, overrides: dict[str, str], fold: int | None) -> int:
    if overrides:
        raise ConfigError(f"resume continues run {args.resume} with its own config; drop "
                          + ", ".join(sorted(overrides)))
    if fold is None:
        raise ConfigError("resume continues one fold's run: pass its run id without --fold all")
    fit = cli.import_quietly("rfcx_mlops.jobs.fit", args.verbose)
    cfg, result = fit.resume(args.resume, force=args.force)
    if result is None:
        print(f"run {args.resume} has finished: nothing left to train")
    else:
        _print_fold(cfg, result)
    return cli.Exit.OK


def _print_fold(cfg: Config, result) -> None:
    print(f"run {result.run_id}: fold {result.fold} best {cfg.train.monitor} {result.best_value:.4f} "
          f"at epoch {result.best_epoch}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, parse_args(argv), interrupted="the run is marked KILLED; its checkpoints so far are kept",
                   stopping=cli.STOPPING)


if __name__ == "__main__":
    sys.exit(main())
