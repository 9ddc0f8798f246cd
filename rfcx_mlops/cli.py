"""What the command lines share: one-line errors and exit codes, quiet libraries, TensorFlow imported after the checks.

A command parses and checks its arguments and its config with the standard library, PyYAML
and ``config`` alone, so that ``--help`` and a bad value answer at once; only then does it
import the modules that bring in TensorFlow, through ``import_quietly``.  ``run`` gives every
command the same ending: a ``UserError`` is one line on stderr, and the exit code says what
kind of failure it was (``Exit``).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import importlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from types import ModuleType
from typing import Callable

from rfcx_mlops.config import parse_sets
from rfcx_mlops.errors import UserError
from rfcx_mlops.files import stderr_to_devnull

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a training command says the moment it is interrupted: Keras stops between steps only.
STOPPING = "stopping after the current training step..."


class Exit(enum.IntEnum):
    """A command's exit code: one per kind of ending (README, "Exit codes")."""

    OK = 0
    PROBLEMS = 1  # the job ran and found problems: in the data, recordings not scored, trials failing in a row
    USER_ERROR = 2  # a bad argument, config value, file or run id: nothing was done
    GATE = 3  # a result below the gate asked for (predict --min-lwlrap)
    INTERRUPTED = 130  # Ctrl-C or SIGTERM


def run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace, interrupted: str = "",
        stopping: str = "") -> int:
    """``command(args)``'s exit code, with the libraries quietened; a ``UserError`` is one line on stderr and
    ``Exit.USER_ERROR``, an interruption (Ctrl-C, or SIGTERM as ``mlflow run`` sends it) says ``stopping`` at
    once (where given), then ``interrupted`` when it has stopped, and is ``Exit.INTERRUPTED``."""
    setup(getattr(args, "verbose", False))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _said_at_once(stopping):
            return int(command(args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return Exit.USER_ERROR
    except KeyboardInterrupt:
        print("interrupted" + (f": {interrupted}" if interrupted else ""), file=sys.stderr)
        return Exit.INTERRUPTED


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: ``error: argument --hop: expected seconds > 0; got '0'``."""

    def error(self, message: str):
        self.exit(Exit.USER_ERROR, f"error: {message} (see --help)\n")


# The training commands' flags (MLproject parameters) -> config keys; an empty value keeps the preset's setting.
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


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """The flags of ``OVERRIDES`` and ``--set KEY=VALUE``, which any config key takes."""
    for name, key in OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default="", help=f"overrides {key}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config key, e.g. --set {example} (repeatable)")


def overrides_from(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """The config overrides the flags and ``--set`` ask for, and how each was given (for error messages)."""
    flags = {key: getattr(args, name) for name, key in OVERRIDES.items() if getattr(args, name) != ""}
    sources = {key: f"--{name.replace('_', '-')} {getattr(args, name)}" for name, key in OVERRIDES.items()
               if key in flags}
    return {**flags, **parse_sets(args.set)}, sources


def add_detection(parser: argparse.ArgumentParser) -> None:
    """The flags that replace a run's ``detect`` settings for one scoring (predict, score)."""
    parser.add_argument("--threshold", type=probability, default=None, metavar="X",
                        help="score a detection needs (default: the run's detect.threshold)")
    parser.add_argument("--thresholds", default=None, metavar="FILE",
                        help="a CSV species_id,threshold for the species it lists (default: the run's "
                             "detect.thresholds_file)")
    parser.add_argument("--min-gap", type=seconds, default=None, metavar="SECONDS",
                        help="join a species' detections closer than this (default: the run's detect.min_gap_seconds)")


def detection(args: argparse.Namespace) -> dict[str, object]:
    """The ``detect`` settings ``add_detection``'s flags give (a missing --thresholds file refused)."""
    if args.thresholds and not os.path.isfile(args.thresholds):
        raise UserError(f"--thresholds: {args.thresholds} is not a file")
    given = {"threshold": args.threshold, "thresholds_file": args.thresholds, "min_gap_seconds": args.min_gap}
    return {k: v for k, v in given.items() if v is not None}


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="train even where a run's estimated peak memory exceeds what this machine has "
                             "(docs/experiments.md, \"Memory\")")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own logs too (TensorFlow's C++ log, MLflow's progress bars)")


def _number(text: str, ok, expected: str) -> float:
    """An argparse value: a finite number for which ``ok`` holds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    return _number(text, lambda v: v > 0, "seconds > 0")


def seconds(text: str) -> float:
    return _number(text, lambda v: v >= 0, "seconds >= 0")


def non_negative(text: str) -> float:
    return _number(text, lambda v: v >= 0, "a number >= 0")


def count(text: str) -> int:
    return int(_number(text, lambda v: v >= 1 and v == int(v), "a whole number >= 1"))


def probability(text: str) -> float:
    return _number(text, lambda v: 0 <= v <= 1, "a number within [0, 1]")


def setup(verbose: bool) -> None:
    """Our log lines at INFO; the libraries' chatter off the terminal unless ``verbose``.

    Set before TensorFlow or MLflow is imported, as environment variables they read then; a
    variable the user set wins.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    if not verbose:
        # A progress bar for each checkpoint read back from a local store says nothing.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("rfcx_mlops").setLevel(logging.INFO)


def import_quietly(name: str, verbose: bool) -> ModuleType:
    """Import module ``name``, which brings in TensorFlow, and have TensorFlow find its devices.

    TensorFlow prints a dozen lines of C++ log while it loads (oneDNN, CUDA drivers, CPU
    features, and on a CPU-only machine a cuInit "error"), some of them before any setting
    is read; they go to /dev/null unless ``verbose``.  Python errors are raised as usual.
    """
    with contextlib.nullcontext() if verbose else stderr_to_devnull():
        module = importlib.import_module(name)
        importlib.import_module("tensorflow").config.list_physical_devices()
    return module


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _said_at_once(message: str):
    """Print ``message`` the moment Ctrl-C or SIGTERM arrives.

    Python runs a signal's handler in the main thread between bytecodes, so while the main thread is
    in one long call into a library (a training step) the interrupt waits; the byte the signal writes
    to the wakeup fd reaches this thread at once.  Leaving, the thread is joined: the message comes
    before whatever the main thread says about the interruption.
    """
    if not message or threading.current_thread() is not threading.main_thread():
        yield
        return
    receive, send = socket.socketpair()
    send.setblocking(False)
    previous = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while byte := receive.recv(1):
            if byte[0] in (signal.SIGINT, signal.SIGTERM):
                print(message, file=sys.stderr, flush=True)
                return

    watcher = threading.Thread(target=watch, name="interrupt-notice", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        send.close()  # the watcher reads what came, then the end
        watcher.join()
        receive.close()
