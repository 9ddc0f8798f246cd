"""The configuration: frozen dataclasses, the one source of truth for every run.

Presets in ``experiments/`` hold only what differs from these defaults.  ``load``
is strict: an unknown key, a wrong type or an inconsistent value is a
``ConfigError`` naming the key, raised before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from rfcx_mlops.errors import ConfigError, UserError


DEFAULT_EXPERIMENT = "rfcx"  # the MLflow experiment runs log to unless told otherwise
DEFAULT_MODEL = "rfcx"  # the registered model the registry commands use unless told
CHAMPION = "champion"  # the alias of the version in use, which predict and serving follow
VOLUME_MODES = ("uniform", "fade", "cosine", "sine")  # the volume envelopes (augment.VolumeControl)
SHIFT_PADDINGS = ("replace", "zero")  # what a time shift fills the window with (augment.TimeShift)
AUGMENT_DOMAINS = ("spectrogram", "waveform")  # where pitch shift and volume act


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = ""  # empty: build (once) and use the demo data set
    demo_dir: str = "data/demo"  # where the demo data set is cached
    demo_recordings: int = 480  # the demo set `make demo` trains on, as `python -m rfcx_mlops.synth` builds it
    demo_seed: int = 0  # the demo data stays the same when the training seed changes
    sample_rate: int = 48000  # audio at another rate is resampled to this
    n_classes: int = 24
    crop_seconds: float = 10.0  # window centred on each labelled call

    @property
    def window_samples(self) -> int:
        """A window's length in samples at ``sample_rate``."""
        return int(round(self.crop_seconds * self.sample_rate))


@dataclass(frozen=True)
class FeatureConfig:
    n_fft: int = 2048
    hop_length: int = 512
    fmin: float = 84.0
    fmax: float = 15056.0
    n_mels: int = 128
    frames: int = 1876  # time axis after resizing
    top_db: float = 80.0  # dynamic range kept below each sample's loudest mel bin
    band_median: bool = False  # subtract each mel band's median level over the window (steady background)
    backend: str = "numpy"  # numpy: data workers make the images | tensorflow: the model's first layer (GPU)


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    noise_p: float = 1.0  # OneOf(Gaussian, pink) noise
    min_snr: float = 5.0  # dB, relative to the window's peak amplitude
    max_snr: float = 20.0
    pitch_p: float = 1.0
    max_semitones: int = 5  # whole semitones drawn from -max..+max
    time_shift_p: float = 1.0
    max_shift_seconds: float = 4.0
    shift_padding: str = "replace"  # replace | zero
    volume_p: float = 1.0
    max_volume_db: float = 10.0
    volume_mode: str = "sine"  # uniform | fade | cosine | sine
    # where pitch and volume act: spectrogram (fast) | waveform (the seed preset's phase vocoder)
    domain: str = "spectrogram"
    # SpecAugment: masks of the image, set to its floor (0), up to the given share of the frames / mel bands each
    time_mask_p: float = 0.0
    time_masks: int = 2
    max_time_mask: float = 0.1
    freq_mask_p: float = 0.0
    freq_masks: int = 2
    max_freq_mask: float = 0.1
    # mixup: with probability mixup_p a training image is mixed with another of its batch, weight ~ Beta(a, a)
    mixup_p: float = 0.0
    mixup_alpha: float = 0.4


@dataclass(frozen=True)
class FoldConfig:
    n_splits: int = 3


@dataclass(frozen=True)
class ModelConfig:
    dense_units: int = 1024
    dropout: float = 0.3
    bn_momentum: float = 0.99  # Keras' default, as in the seed
    activation: str = "softmax"  # softmax | sigmoid
    # crossentropy: categorical with softmax, binary with sigmoid, every species not labelled in a window counted
    # absent | masked: binary on what is known (a TP call overlapping the window = 1, a train_fp row = 0)
    loss: str = "crossentropy"
    unknown_weight: float = 0.0  # masked: the weight of the unknown entries, as absent (0: ignored)
    weights: str = "none"  # none | imagenet | a .weights.h5 file of the ResNet50 backbone (3-channel input)
    head: str = "pooled"  # pooled: the seed preset's | attention: per-step scores pooled over time (finer detections)
    # attention: the weight of a second loss, on each species' highest step score, which teaches the steps
    # themselves (0: the pooled clip score alone)
    step_loss_weight: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32  # samples per optimizer step
    accumulate_steps: int = 1  # each step's gradient summed over this many micro-batches: less memory, same step
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine
    warmup_epochs: int = 0
    workers: int = 0  # input pipeline threads; 0: one per core
    cache_audio: bool = True  # keep each training window's decoded audio in memory (16-bit: ~1 MB per 10 s)
    steps_per_epoch: int = 0  # 0: one pass over the training samples
    run_eagerly: bool = False  # skips graph tracing: only for tiny smoke runs
    mixed_precision: bool = False  # float16 compute, float32 weights and outputs: for GPUs with tensor cores
    distribute: bool = False  # tf.distribute.MirroredStrategy: each batch split over every local GPU
    keep_checkpoint: str = "until_finished"  # until_finished: a finished run keeps its model only | always: + last.keras
    system_metrics: bool = False  # MLflow system metrics (CPU, memory; GPU with nvidia-ml-py) every 10 s
    fp_windows: float = 0.0  # training windows centred on train_fp rows, as a share of those on train_tp rows
    random_windows: float = 0.0  # training windows at random places of the training recordings, as the same share
    recording_eval_every: int = 0  # score the validation recordings whole every k epochs (val_recording_lwlrap); 0: never
    recording_hop_seconds: float = 0.0  # the sliding window's hop there; 0: half a crop, as predict
    monitor: str = "val_lwlrap"  # val_lwlrap | val_recording_lwlrap: picks the best epoch; what tuning optimises


