"""Train one cross-validation fold, tracked in MLflow: ``python -m rfcx_mlops.train --fold 1``.

The command line of ``fit.train_fold`` (and ``fit.train_cv`` for ``--fold all``); ``mlflow run .
-P fold=1`` calls it.  Arguments and the config are checked before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from rfcx_mlops import cli
from rfcx_mlops.config import ConfigError, UserError, check_files, check_fold, load, parse_sets

# MLproject parameter -> config key; an empty value keeps the preset's setting.
OVERRIDES = {
    "data_dir": "data.data_dir",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "dropout": "model.dropout",
    "min_snr": "augment.min_snr",
    "max_snr": "augment.max_snr",
    "crop_seconds": "data.crop_seconds",
    "seed": "seed",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m rfcx_mlops.train", description="Train one fold, tracked in MLflow.")
    parser.add_argument("--fold", default="1",
                        help="validation fold, 1..folds.n_splits, or all: every fold under one CV run (default 1)")
    parser.add_argument("--config", default="experiments/seed.yaml", help="preset file (default experiments/seed.yaml)")
    for name, key in OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default="", help=f"overrides {key}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set model.bn_momentum=0.9 (repeatable)")
    parser.add_argument("--resume", default="", help="run id to continue from its last checkpoint")
    cli.add_verbose(parser)
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """The config overrides the flags and ``--set`` ask for, and how each was given (for error messages)."""
    flags = {key: getattr(args, name) for name, key in OVERRIDES.items() if getattr(args, name) != ""}
    sources = {key: f"--{name.replace('_', '-')} {getattr(args, name)}" for name, key in OVERRIDES.items()
               if key in flags}
    return {**flags, **parse_sets(args.set)}, sources


def _fold(text: str) -> int | None:
    """None for all."""
    if text == "all":
        return None
    if not text.isdigit():
        raise ConfigError(f"--fold must be a number or all; got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup(args.verbose)
    cli.interrupt_on_sigterm()
    try:
        overrides, sources = overrides_from(args)
        fold = _fold(args.fold)
        if args.resume:
            if overrides:
                raise ConfigError(f"resume continues run {args.resume} with its own config; drop "
                                  + ", ".join(sorted(overrides)))
            if fold is None:
                raise ConfigError("resume continues one fold's run: pass its run id with --fold N, not all")
        else:
            cfg = load(args.config, overrides, sources)
            check_files(cfg)
            if fold is not None:
                try:
                    check_fold(cfg, fold)
                except ConfigError as exc:
                    raise ConfigError(f"--fold {fold}: {exc}") from None
        fit = cli.import_quietly("rfcx_mlops.fit", args.verbose)
        if args.resume:
            import mlflow

            cfg = fit.resumed_config(args.resume)
            if mlflow.get_run(args.resume).info.status == "FINISHED":
                print(f"run {args.resume} has finished: nothing left to train")
                return 0
            launcher = os.environ.pop("MLFLOW_RUN_ID", None)
            if launcher and launcher != args.resume:
                # `mlflow run` opened a run of its own for this invocation: point it at the resumed one.
                mlflow.tracking.MlflowClient().set_tag(launcher, "resumed_run_id", args.resume)
        else:
            fit.tracking.use_default_experiment()
        if fold is None:
            run_id, results = fit.train_cv(cfg)
        else:
            result = fit.train_fold(cfg, fold, resume=args.resume or None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run is marked KILLED; its checkpoints so far are kept", file=sys.stderr)
        return 130
    monitor = cfg.train.monitor
    if fold is None:
        for r in results:
            print(f"fold {r.fold} (run {r.run_id}): best {monitor} {r.best_value:.4f} at epoch {r.best_epoch}")
        best = [r.best_value for r in results]
        print(f"cross-validation run {run_id}: best {monitor} {np.mean(best):.4f} +- {np.std(best):.4f} "
              f"over {len(results)} folds")
    else:
        print(f"run {result.run_id}: fold {result.fold} best {monitor} {result.best_value:.4f} "
              f"at epoch {result.best_epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
