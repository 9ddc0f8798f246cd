"""Self-training on the calls nobody labelled, tracked in MLflow: ``python -m rfcx_mlops.selftrain --rounds 3``.

The command line of ``jobs.selftrain.selftrain``: round 0 is the teacher (``--teacher RUN_ID``, or
trained first), then each round's student learns from the pseudo-labels of the round before.
``--resume`` continues an interrupted self-training after its last finished round.  Arguments and
the config are checked before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import sys

from rfcx_mlops import cli
from rfcx_mlops.config import check_files, check_fold, load, with_overrides
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.infer import detect


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m rfcx_mlops.selftrain",
                        description="Self-training: a teacher, then rounds of students on its pseudo-labels, "
                                    "tracked in MLflow.")
    parser.add_argument("--fold", type=int, default=1, help="validation fold, 1..folds.n_splits (default 1)")
    parser.add_argument("--config", default="experiments/quick.yaml",
                        help="preset file (default experiments/quick.yaml); its pseudo section sets the labelling")
    parser.add_argument("--teacher", default="", metavar="RUN_ID",
                        help="a finished training run (a fold's or a cross-validation run's) as round 0; "
                             "default: train one")
    parser.add_argument("--rounds", default="", help="students after the teacher (overrides pseudo.rounds)")
    cli.add_overrides(parser, "pseudo.mode=soft")
    parser.add_argument("--resume", default="", metavar="RUN_ID",
                        help="a self-training run to continue after its last finished round (with its own config; "
                             "--rounds may extend it)")
    cli.add_force(parser)
    cli.add_verbose(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    overrides, sources = cli.overrides_from(args)
    if args.rounds:
        overrides["pseudo.rounds"], sources["pseudo.rounds"] = args.rounds, f"--rounds {args.rounds}"
    if args.resume:
        return _resume(args, overrides)
    cfg = load(args.config, overrides, sources)
    check_files(cfg)
    try:
        check_fold(cfg, args.fold)
    except ConfigError as exc:
        raise ConfigError(f"--fold {args.fold}: {exc}") from None
    if cfg.train.batch_size < 2:
        raise ConfigError(f"self-training needs train.batch_size >= 2 (a batch holds both the rows' windows and "
                          f"pseudo-labelled ones); got {cfg.train.batch_size}")
    detect.thresholds(cfg.pseudo, cfg.data.n_classes)  # every line of pseudo.thresholds_file, before any training
    jobs = cli.import_quietly("rfcx_mlops.jobs.selftrain", args.verbose)
    run_id, rounds = jobs.selftrain(cfg, args.fold, teacher=args.teacher or None, force=args.force)
    _summary(run_id, rounds, cfg.train.monitor)
    return cli.Exit.OK


def _resume(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    extra = sorted(set(overrides) - {"pseudo.rounds"})
    if extra or args.teacher:
        raise ConfigError(f"--resume continues self-training run {args.resume} with its own config and teacher; "
                          f"drop {', '.join(extra + (['--teacher'] if args.teacher else []))}")
    jobs = cli.import_quietly("rfcx_mlops.jobs.selftrain", args.verbose)
    cfg, fold = jobs.resumable(args.resume)
    if args.rounds:
        cfg = with_overrides(cfg, {"pseudo.rounds": args.rounds})
    run_id, rounds = jobs.selftrain(cfg, fold, resume=args.resume, force=args.force)
    _summary(run_id, rounds, cfg.train.monitor)
    return cli.Exit.OK


def _summary(run_id: str, rounds, monitor: str) -> None:
    best = max(rounds, key=lambda r: r.best)
    print(f"self-training run {run_id}: {len(rounds) - 1} student round(s); best {monitor} {best.best:.4f} "
          f"in round {best.number} (run {best.run_id})")


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, parse_args(argv),
                   interrupted="the self-training is marked KILLED; --resume RUN_ID continues it",
                   stopping=cli.STOPPING)


if __name__ == "__main__":
    sys.exit(main())
