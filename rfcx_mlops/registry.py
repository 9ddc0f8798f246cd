"""The Model Registry's command line: register a run's model, evaluate a version, promote it past a gate.

    python -m rfcx_mlops.registry register --run-id ID [--name rfcx]
    python -m rfcx_mlops.registry evaluate --model models:/rfcx/3 --data-dir DIR
    python -m rfcx_mlops.registry promote --model models:/rfcx/4 [--against champion] --data-dir DIR [--min-gain X]
    python -m rfcx_mlops.registry promotions [--name rfcx]

``promote`` exits 0 when the alias moved (or the candidate holds it already) and 3 when the gate
refused it.  The work is ``jobs.registry``'s; names, URIs, folders and the store are checked here
before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rfcx_mlops import cli
from rfcx_mlops.config import CHAMPION, DEFAULT_MODEL
from rfcx_mlops.errors import UserError


def _name(text: str) -> str:
    if not re.fullmatch(r"[\w-]+", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, _ and -; got {text!r}")
    return text


def _alias(text: str) -> str:
    if re.fullmatch(r"latest|v\d+|challenger", _name(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not an alias the gate can move (latest and v<N> are "
                                         "MLflow's, challenger marks every candidate)")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m rfcx_mlops.registry",
                   description="Register runs' models, evaluate versions on labelled recordings, promote one to an "
                               "alias (champion) past a gate. Needs a database-backed MLflow store.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    register = sub.add_parser("register", help="register a run's model (a cross-validation run: its folds' mean)")
    register.add_argument("--run-id", required=True, help="a finished training run or cross-validation run")
    register.add_argument("--name", type=_name, default=DEFAULT_MODEL, help=f"registered model (default {DEFAULT_MODEL})")
    for command, what in (("evaluate", "score a version on labelled recordings; record the figures on its model"),
                          ("promote", "evaluate a version and the alias' version on the same recordings; move "
                                      "the alias when it is better (exit 3 when not)")):
        q = sub.add_parser(command, help=what)
        q.add_argument("--model", required=True, metavar="URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
        q.add_argument("--data-dir", default="",
                       help="labelled recordings: a folder with test_labels.csv and test/ (the demo data), or with "
                            "train_tp.csv and train/ (dataset import-raven); with --fold, default the run's folder")
        q.add_argument("--fold", type=int, default=None, metavar="K",
                       help="only the validation recordings of fold K of the version's run (its folds.csv)")
        if command == "promote":
            q.add_argument("--against", type=_alias, default=CHAMPION,
                           help=f"the alias compared with and moved (default {CHAMPION})")
            q.add_argument("--min-gain", type=cli.non_negative, default=0.0, metavar="X",
                           help="LWLRAP the candidate must gain over the alias' version (default 0: any gain)")
        cli.add_verbose(q)
    table = sub.add_parser("promotions", help="print every promotion decision about a registered model")
    table.add_argument("--name", type=_name, default=DEFAULT_MODEL, help=f"registered model (default {DEFAULT_MODEL})")
    cli.add_verbose(register)
    cli.add_verbose(table)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import mlflow

    from rfcx_mlops.track import registry  # MLflow, not TensorFlow

    if args.command in ("evaluate", "promote"):
        registry.parse(args.model)
        if args.fold is None and not args.data_dir:
            raise UserError("--data-dir: give the labelled recordings to evaluate on (or --fold K)")
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise UserError(f"--data-dir {args.data_dir}: no such folder")
    registry.check_store(mlflow.get_tracking_uri())
    if args.command == "promotions":
        print(registry.promotions_text(args.name))
        return cli.Exit.OK
    if args.command == "register":
        cli.import_quietly("rfcx_mlops.jobs.registry", args.verbose).register(args.run_id, args.name)
        return cli.Exit.OK
    version = registry.resolve(args.model)  # an unknown name, version or alias: before TensorFlow
    job = cli.import_quietly("rfcx_mlops.jobs.registry", args.verbose)
    data = job.evaluation_set_for(version, args.data_dir, args.fold)
    if args.command == "evaluate":
        job.evaluate_in_run(version, data)
        return cli.Exit.OK
    decision = job.promote(version, args.against, data, args.min_gain)
    print(f"\n{registry.promotions_text(version.name)}")
    return cli.Exit.OK if decision.promoted or decision.held else cli.Exit.GATE


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