@dataclass(frozen=True)
class DetectConfig:
    threshold: float = 0.5  # a species is detected where its score over time reaches this ...
    thresholds_file: str = ""  # ... or what this CSV (species_id,threshold) says for the species it lists
    min_gap_seconds: float = 1.0  # detections of a species closer than this are one


@dataclass(frozen=True)
class PseudoConfig:
    """Self-training (``python -m rfcx_mlops.selftrain``): the teacher labels the calls nobody labelled in the
    training recordings, a student learns from them and becomes the next round's teacher."""

    rounds: int = 3  # students after the teacher (round 0), fewer where train.monitor stops improving
    patience: int = 1  # rounds in a row without a better train.monitor before stopping
    mode: str = "hard"  # hard: a pseudo-labelled species is 1 | soft: the teacher's score
    threshold: float = 0.8  # a window's species is pseudo-labelled present from this teacher score ...
    thresholds_file: str = ""  # ... or what this CSV (species_id,threshold) says, as detect.thresholds_file
    negatives: float = 0.0  # below this score, known absent (used by model.loss: masked); 0: positives only
    # at most this many pseudo-labels of a species per labelled call of it (a train_tp row of the labelled
    # recordings), the most confident first; 0: no cap
    per_call: float = 0.0
    hop_seconds: float = 0.0  # between the teacher's windows on a training recording; 0: half a crop
    share: float = 0.5  # of each training batch, the share of windows on the original train_tp/train_fp rows
    from_teacher: bool = False  # a student starts from its teacher's weights instead of from scratch


@dataclass(frozen=True)
class Config:
    name: str = "default"
    seed: int = 27  # drives folds, augmentation and weight initialisation
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)

    def __post_init__(self) -> None:
        _validate(self)


_CHOICES = {
    "augment.shift_padding": SHIFT_PADDINGS,
    "augment.volume_mode": VOLUME_MODES,
    "augment.domain": AUGMENT_DOMAINS,
    "features.backend": ("numpy", "tensorflow"),
    "model.activation": ("softmax", "sigmoid"),
    "model.loss": ("crossentropy", "masked"),
    "model.head": ("pooled", "attention"),
    "train.monitor": ("val_lwlrap", "val_recording_lwlrap"),
    "train.lr_schedule": ("constant", "cosine"),
    "pseudo.mode": ("hard", "soft"),
    "train.keep_checkpoint": ("until_finished", "always"),
}


_POSITIVE = (
    "data.sample_rate", "data.n_classes", "data.crop_seconds", "data.demo_recordings",
    "features.n_fft", "features.hop_length", "features.n_mels", "features.frames", "features.top_db",
    "model.dense_units", "train.epochs", "train.batch_size", "train.accumulate_steps", "train.learning_rate",
    "pseudo.rounds", "pseudo.patience",
)
_PROBABILITIES = (
    "augment.noise_p", "augment.pitch_p", "augment.time_shift_p", "augment.volume_p", "augment.time_mask_p",
    "augment.freq_mask_p", "augment.mixup_p", "augment.max_time_mask", "augment.max_freq_mask",
    "model.unknown_weight", "detect.threshold", "pseudo.threshold", "pseudo.negatives",
)
_NON_NEGATIVE = (
    "augment.max_semitones", "augment.max_shift_seconds", "augment.max_volume_db", "augment.time_masks",
    "augment.freq_masks", "train.warmup_epochs", "train.workers", "train.steps_per_epoch", "train.fp_windows",
    "train.random_windows", "train.recording_eval_every", "train.recording_hop_seconds",
    "detect.min_gap_seconds", "model.step_loss_weight", "pseudo.hop_seconds", "pseudo.per_call",
)


