"""Score an archive of field recordings: ``python -m rfcx_mlops.score --model ID --audio ROOT --out OUT``.

The command line of ``jobs.score``: arguments, ROOT, OUT and the model are checked before
TensorFlow is imported.  Run the same command again to finish a job that was stopped.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from rfcx_mlops import cli
from rfcx_mlops.errors import UserError

_MASTER = re.compile(r"local(\[(\d+|\*)\])?|spark://\S+|yarn|k8s://\S+")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m rfcx_mlops.score",
                   description="Score every recording under a folder (at any depth) with a trained model, a chunk "
                               "at a time: scores and detections as Parquet, failed.csv, summary.csv.  The same "
                               "command again finishes what a stopped job left.")
    p.add_argument("--model", required=True, metavar="RUN_ID|URI",
                   help="a training run (or cross-validation run) id, or a registered version: models:/NAME/VERSION "
                        "or models:/NAME@ALIAS")
    p.add_argument("--audio", required=True, metavar="ROOT",
                   help="the archive: .flac and .wav files in folders at any depth (the first folder is the site)")
    p.add_argument("--out", required=True, metavar="OUT", help="the results' folder: new, empty, or this job's own")
    p.add_argument("--engine", choices=("local", "spark"), default="local",
                   help="local: worker processes on this machine (default); spark: a Spark application")
    p.add_argument("--master", default="local[*]", metavar="URL",
                   help="with --engine spark: the Spark master (default local[*]; spark://HOST:PORT, yarn, k8s://...)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--workers", type=lambda s: cli.count(s) if s else cores, default=cores,
                   help=f"worker processes, each on one core (default: the cores this process may use, {cores})")
    p.add_argument("--chunk", type=cli.count, default=16,
                   help="recordings committed at a time (default 16; on Spark, a job is CHUNK recordings a core)")
    p.add_argument("--batch", type=cli.count, default=32, help="windows the model scores at a time (default 32)")
    p.add_argument("--hop", type=lambda s: cli.positive_seconds(s) if s else None, default=None,
                   help="seconds between windows (default: half a window; the local engine only)")
    cli.add_detection(p)
    p.add_argument("--min-seconds", type=cli.seconds, default=1.0, metavar="SECONDS",
                   help="a shorter recording is listed in failed.csv, not scored (default 1)")
    p.add_argument("--raven", action="store_true",
                   help="also write a Raven Pro selection table per recording into OUT/raven/, by folder")
    cli.add_verbose(p)
    return p.parse_args(argv)


def check(args: argparse.Namespace):
    """What can be refused before the models load: a ``jobs.score.Request``'s parts."""
    from rfcx_mlops.data.archive import Out, find_audio  # pandas: after --help and the flags' own checks

    if args.engine == "spark":
        _check_spark(args)
    elif args.master != "local[*]":
        raise UserError("--master: only with --engine spark")
    cli.detection(args)
    Out(Path(args.out)).check()
    recordings = find_audio(Path(args.audio))
    run_id, folds = args.model, None
    if args.model.startswith("models:/"):
        from rfcx_mlops.track.registry import ensemble_folds, resolve, source_run

        version = resolve(args.model)
        run_id, folds = source_run(version), ensemble_folds(version)
        print(f"{args.model}: {version.name} version {version.version}, the model of run {run_id}")
    return recordings, run_id, folds


def _check_spark(args: argparse.Namespace) -> None:
    import importlib.util
    import shutil

    if args.hop is not None:
        raise UserError("--hop: the Spark engine scores with the model's own windows, half a window apart")
    if not _MASTER.fullmatch(args.master):
        raise UserError(f"--master {args.master}: expected local, local[N], local[*], spark://HOST:PORT, yarn or "
                        "k8s://URL")
    check_master(args.master)
    if importlib.util.find_spec("pyspark") is None:
        raise UserError("--engine spark needs pyspark: pip install -e '.[spark]'")
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise UserError("--engine spark needs Java 17 or newer (Debian: apt-get install default-jre-headless)")


def check_master(master: str, timeout: float = 5.0) -> None:
    """Refuse a standalone master (spark://host:port) that does not answer, before anything starts."""
    if not master.startswith("spark://"):
        return
    for address in master.removeprefix("spark://").split(","):
        parts = urlparse(f"spark://{address}")
        try:
            with socket.create_connection((parts.hostname or "", parts.port or 7077), timeout=timeout):
                return
        except (OSError, ValueError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    raise UserError(f"--master {master}: cannot be reached ({problem})")


def run(args: argparse.Namespace) -> int:
    recordings, run_id, folds = check(args)
    job = cli.import_quietly("rfcx_mlops.jobs.score", args.verbose)
    done = job.run(job.Request(
        args.model, run_id, recordings, Path(args.audio), Path(args.out), folds=folds, workers=args.workers,
        chunk=args.chunk, batch=args.batch, hop=args.hop, detect=cli.detection(args),
        min_seconds=args.min_seconds, raven=args.raven, engine=args.engine, master=args.master, verbose=args.verbose))
    return cli.Exit.PROBLEMS if done.failed_total else cli.Exit.OK


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, parse_args(argv), interrupted="the chunks committed are kept: run the command again to "
                                                      "finish")


if __name__ == "__main__":
    sys.exit(main())
