"""Score recordings with a trained run: ``python -m rfcx_mlops.predict --run-id ID``.

The command line of ``jobs.predict``: arguments are checked before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfcx_mlops import cli
from rfcx_mlops.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m rfcx_mlops.predict",
                   description="Score recordings with a trained run; write a submission CSV.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a training run, or a cross-validation run (its folds averaged)")
    which.add_argument("--model", metavar="URI",
                       help="a registered version: models:/NAME/VERSION or models:/NAME@ALIAS (e.g. models:/rfcx@champion)")
    p.add_argument("--data-dir", default="",
                   help="folder with test/ and sample_submission.csv, or a folder of audio files "
                        "(default: the folder the run trained on)")
    p.add_argument("--out", default="submission.csv", help="output CSV (default submission.csv)")
    p.add_argument("--hop", type=lambda s: cli.positive_seconds(s) if s else None, default=None,
                   help="seconds between windows (default: half a window)")
    p.add_argument("--min-lwlrap", type=float, default=None, metavar="X",
                   help="exit 3 when the test LWLRAP (the demo data's test_labels.csv) is below X: a gate")
    p.add_argument("--detections", default="", metavar="FILE",
                   help="where the detections go (default: detections.csv beside --out)")
    cli.add_detection(p)
    p.add_argument("--raven", default="", metavar="DIR",
                   help="also write one Raven Pro selection table per recording into DIR")
    p.add_argument("--audacity", default="", metavar="DIR",
                   help="also write one Audacity label track per recording into DIR")
    p.add_argument("--plots", default="", metavar="DIR",
                   help="also draw each recording into DIR: its spectrogram with the detections, its top species' scores")
    cli.add_verbose(p)
    p.set_defaults(folds=None)  # a registered cross-validation version's fold models, set by ``check``
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """What can be refused before the models load; ``--model`` becomes the run that logged its model."""
    from rfcx_mlops.data.folder import recordings_to_score  # pandas: after --help and the flags' own checks

    if args.model:
        from rfcx_mlops.track.registry import ensemble_folds, resolve, source_run

        version = resolve(args.model)  # in a store that exists and has a registry
        args.run_id, args.folds = source_run(version), ensemble_folds(version)
        print(f"{args.model}: {version.name} version {version.version}, the model of run {args.run_id}")
    if args.data_dir:
        recordings_to_score(Path(args.data_dir), n_classes=None)
    cli.detection(args)
    for flag in ("raven", "audacity", "plots"):
        folder = getattr(args, flag)
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise UserError(f"--{flag}: {folder} is a file, not a folder")


def request(args: argparse.Namespace, job):
    """``job.Request`` (``jobs.predict``) from the flags."""
    folders = {flag: Path(getattr(args, flag)) if getattr(args, flag) else None
               for flag in ("detections", "raven", "audacity", "plots")}
    return job.Request(args.run_id, Path(args.out), data_dir=args.data_dir, hop=args.hop,
                       detect=cli.detection(args),
                       need_labels=args.min_lwlrap is not None, folds=args.folds, **folders)


def run(args: argparse.Namespace) -> int:
    check(args)
    job = cli.import_quietly("rfcx_mlops.jobs.predict", args.verbose)
    score, skipped = job.run(request(args, job))
    if skipped:
        print(f"error: {len(skipped)} recording(s) could not be scored and have no row:", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)
        return cli.Exit.PROBLEMS
    if args.min_lwlrap is not None and score < args.min_lwlrap:
        print(f"error: test LWLRAP {score:.4f} is below the gate --min-lwlrap {args.min_lwlrap:g}", file=sys.stderr)
        return cli.Exit.GATE
    return cli.Exit.OK


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