def allowed_values(key: str) -> tuple[str, ...] | None:
    """The values config key ``key`` takes where it takes a fixed set of them, else None."""
    return _CHOICES.get(key)


def _validate(cfg: Config) -> None:
    flat = flatten(cfg)
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {flat[key]!r}")
    for key in _POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{key} must be > 0; got {flat[key]}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0; got {flat[key]}")
    for key in _PROBABILITIES:
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"{key} must be within [0, 1]; got {flat[key]}")
    if cfg.augment.min_snr > cfg.augment.max_snr:
        raise ConfigError(
            f"augment.min_snr ({cfg.augment.min_snr}) must not exceed augment.max_snr ({cfg.augment.max_snr})"
        )
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be within [0, 1); got {cfg.model.dropout}")
    if not 0.0 < cfg.model.bn_momentum < 1.0:
        raise ConfigError(f"model.bn_momentum must be within (0, 1); got {cfg.model.bn_momentum}")
    for key in ("features.n_mels", "features.frames"):
        if flat[key] < 32:
            raise ConfigError(f"{key} must be >= 32 (ResNet50 downsamples by 32); got {flat[key]}")
    if cfg.features.backend == "tensorflow" and cfg.augment.enabled and cfg.augment.domain != "spectrogram":
        raise ConfigError("features.backend: tensorflow needs augment.domain: spectrogram")
    if cfg.train.batch_size % cfg.train.accumulate_steps:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of train.accumulate_steps "
                          f"({cfg.train.accumulate_steps}): a step's micro-batches are all the same size")
    if cfg.train.warmup_epochs and cfg.train.lr_schedule == "constant":
        raise ConfigError("train.warmup_epochs needs train.lr_schedule: cosine")
    if cfg.model.activation == "softmax" and cfg.model.loss == "masked":
        raise ConfigError("model.loss: masked needs model.activation: sigmoid (a softmax cannot leave a species unknown)")
    if cfg.model.head == "attention" and cfg.model.activation != "sigmoid":
        raise ConfigError("model.head: attention needs model.activation: sigmoid (its per-species pooling of the "
                          "steps' scores would not sum to one)")
    if cfg.model.unknown_weight and cfg.model.loss != "masked":
        raise ConfigError("model.unknown_weight needs model.loss: masked")
    if not cfg.augment.mixup_alpha > 0:
        raise ConfigError(f"augment.mixup_alpha must be > 0; got {cfg.augment.mixup_alpha}")
    if cfg.augment.mixup_p and cfg.features.backend == "tensorflow":
        raise ConfigError("augment.mixup_p needs features.backend: numpy (mixup mixes the images the workers make)")
    if cfg.train.monitor == "val_recording_lwlrap" and not cfg.train.recording_eval_every:
        raise ConfigError("train.monitor: val_recording_lwlrap needs train.recording_eval_every >= 1")
    if cfg.model.weights not in ("none", "imagenet") and not cfg.model.weights.endswith(".h5"):
        raise ConfigError(f"model.weights must be none, imagenet or a .weights.h5 file; got {cfg.model.weights!r}")
    if cfg.pseudo.negatives >= cfg.pseudo.threshold:
        raise ConfigError(f"pseudo.negatives ({cfg.pseudo.negatives}) must be below pseudo.threshold "
                          f"({cfg.pseudo.threshold}): a score cannot make a species both present and absent")
    if not 0.0 < cfg.pseudo.share < 1.0:
        raise ConfigError(f"pseudo.share must be within (0, 1): a student's batches hold both; got {cfg.pseudo.share}")
    if cfg.folds.n_splits < 2:
        raise ConfigError(f"folds.n_splits must be >= 2; got {cfg.folds.n_splits}")
    if not 0 <= cfg.features.fmin < cfg.features.fmax <= cfg.data.sample_rate / 2:
        raise ConfigError(
            f"features.fmin < features.fmax <= data.sample_rate/2 is required; got "
            f"fmin={cfg.features.fmin}, fmax={cfg.features.fmax}, sample_rate={cfg.data.sample_rate}"
        )


def check_files(cfg: Config) -> None:
    """The files a config names exist on this machine (left out of ``load``: predicting needs none of them)."""
    if cfg.model.weights not in ("none", "imagenet") and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights: {cfg.model.weights} is not a file")
    for key, file in (("detect", cfg.detect.thresholds_file), ("pseudo", cfg.pseudo.thresholds_file)):
        if file and not Path(file).is_file():
            raise ConfigError(f"{key}.thresholds_file: {file} is not a file")


