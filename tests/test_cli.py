"""The command lines as a person meets them: --help, one-line refusals that name the bad value, no TensorFlow first."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny.yaml"


def run_cli(module: str, *args: str, cwd: Path = ROOT, importtime: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", f"rfcx_mlops.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def imported(proc: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages a ``-X importtime`` run imported."""
    return {m.group(1) for m in re.finditer(r"^import time:.*\|\s+(\w+)\s*$", proc.stderr, re.M)}


@pytest.mark.parametrize("module", ["train", "tune", "selftrain", "predict", "score", "registry", "report", "synth",
                                    "dataset"])
def test_help_answers_without_tensorflow(module):
    proc = run_cli(module, "--help", importtime=True)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m rfcx_mlops.{module}")
    assert "tensorflow" not in imported(proc) and "keras" not in imported(proc)


@pytest.mark.parametrize("module, args, message", [
    ("train", ["--fold", "0"], "error: --fold 0: fold must be within 1..3 (folds.n_splits); got 0"),
    ("train", ["--fold", "x"], "error: --fold must be a number or all; got 'x'"),
    ("train", ["--config", str(TINY), "--epochs", "abc"],
     "error: --epochs abc: train.epochs must be an integer; got 'abc'"),
    ("train", ["--config", str(TINY), "--set", "train.epochs=abc"],
     "error: --set train.epochs=abc: train.epochs must be an integer; got 'abc'"),
    ("train", ["--config", str(TINY), "--set", "model.dropout=2"],
     "error: --set model.dropout=2: model.dropout must be within [0, 1); got 2.0"),
    ("train", ["--config", str(TINY), "--min-snr", "30", "--max-snr", "25"],
     "error: --min-snr 30, --max-snr 25: augment.min_snr (30.0) must not exceed augment.max_snr (25.0)"),
    ("train", ["--bogus"], "error: unrecognized arguments: --bogus (see --help)"),
    ("predict", ["--run-id", "x", "--hop", "0"], "error: argument --hop: expected seconds > 0; got '0' (see --help)"),
    ("predict", ["--run-id", "x", "--hop", "-1"], "error: argument --hop: expected seconds > 0; got '-1' (see --help)"),
    ("predict", ["--run-id", "x", "--hop", "abc"],
     "error: argument --hop: expected seconds > 0; got 'abc' (see --help)"),
    ("predict", ["--run-id", "x", "--data-dir", "/no/such/folder"], "error: /no/such/folder: no such folder"),
    ("score", ["--model", "x", "--audio", "/no/such/folder", "--out", "o"], "error: --audio: /no/such/folder is not a "
     "folder"),
    ("score", ["--model", "x", "--audio", str(ROOT / "docs"), "--out", "o"],
     f"error: --audio: no .flac or .wav file under {ROOT / 'docs'}"),
    ("score", ["--model", "x", "--audio", ".", "--out", "o", "--workers", "0"],
     "error: argument --workers: expected a whole number >= 1; got '0' (see --help)"),
    ("score", ["--model", "x", "--audio", ".", "--out", "o", "--engine", "spark", "--master", "mars"],
     "error: --master mars: expected local, local[N], local[*], spark://HOST:PORT, yarn or k8s://URL"),
    ("score", ["--model", "x", "--audio", ".", "--out", "README.md"], "error: --out: README.md is a file, not a folder"),
    ("tune", ["--config", str(TINY), "--n-trials", "0"], "error: --n-trials must be > 0; got 0"),
    ("tune", ["--config", str(TINY), "--timeout", "0"],
     "error: argument --timeout: expected seconds > 0; got '0' (see --help)"),
    ("tune", ["--config", str(TINY), "--storage", "redis://x"], "error: --storage redis://x: unknown scheme 'redis'; "
     "use sqlite:///FILE (one worker) or postgresql://USER:PASSWORD@HOST/DB (many)"),
    ("synth", ["out", "--recordings", "0"], "error: argument --recordings: must be >= 1, got 0 (see --help)"),
    ("dataset", ["check"], "error: the following arguments are required: data_dir (see --help)"),
    ("registry", ["promote", "--model", "runs:/x/model", "--data-dir", "."],
     "error: --model runs:/x/model: expected models:/NAME/VERSION or models:/NAME@ALIAS (e.g. models:/rfcx@champion)"),
    ("registry", ["evaluate", "--model", "models:/rfcx/1"],
     "error: --data-dir: give the labelled recordings to evaluate on (or --fold K)"),
    ("registry", ["register", "--run-id", "x"],
     "error: no MLflow store here: {cwd}/mlflow.db does not exist; run this where the runs were made, or set "
     "MLFLOW_TRACKING_URI to their store"),
])
def test_a_refusal_is_one_line_before_tensorflow(tmp_path, module, args, message):
    proc = run_cli(module, *args, importtime=True, cwd=tmp_path if module == "registry" else ROOT)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and lines == [message.format(cwd=tmp_path)], proc.stderr[-2000:]
    assert "tensorflow" not in imported(proc)


