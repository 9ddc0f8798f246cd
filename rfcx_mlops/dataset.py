"""The data folder's command line: ``python -m rfcx_mlops.dataset check DIR`` and ``... import-raven TABLES AUDIO OUT``.

``check`` reads and validates a folder as a training run would (``data.folder``) and prints a
summary, or every problem, one line each with the file and line; ``import-raven`` makes an RFCX
data folder from Raven selection tables (``data.raven``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfcx_mlops import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m rfcx_mlops.dataset",
                        description="Check an RFCX data folder, or make one from Raven selection tables.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    check = sub.add_parser("check", help="validate a data folder and summarise it")
    check.add_argument("data_dir", help="the folder holding train_tp.csv, train_fp.csv, train/ and test/")
    check.add_argument("--n-classes", type=int, default=None,
                       help="species ids run from 0 to this - 1 (default: as DIR/species.csv says, else 24)")
    check.add_argument("--sample-rate", type=int, default=48000, help="the rate training resamples to")
    check.add_argument("--max-problems", type=int, default=50, help="lines of problems to print (0: all)")
    raven = sub.add_parser("import-raven", help="Raven selection tables and their audio -> a data folder to train on")
    raven.add_argument("tables", help="folder of Raven selection tables, one per audio file (<file stem>.*.txt)")
    raven.add_argument("audio", help="folder of the audio files (.flac or .wav)")
    raven.add_argument("out", help="new folder: train_tp.csv, train_fp.csv, species.csv and train/")
    raven.add_argument("--species-map", default=None, metavar="FILE",
                       help="CSV species_id,name giving each species its id (default: ids by sorted name)")
    raven.add_argument("--label-column", default="Species", help="the column naming the species (default Species)")
    raven.add_argument("--absent-label", default="noise",
                       help="boxes with this label hold no species: train_fp.csv rows (default noise)")
    raven.add_argument("--copy", action="store_true", help="copy the audio instead of linking it")
    return parser.parse_args(argv)


def import_raven(args: argparse.Namespace) -> int:
    import pandas as pd

    from rfcx_mlops.data.folder import FP_FILE, SPECIES_MAP, TP_FILE
    from rfcx_mlops.data.raven import import_raven

    names = import_raven(Path(args.tables), Path(args.audio), Path(args.out),
                         species_map=Path(args.species_map) if args.species_map else None,
                         label_column=args.label_column, absent_label=args.absent_label, copy=args.copy)
    tp, fp = (pd.read_csv(Path(args.out) / name) for name in (TP_FILE, FP_FILE))
    print(f"wrote {args.out}: {len(tp)} calls of {tp['species_id'].nunique()} species in "
          f"{len(list((Path(args.out) / 'train').iterdir()))} recordings, {len(fp)} train_fp rows, "
          f"{len(names)} species in {SPECIES_MAP}; next: python -m rfcx_mlops.dataset check {args.out}")
    return cli.Exit.OK


def check(args: argparse.Namespace) -> int:
    from rfcx_mlops.data.folder import scan, species_names, summary

    n_classes = args.n_classes or 1 + max(species_names(Path(args.data_dir)), default=23)
    dataset, problems = scan(args.data_dir, n_classes, args.sample_rate, with_test=True, progress=True)
    print(summary(dataset))
    if not problems:
        print("no problems found")
        return cli.Exit.OK
    print("(the counts above leave out the rows and recordings with problems)")
    shown = problems if args.max_problems <= 0 else problems[: args.max_problems]
    print(f"{len(problems)} problem(s):", file=sys.stderr)
    for line in shown:
        print(f"  {line}", file=sys.stderr)
    if len(shown) < len(problems):
        print(f"  ... and {len(problems) - len(shown)} more (--max-problems 0 lists all)", file=sys.stderr)
    return cli.Exit.PROBLEMS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(import_raven if args.command == "import-raven" else check, args)


if __name__ == "__main__":
    sys.exit(main())