def check_fold(cfg: Config, fold: int) -> None:
    if not 1 <= fold <= cfg.folds.n_splits:
        raise ConfigError(f"fold must be within 1..{cfg.folds.n_splits} (folds.n_splits); got {fold}")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.learning_rate": 0.001, ...}``: the dotted names used for MLflow params."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the default's type; ints are accepted where floats are expected."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and math.isfinite(value):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {_KINDS[expected]}; got {value!r}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping; got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        f = known[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, default)
    return cls(**kwargs)


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted} conflicts with another override")
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
         sources: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the preset file at ``path``, then dotted ``overrides`` (``{"train.epochs": 2}``).

    A preset may start from another: ``extends: ../quick.yaml`` (relative to its file) merges it
    underneath, so a variant states only what it changes.  A preset without a ``name`` is named
    after its file (``experiments/seed.yaml`` -> ``seed``), not after the one it extends.
    An error names where the bad value came from: the file, or the override as ``sources`` spells
    it (``{"train.epochs": "--epochs abc"}``; default ``--set train.epochs=abc``).
    """
    overrides = dict(overrides or {})
    values = _read_preset(Path(path)) if path is not None else {}
    given = {key: (sources or {}).get(key, f"--set {key}={value}") for key, value in overrides.items()}
    for key in overrides:
        _check_key(key)
    try:
        return from_dict(_merge(values, _nest(overrides)))
    except ConfigError as exc:
        # Blame the overrides the message names (the preset was fine), else all of them.
        blamed = [where for key, where in given.items() if key in str(exc)] or list(given.values())
        raise ConfigError(f"{', '.join(blamed)}: {exc}") from None


def _read_preset(path: Path) -> dict[str, Any]:
    """The preset's values merged over those of the presets it extends.

    Each file must make a valid config over the files beneath it, so an error names the file that broke it.
    """
    chain = _extends_chain(path)
    values: dict[str, Any] = {}
    for file, loaded in chain:
        values = _merge(values, loaded)
        try:
            from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
    return {**values, "name": chain[-1][1].get("name", path.stem)}


def _extends_chain(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The file at ``path`` and those it extends, base first, each with its values less ``extends``."""
    chain = [(path, _read_mapping(path))]
    while "extends" in chain[-1][1]:
        holder, values = chain[-1]
        base = values.pop("extends")
        if not isinstance(base, str):
            raise ConfigError(f"{holder}: extends must be a path relative to the file; got {base!r}")
        target = Path(os.path.normpath(holder.parent / base))
        if not target.is_file():
            raise ConfigError(f"{holder}: extends {base}: no such file {target}")
        if any(target.resolve() == file.resolve() for file, _ in chain):
            cycle = " -> ".join(str(file) for file, _ in [*chain, (target, None)])
            raise ConfigError(f"{holder}: extends {base}: a cycle ({cycle})")
        chain.append((target, _read_mapping(target)))
    return chain[::-1]


def _read_mapping(path: Path) -> dict[str, Any]:
    loaded = read_yaml(path, "config file")
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return dict(loaded)


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted ``overrides`` applied, checked like any config."""
    return from_dict(_merge(to_dict(cfg), _nest(overrides)))


def read_csv(path: Path, error: type[UserError] = ConfigError):
    """A small CSV's cells as text under its header: a pandas DataFrame.  Unreadable, or a row with an extra
    field (read without a header, pandas would quietly make the first column its index), is ``error``."""
    import pandas as pd  # only where a CSV is read: the command lines answer --help without it

    try:
        cells = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not a readable CSV ({str(exc).strip().splitlines()[0]})") from None
    return cells.iloc[1:].set_axis(cells.iloc[0].tolist(), axis=1).reset_index(drop=True)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content ({} when empty); a missing file or bad YAML is a ``ConfigError``."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["train.epochs=3", ...]`` (the CLIs' ``--set``) as overrides for ``load``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE; got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _check_key(dotted: str) -> None:
    """An override names an existing key: its error must not be blamed on the preset file."""
    node: Any = Config()
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key {dotted} ({section} is a value, not a section)")
        names = sorted(f.name for f in fields(node))
        if part not in names:
            where = f" in {section}" if section else ""
            raise ConfigError(f"unknown config key {dotted} (known{where}: {', '.join(names)})")
        node = getattr(node, part)


def from_dict(values: Mapping[str, Any]) -> Config:
    """A config from nested values, as ``to_dict`` writes them."""
    return _build(Config, values, "")
