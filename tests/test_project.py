"""Project files agree with each other: pins, MLproject parameters, README commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from rfcx_mlops import predict as predict_cli
from rfcx_mlops import tune as tune_cli
from rfcx_mlops.cli import OVERRIDES, overrides_from
from rfcx_mlops.train import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_conda_and_pyproject_pin_the_same_versions():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(deps) == sorted(p for p in pip if p != "-e .")
    assert all(re.fullmatch(r"[a-z0-9_.-]+==[0-9][0-9a-z.]*", d, re.I) for d in deps)
    assert "python=3.11" in conda["dependencies"]


def test_every_mlproject_parameter_reaches_the_command():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    main = spec["entry_points"]["main"]
    params = set(main["parameters"])
    assert {"fold", "config", "data_dir", "epochs", "batch_size", "learning_rate", "dropout", "min_snr",
            "max_snr", "crop_seconds", "seed", "resume"} <= params
    for name in params:
        assert f"{{{name}}}" in main["command"], name
    # ...and the CLI maps each to a config key or a run setting.
    assert params == set(OVERRIDES) | {"fold", "config", "resume"}
    args = parse_args(["--epochs", "3", "--data-dir", "x", "--seed", "5", "--learning-rate", ""])
    assert (args.fold, args.resume) == ("1", "")
    assert overrides_from(args) == ({"train.epochs": "3", "data.data_dir": "x", "seed": "5"},
                                    {"train.epochs": "--epochs 3", "data.data_dir": "--data-dir x", "seed": "--seed 5"})


def test_tune_entry_point_matches_the_cli():
    tune = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["tune"]
    assert set(tune["parameters"]) == {"config", "n_trials", "timeout", "study_name", "storage", "folds", "data_dir"}
    for name in tune["parameters"]:
        assert f"--{name.replace('_', '-')} {{{name}}}" in tune["command"], name
    args = tune_cli.parse_args(["--timeout", "", "--n-trials", "5"])
    assert args.timeout is None and args.n_trials == 5 and args.storage == tune["parameters"]["storage"]["default"]


def test_predict_entry_point_matches_the_cli():
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["predict"]
    for name in entry["parameters"]:
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], name
    args = predict_cli.parse_args(["--run-id", "abc", "--hop", ""])
    assert args.hop is None and args.out == entry["parameters"]["out"]["default"]


def test_selftrain_entry_point_matches_the_cli():
    """The entry point's command, every parameter at its default, parses into the CLI's own defaults."""
    from rfcx_mlops import selftrain as selftrain_cli

    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["selftrain"]
    defaults = {name: spec.get("default", "") for name, spec in entry["parameters"].items()}
    for name in defaults:
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], name
    words = entry["command"].split()[3:]
    args = selftrain_cli.parse_args([w.format(**defaults) if w.startswith("{") else w for w in words])
    assert vars(args) == {**vars(selftrain_cli.parse_args([])), "config": defaults["config"]}


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
