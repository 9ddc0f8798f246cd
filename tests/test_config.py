"""Config loading is strict, and the seed preset reproduces the notebook's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rfcx_mlops import config
from rfcx_mlops.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if p.name != "search.yaml")  # search.yaml: tuning


def test_seed_preset_matches_the_brief():
    cfg = config.load(ROOT / "experiments" / "seed.yaml")
    expected = {
        "name": "seed", "seed": 27, "data.sample_rate": 48000, "data.crop_seconds": 10.0, "data.n_classes": 24,
        "features.n_fft": 2048, "features.hop_length": 512, "features.fmin": 84.0, "features.fmax": 15056.0,
        "features.n_mels": 128, "features.frames": 1876,
        "augment.enabled": True, "augment.noise_p": 1.0, "augment.min_snr": 5.0, "augment.max_snr": 20.0,
        "augment.pitch_p": 1.0, "augment.max_semitones": 5, "augment.time_shift_p": 1.0,
        "augment.max_shift_seconds": 4.0, "augment.shift_padding": "replace", "augment.volume_p": 1.0,
        "augment.max_volume_db": 10.0, "augment.volume_mode": "sine",
        "folds.n_splits": 3,
        "model.dense_units": 1024, "model.dropout": 0.3, "model.activation": "softmax", "model.bn_momentum": 0.99,
        "train.epochs": 10, "train.batch_size": 32, "train.learning_rate": 0.001, "train.lr_schedule": "constant",
    }
    flat = config.flatten(cfg)
    assert {k: flat[k] for k in expected} == expected


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_holds_only_overrides(preset):
    cfg = config.load(preset)
    assert cfg.name == preset.stem
    if preset.stem != "seed":  # the seed preset spells out every setting on purpose
        flat_default = config.flatten(config.Config())
        overrides = config.flatten(config.from_dict(yaml.safe_load(preset.read_text())))
        listed = _listed_keys(yaml.safe_load(preset.read_text()))
        assert all(overrides[k] != flat_default[k] for k in listed if k != "name"), "a preset repeats a default"


def _listed_keys(values, prefix=""):
    keys = []
    for k, v in values.items():
        keys += _listed_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def test_overrides_and_round_trip(tmp_path):
    cfg = config.load(ROOT / "experiments" / "seed.yaml", {"train.epochs": "3", "model.dropout": 0.5})
    assert cfg.train.epochs == 3 and cfg.model.dropout == 0.5
    assert config.from_dict(config.to_dict(cfg)) == cfg
    path = tmp_path / "again.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.foo": 1}, "unknown config key train.foo"),
        ({"trian.epochs": 1}, "unknown config key trian"),
        ({"augment.min_snr": 25.0}, "augment.min_snr (25.0) must not exceed augment.max_snr (20.0)"),
        ({"train.learning_rate": 0}, "train.learning_rate must be > 0"),
        ({"train.learning_rate": -1e-3}, "train.learning_rate must be > 0"),
        ({"train.epochs": "ten"}, "--set train.epochs=ten: train.epochs must be an integer; got 'ten'"),
        ({"model.dropout": 1.0}, "model.dropout must be within [0, 1)"),
        ({"augment.volume_mode": "loud"}, "augment.volume_mode must be one of uniform, fade, cosine, sine"),
        ({"data.crop_seconds": 0}, "data.crop_seconds must be > 0"),
        ({"features.fmax": 30000.0}, "features.fmin < features.fmax <= data.sample_rate/2"),
        ({"folds.n_splits": 1}, "folds.n_splits must be >= 2"),
        ({"augment.noise_p": 1.5}, "augment.noise_p must be within [0, 1]"),
        ({"features.n_mels": 16}, "features.n_mels must be >= 32 (ResNet50 downsamples by 32)"),
        ({"train.warmup_epochs": 2}, "train.warmup_epochs needs train.lr_schedule: cosine"),
        ({"model.loss": "focal"}, "model.loss must be one of crossentropy, masked"),
        ({"model.loss": "masked"}, "model.loss: masked needs model.activation: sigmoid"),
        ({"model.head": "sed"}, "model.head must be one of pooled, attention"),
        ({"model.head": "attention"}, "model.head: attention needs model.activation: sigmoid"),
        ({"model.step_loss_weight": -0.5}, "model.step_loss_weight must be >= 0"),
        ({"detect.threshold": 1.5}, "detect.threshold must be within [0, 1]"),
        ({"detect.min_gap_seconds": -1.0}, "detect.min_gap_seconds must be >= 0"),
        ({"train.fp_windows": -1.0}, "train.fp_windows must be >= 0"),
        ({"train.random_windows": -0.5}, "train.random_windows must be >= 0"),
        ({"model.unknown_weight": 0.1, "model.activation": "sigmoid"}, "model.unknown_weight needs model.loss: masked"),
        ({"model.unknown_weight": 2.0, "model.activation": "sigmoid", "model.loss": "masked"},
         "model.unknown_weight must be within [0, 1]"),
        ({"model.weights": "resnet.pt"}, "model.weights must be none, imagenet or a .weights.h5 file"),
        ({"train.monitor": "val_loss"}, "train.monitor must be one of val_lwlrap, val_recording_lwlrap"),
        ({"train.monitor": "val_recording_lwlrap"}, "needs train.recording_eval_every >= 1"),
        ({"train.recording_eval_every": -1}, "train.recording_eval_every must be >= 0"),
        ({"augment.mixup_p": 1.5}, "augment.mixup_p must be within [0, 1]"),
        ({"augment.mixup_alpha": 0.0}, "augment.mixup_alpha must be > 0"),
        ({"augment.mixup_p": 0.5, "features.backend": "tensorflow"}, "augment.mixup_p needs features.backend: numpy"),
        ({"augment.max_time_mask": 1.5}, "augment.max_time_mask must be within [0, 1]"),
        ({"augment.freq_masks": -1}, "augment.freq_masks must be >= 0"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.load(ROOT / "experiments" / "seed.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_override_is_not_blamed_on_the_preset():
    with pytest.raises(ConfigError) as err:
        config.load(ROOT / "experiments" / "seed.yaml", {"train.epoch": 3})
    assert str(err.value).startswith("unknown config key train.epoch (known in train: accumulate_steps, batch_size, cache_audio,")
    with pytest.raises(ConfigError, match=r"unknown config key seed.x \(seed is a value, not a section\)"):
        config.load(None, {"seed.x": 1})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "nested.yaml").write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        config.load(tmp_path / "nested.yaml")


def test_images_in_the_model_need_spectrogram_augmentation():
    with pytest.raises(ConfigError, match="features.backend: tensorflow needs augment.domain: spectrogram"):
        config.load(None, {"features.backend": "tensorflow", "augment.domain": "waveform"})
    assert config.load(None, {"features.backend": "tensorflow", "augment.enabled": False}).features.backend


def test_warm_up_then_cosine_schedule_values():
    from rfcx_mlops.learn.model import learning_rate

    cfg = config.load(None, {"train.lr_schedule": "cosine", "train.warmup_epochs": 2, "train.epochs": 10,
                             "train.learning_rate": 0.002})
    schedule = learning_rate(cfg, steps_per_epoch=5)  # 10 warm-up steps, then 40 of cosine decay
    values = {step: float(schedule(step)) for step in (0, 5, 10, 30, 50)}
    assert values == pytest.approx({0: 0.0, 5: 0.001, 10: 0.002, 30: 0.001, 50: 0.0}, abs=1e-7)
    assert learning_rate(config.load(None, {}), 5) == 0.001  # constant: the number itself


def test_a_weights_file_must_exist_where_training_runs(tmp_path):
    cfg = config.load(None, {"model.weights": str(tmp_path / "missing.weights.h5")})  # predicting elsewhere needs none
    with pytest.raises(ConfigError, match=r"model.weights: .*missing.weights.h5 is not a file"):
        config.check_files(cfg)
    (tmp_path / "missing.weights.h5").write_bytes(b"")
    config.check_files(cfg)
    thresholds = config.load(None, {"detect.thresholds_file": str(tmp_path / "t.csv")})
    with pytest.raises(ConfigError, match=r"detect.thresholds_file: .*t.csv is not a file"):
        config.check_files(thresholds)


ABLATION = {  # experiments/ablation/<name>.yaml: the overrides of quick.yaml each stands for (the README's runs)
    "a-today": {},
    "b-masked": {"model.activation": "sigmoid", "model.loss": "masked", "train.fp_windows": 0.5},
    "b2-masked": {"model.activation": "sigmoid", "model.loss": "masked", "train.fp_windows": 0.5,
                  "model.unknown_weight": 0.5},
    "e-mixup": {"augment.mixup_p": 0.5, "augment.time_mask_p": 0.5, "augment.freq_mask_p": 0.5},
    "f-recording": {"augment.mixup_p": 0.5, "augment.time_mask_p": 0.5, "augment.freq_mask_p": 0.5,
                    "train.monitor": "val_recording_lwlrap"},
    "g-random": {"model.activation": "sigmoid", "model.loss": "masked", "model.unknown_weight": 0.5,
                 "train.fp_windows": 0.5, "train.random_windows": 1.0, "train.steps_per_epoch": 20},
    "h-random": {"model.activation": "sigmoid", "train.fp_windows": 0.5, "train.random_windows": 1.0,
                 "train.steps_per_epoch": 20},
    "i-prior": {"model.activation": "sigmoid", "model.loss": "masked", "model.unknown_weight": 0.5,
                "train.fp_windows": 0.25, "train.random_windows": 0.5, "train.steps_per_epoch": 20},
    "k-even": {"train.random_windows": 0.5, "train.steps_per_epoch": 20},
    "m-attention": {"model.activation": "sigmoid", "model.loss": "masked", "model.unknown_weight": 0.5,
                    "train.fp_windows": 0.25, "train.random_windows": 0.5, "train.steps_per_epoch": 20,
                    "model.head": "attention", "model.step_loss_weight": 0},
    "n-steps": {"model.activation": "sigmoid", "model.loss": "masked", "model.unknown_weight": 0.5,
                "train.fp_windows": 0.25, "train.random_windows": 0.5, "train.steps_per_epoch": 20,
                "model.head": "attention"},
}


def test_the_ablation_folder_holds_the_listed_runs():
    assert sorted(p.stem for p in (ROOT / "experiments" / "ablation").glob("*.yaml")) == sorted(ABLATION)


@pytest.mark.parametrize("name", sorted(ABLATION))
def test_an_ablation_preset_is_quick_with_its_overrides_and_states_only_them(name):
    path = ROOT / "experiments" / "ablation" / f"{name}.yaml"
    cfg = config.load(path)
    assert cfg.name == name
    expected = config.flatten(config.load(ROOT / "experiments" / "quick.yaml", ABLATION[name]))
    assert {**config.flatten(cfg), "name": "quick"} == expected
    text = path.read_text()
    assert text.startswith(f"# {name}: ")  # what the recipe is
    doc = yaml.safe_load(text)
    base = config.flatten(config.load(path.parent / doc.pop("extends")))
    flat = config.flatten(cfg)
    assert [k for k in _listed_keys(doc) if flat[k] == base[k]] == [], "repeats what the preset it extends says"


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_extends_merges_a_chain_deep_base_first_each_path_relative_to_its_file(tmp_path):
    _write(tmp_path, "base.yaml", "seed: 1\ntrain:\n  epochs: 3\n  batch_size: 8\nmodel:\n  dropout: 0.1\n")
    _write(tmp_path, "mid/mid.yaml", "extends: ../base.yaml\ntrain:\n  epochs: 4\nmodel:\n  dense_units: 64\n")
    leaf = _write(tmp_path, "mid/leaf/leaf.yaml", "extends: ../mid.yaml\ntrain:\n  epochs: 5\n")
    cfg = config.load(leaf)
    got = (cfg.seed, cfg.train.epochs, cfg.train.batch_size, cfg.model.dropout, cfg.model.dense_units)
    assert got == (1, 5, 8, 0.1, 64)
    assert cfg.train.learning_rate == config.TrainConfig().learning_rate  # what no file says stays the default
    assert "extends" not in config.to_dict(cfg) and "extends" not in config.to_yaml(cfg)
    assert config.load(leaf, {"train.epochs": 6}).train.epochs == 6  # overrides still come last


def test_extends_is_not_a_config_key():
    with pytest.raises(ConfigError, match="unknown config key extends"):
        config.load(None, {"extends": "quick.yaml"})


def test_a_preset_is_named_after_its_own_file_not_the_one_it_extends(tmp_path):
    _write(tmp_path, "base.yaml", "name: base-run\n")
    assert config.load(_write(tmp_path, "leaf.yaml", "extends: base.yaml\n")).name == "leaf"
    assert config.load(_write(tmp_path, "named.yaml", "extends: base.yaml\nname: mine\n")).name == "mine"
    assert config.load(tmp_path / "base.yaml").name == "base-run"


def test_a_file_of_the_chain_is_checked_over_those_it_extends(tmp_path):
    _write(tmp_path, "sigmoid.yaml", "model:\n  activation: sigmoid\n")
    masked = _write(tmp_path, "masked.yaml", "extends: sigmoid.yaml\nmodel:\n  loss: masked\n")
    assert config.load(masked).model.loss == "masked"  # masked alone, over the softmax default, is no config
    softmax = _write(tmp_path, "softmax.yaml", "extends: masked.yaml\nmodel:\n  activation: softmax\n")
    assert _error(softmax).startswith(f"{softmax}: model.loss: masked needs model.activation: sigmoid")


def test_a_missing_base_names_both_files(tmp_path):
    leaf = _write(tmp_path, "sub/x.yaml", "extends: ../nope.yaml\n")
    assert _error(leaf) == f"{leaf}: extends ../nope.yaml: no such file {tmp_path / 'nope.yaml'}"


def test_a_cycle_names_the_chain(tmp_path):
    a = _write(tmp_path, "a.yaml", "extends: b.yaml\n")
    b = _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    assert _error(a) == f"{b}: extends a.yaml: a cycle ({a} -> {b} -> {a})"
    itself = _write(tmp_path, "self.yaml", "extends: ./self.yaml\n")
    assert _error(itself) == f"{itself}: extends ./self.yaml: a cycle ({itself} -> {itself})"


@pytest.mark.parametrize("value, shown", [("[base.yaml]", "['base.yaml']"), ("", "None"), ("3", "3")])
def test_extends_must_be_a_path(tmp_path, value, shown):
    _write(tmp_path, "base.yaml", "seed: 1\n")
    leaf = _write(tmp_path, "leaf.yaml", f"extends: {value}\n")
    assert _error(leaf) == f"{leaf}: extends must be a path relative to the file; got {shown}"


def test_an_unknown_key_is_blamed_on_the_file_that_holds_it(tmp_path):
    base = _write(tmp_path, "base.yaml", "train:\n  epoch: 3\n")
    leaf = _write(tmp_path, "leaf.yaml", "extends: base.yaml\nseed: 1\n")
    assert _error(leaf).startswith(f"{base}: unknown config key train.epoch (known: ")
    _write(tmp_path, "base.yaml", "seed: 2\n")
    typo = _write(tmp_path, "typo.yaml", "extends: base.yaml\nmodle:\n  dropout: 0.1\n")
    assert _error(typo).startswith(f"{typo}: unknown config key modle (known: ")
