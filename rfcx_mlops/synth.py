"""Build the demo data set: ``python -m rfcx_mlops.synth OUT_DIR`` (the generator: ``data.demo``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from rfcx_mlops import cli
from rfcx_mlops.config import DataConfig
from rfcx_mlops.errors import UserError


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number within [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m rfcx_mlops.synth", description="Build the deterministic RFCX-format demo set.")
    parser.add_argument("out_dir", type=Path, help="output folder (new, empty, or a previous demo build)")
    parser.add_argument("--recordings", type=_count, default=DataConfig.demo_recordings,
                        help=f"train recordings (default {DataConfig.demo_recordings}: the set make demo trains on)")
    parser.add_argument("--test-recordings", type=_count, help="test recordings (default recordings // 5)")
    parser.add_argument("--seed", type=int, default=DataConfig.demo_seed,
                        help=f"random seed (default {DataConfig.demo_seed})")
    parser.add_argument("--workers", type=_count, default=None, help="processes (default: CPU count)")
    parser.add_argument("--labelled-fraction", type=_fraction, default=None, metavar="F",
                        help="share of the train calls train_tp.csv labels, at least one per recording "
                             "(default, or 0: one call per recording, like the real data; 1: every call)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from rfcx_mlops.data.demo import Difficulty, build  # numpy, scipy, soundfile: after --help
    from rfcx_mlops.data.folder import FP_FILE, TP_FILE

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {done}/{total} recordings", flush=True)

    started = time.perf_counter()
    try:
        out = build(args.out_dir, args.recordings, args.test_recordings, args.seed, workers=args.workers,
                    progress=report, difficulty=Difficulty(labelled_fraction=args.labelled_fraction))
    except (FileExistsError, ValueError) as exc:
        raise UserError(str(exc)) from None
    elapsed = time.perf_counter() - started
    n_tp, n_fp = (len((out / name).read_text().splitlines()) - 1 for name in (TP_FILE, FP_FILE))
    n_train, n_test = (len(list((out / split).glob("*.flac"))) for split in ("train", "test"))
    print(f"wrote {out}: {n_train} train + {n_test} test recordings, {n_tp} train_tp rows, {n_fp} train_fp rows, "
          f"train_calls.csv, test_labels.csv, test_calls.csv, sample_submission.csv (seed {args.seed}) "
          f"in {elapsed:.1f} s")
    return cli.Exit.OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