def test_a_bad_value_in_the_preset_file_names_the_file(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  epochs: many\n")
    proc = run_cli("train", "--config", str(preset), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {preset}: train.epochs must be an integer; got 'many'"]


def test_report_outside_a_store_creates_nothing(tmp_path):
    proc = run_cli("report", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: no MLflow store here: {tmp_path / 'mlflow.db'} does not exist; run "
                                        "this where the runs were made, or set MLFLOW_TRACKING_URI to their store"]
    assert list(tmp_path.iterdir()) == []


def test_dataset_check_help_explains_every_argument():
    proc = run_cli("dataset", "check", "--help")
    assert "the folder holding train_tp.csv" in proc.stdout and "species ids run from 0" in proc.stdout


# --- the README's commands, and those of the pages it links to (docs/, benchmarks/README.md) -----------------------

PLACEHOLDERS = {"<run id>": "0123456789abcdef0123456789abcdef", "<id>": "0123456789abcdef", "<species>": "24"}


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def readme_commands() -> list[str]:
    """Every command line of the bash blocks of the README, docs/*.md and benchmarks/README.md, in that order
    (continuations joined, comments dropped)."""
    text = "\n".join(path.read_text() for path in DOCUMENTS)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_commands_use_what_exists():
    """Each command of the README and the pages it links to names an existing Makefile target, MLproject entry
    point and parameters (with --env-manager local, which a machine without conda needs), or benchmark script,
    or parses with its module's own parser into a valid config.  (Most of them train for hours: the tests run
    their tiny versions.)"""
    from rfcx_mlops import cli, config, dataset, predict, registry, report, score, selftrain, synth, train, tune

    parsers = {m.__name__.split(".")[-1]: m.parse_args
               for m in (dataset, predict, registry, report, score, selftrain, synth, train, tune)}
    makefile = (ROOT / "Makefile").read_text()
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    seen = set()
    for command in readme_commands():
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        words = shlex.split(re.sub(r"\[[^]]*\]", "", command))  # [optional] parts are documented, not typed
        words = [w for w in words if "=" not in w or not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=value prefixes
        if words[:1] == ["make"]:
            assert re.search(rf"^{words[1]}:", makefile, re.M), command
        elif words[:2] == ["mlflow", "run"]:
            entry = words[words.index("-e") + 1] if "-e" in words else "main"
            assert entry in entry_points and "--env-manager" in words, command
            params = [words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "-P"]
            assert set(params) <= set(entry_points[entry]["parameters"]), command
        elif words[0] == "python" and words[1].startswith("benchmarks/"):
            assert (ROOT / words[1]).is_file(), command
        elif words[:2] == ["python", "-m"] and words[2].removeprefix("rfcx_mlops.") in parsers:
            module = words[2].removeprefix("rfcx_mlops.")
            args = parsers[module](words[3:])
            if module in ("train", "selftrain") and not args.resume:  # the preset and overrides make a config
                config.load(ROOT / args.config, *cli.overrides_from(args))
            elif module == "tune":
                config.load(ROOT / args.config, config.parse_sets(args.set))
        else:
            continue
        seen.add(words[0] + " " + words[1])
    assert {"make demo", "make test", "mlflow run", "python -m", "python benchmarks/train_step.py"} <= seen


RUN_AS_WRITTEN = ("python -m rfcx_mlops.dataset check", "python -m rfcx_mlops.dataset import-raven",
                  "python -m rfcx_mlops.report", "python -m rfcx_mlops.predict", "python -m rfcx_mlops.registry",
                  "python -m rfcx_mlops.score")
DEMO_DATA = "data/demo/n480-seed0-v3"  # what make demo builds: the tiny data stands in for it


def test_the_readme_commands_that_need_no_training_run_as_written(cv_run, tiny_data, tmp_path):
    """With the shared tiny cross-validation run for ``<run id>`` and the tiny data for ``/path/to/rfcx``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cv_run.tracking_uri)
    if client.get_experiment_by_name("rfcx") is None:
        client.create_experiment("rfcx")  # the README's experiment: report lists it (no runs in it here)
    env = {**os.environ, "MLFLOW_TRACKING_URI": cv_run.tracking_uri,
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    ran = []
    for command in readme_commands():
        if not command.startswith(RUN_AS_WRITTEN) or ("--engine spark" in command and not shutil.which("java")):
            continue
        command = re.sub(r"\s*\[[^]]*\]", "", command)  # [optional] parts: the defaults
        command = command.replace("<run id>", cv_run.folds[0].info.run_id).replace("/path/to/rfcx", str(tiny_data))
        command = command.replace(DEMO_DATA, str(tiny_data)).replace("/path/to/season", str(tiny_data / "train"))
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        ran.append(command.split()[2])
    assert sorted(set(ran)) == ["rfcx_mlops.dataset", "rfcx_mlops.predict", "rfcx_mlops.registry", "rfcx_mlops.report",
                                "rfcx_mlops.score"]
    assert (tmp_path / "submission.csv").is_file() and (tmp_path / "runs.csv").is_file()
    assert (tmp_path / "champion.csv").is_file()
    assert len(pd.read_parquet(tmp_path / "scores" / "season-1" / "scores")) == len(list((tiny_data / "train").iterdir()))
    assert client.get_registered_model("rfcx").aliases["champion"] == 1
    assert (tmp_path / "out" / "detections.csv").is_file() and (tmp_path / "my-data" / "species.csv").is_file()
    assert any((tmp_path / "out" / "audacity").iterdir()) and any((tmp_path / "out" / "raven").iterdir())


def test_a_training_command_says_at_once_that_it_will_stop(capfd):
    """The main thread busy in a long call (numpy's, as a training step is TensorFlow's) sees Ctrl-C when it returns;
    the notice comes the moment the signal does, and before what the command says after stopping."""
    import numpy as np

    from rfcx_mlops import cli

    def command(args):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.perf_counter()
        a = np.ones((1500, 1500))
        while time.perf_counter() - start < 2:
            a @ a  # the interrupt waits for the product
        return 0

    # Ctrl-C as a terminal delivers it, even where whatever started the tests ignores SIGINT (nohup, `cmd &`)
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = cli.run(command, argparse.Namespace(verbose=False), interrupted="kept", stopping=cli.STOPPING)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert code == cli.Exit.INTERRUPTED
    assert capfd.readouterr().err.splitlines()[-2:] == [cli.STOPPING, "interrupted: kept"]
