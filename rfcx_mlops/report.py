"""A plain table of an experiment's runs: ``python -m rfcx_mlops.report [--experiment rfcx]``.

One row per run (folds, cross-validation runs, studies and their trials), oldest first:
preset, fold, best val_lwlrap (or val_recording_lwlrap, where that picked the epoch), test LWLRAP
(where predict scored the demo data's test set), best epoch, epochs trained, wall time, and the megabytes of
artifacts it keeps (its own and its logged model's).  The same rows go to a CSV for spreadsheets and
scripts.  Then, where the store has a Model Registry, every registered version with its aliases and
its LWLRAP on each evaluation set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfcx_mlops import cli
from rfcx_mlops.config import DEFAULT_EXPERIMENT
from rfcx_mlops.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m rfcx_mlops.report", description="Print and save a table of runs.")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment name (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--out", default="runs.csv", help="CSV with the same rows (default runs.csv)")
    cli.add_verbose(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import mlflow

    from rfcx_mlops.track.registry import has_registry, versions_table
    from rfcx_mlops.track.report import missing_store, render, runs_table

    problem = missing_store(mlflow.get_tracking_uri())
    if problem:
        raise UserError(f"{problem}; run this where the runs were made, or set MLFLOW_TRACKING_URI to their store")
    try:
        table = runs_table(args.experiment)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    print(render(table) if len(table) else f"experiment {args.experiment!r} has no runs")
    table.to_csv(Path(args.out), index=False)
    print(f"\n{len(table)} run{'' if len(table) == 1 else 's'}; written to {args.out}")
    if has_registry(mlflow.get_tracking_uri()):
        versions = versions_table()
        if len(versions):
            print(f"\nregistered models (aliases; LWLRAP on each evaluation set):\n{versions.to_string(index=False)}")
    return cli.Exit.OK


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
