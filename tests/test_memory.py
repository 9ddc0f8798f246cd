"""A run's memory: the estimate against measured peaks, the guard before a run starts, gradient accumulation."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from rfcx_mlops import config, train
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.jobs import fit
from rfcx_mlops.learn import memory
from rfcx_mlops.learn.batches import Samples, make_batches, make_samples
from rfcx_mlops.learn.model import optimizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny.yaml"
SEED = ROOT / "experiments" / "seed.yaml"
GB = memory.GB

# python benchmarks/memory.py on the CI machine (2 cores, 24 GB): peak resident memory of fold 1 of the demo
# data with full caches, its training and validation windows; docs/experiments.md, "Memory".
MEASURED = [  # preset, batch, accumulate_steps, peak GB
    ("quick", 16, 1, 2.39), ("quick", 32, 1, 2.60), ("quick", 64, 1, 3.10),
    ("seed", 4, 1, 4.30), ("seed", 8, 1, 6.47), ("seed", 16, 1, 10.83), ("seed", 32, 1, 19.89),
    ("seed", 16, 4, 4.87), ("seed", 32, 4, 7.09), ("seed", 32, 8, 5.09),
]


def with_train(cfg: config.Config, **changes) -> config.Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


@pytest.mark.parametrize("preset, batch, accumulate, peak", MEASURED)
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(preset, batch, accumulate, peak):
    cfg = config.load(ROOT / "experiments" / f"{preset}.yaml",
                      {"train.batch_size": batch, "train.accumulate_steps": accumulate})
    assert memory.estimate(cfg, 320, 160).total / GB == pytest.approx(peak, rel=0.25)


def test_micro_batches_split_each_step_s_batch(tiny_data):
    cfg = config.load(TINY, {"data.data_dir": str(tiny_data)})
    data = fit.prepare(cfg)
    samples = make_samples(data.tp, data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    whole = make_batches(samples, data.recordings, cfg, training=True)
    split = make_batches(samples, data.recordings, with_train(cfg, accumulate_steps=4), training=True)
    assert len(split) == 4 * split.steps and split.steps == whole.steps - (0 < len(samples) % 8 < 4)
    for step in range(whole.steps - 1):  # the last may be short
        parts = [split._batch(4 * step + j) for j in range(4)]
        assert [len(p) for p in parts] == [2, 2, 2, 2]
        assert sorted(sum(parts, [])) == sorted(whole._batch(step))
    x, y = split[0]
    assert x.shape == (2, 32, 64, 1) and y.shape == (2, cfg.data.n_classes)
    assert make_batches(samples, data.recordings, with_train(cfg, accumulate_steps=4), training=False).batch_size == 2


def test_a_last_step_smaller_than_its_micro_batches_waits_for_the_next_epoch(tiny_data):
    cfg = config.load(TINY, {"data.data_dir": str(tiny_data)})
    data = fit.prepare(cfg)
    samples = make_samples(data.tp, data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    samples = Samples(*(a[:8 * 3 + 2] for a in dataclasses.astuple(samples)))  # three whole steps and 2 samples
    assert make_batches(samples, data.recordings, with_train(cfg, accumulate_steps=2), training=True).steps == 4
    short = make_batches(samples, data.recordings, with_train(cfg, accumulate_steps=4), training=True)
    assert short.steps == 3 and short.samples_per_epoch == 24
    assert all(len(short._batch(i)) == 2 for i in range(len(short)))


def test_accumulated_micro_batches_train_to_the_whole_batch_s_weights(tiny_data, tmp_path):
    """A model without batch normalisation: the mean of 4 micro-batches' gradients is the batch's, step for step,
    the learning-rate schedule included; batches of 2 without accumulation are not."""
    cfg = config.load(TINY, {"data.data_dir": str(tiny_data), "train.steps_per_epoch": 3, "train.epochs": 2,
                             "train.lr_schedule": "cosine", "train.warmup_epochs": 1, "train.learning_rate": 0.01})
    data = fit.prepare(cfg)
    samples = make_samples(data.tp, data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)

    def trained(batch: int, accumulate: int) -> list[np.ndarray]:
        c = with_train(cfg, batch_size=batch, accumulate_steps=accumulate)
        batches = make_batches(samples, data.recordings, c, training=True)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((32, 64, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(cfg.data.n_classes, activation="softmax")])
        model.compile(optimizer(c, batches.steps), loss="categorical_crossentropy")
        model.fit(batches, epochs=2, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations) == 6
        model.save(tmp_path / "model.keras")  # a checkpoint keeps the schedule: a resumed run follows it
        loaded = keras.models.load_model(tmp_path / "model.keras").optimizer.get_config()["learning_rate"]
        assert loaded == model.optimizer.get_config()["learning_rate"]
        return model.get_weights()

    whole, accumulated, small = trained(8, 1), trained(8, 4), trained(2, 1)
    for a, b in zip(whole, accumulated):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(whole[0], small[0], rtol=1e-2, atol=1e-4)


def test_accumulate_steps_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"train.batch_size \(32\) must be a multiple of train.accumulate_steps \(3\)"):
        config.load(SEED, {"train.accumulate_steps": 3})
    with pytest.raises(ConfigError, match="train.accumulate_steps must be > 0"):
        config.load(SEED, {"train.accumulate_steps": 0})


def test_the_check_refuses_warns_or_passes_and_names_what_fits():
    cfg = config.load(SEED)  # batch 32
    estimated = memory.estimate(cfg, 320, 160)
    per_sample = estimated.per_sample
    assert estimated.step == pytest.approx(32 * per_sample)
    assert memory.check(cfg, estimated, estimated.total / 0.7, "available RAM is") is None
    close = memory.check(cfg, estimated, estimated.total / 0.9, "available RAM is")
    assert re.fullmatch(r"seed with train.batch_size 32 needs about [\d.]+ GB at its peak, available RAM is [\d.]+ GB: "
                        r"close to the limit \(docs/experiments.md, \"Memory\"\)", close)
    # what fits leaves a fifth of what is available: a micro-batch of 12 does, 13 does not
    room = (estimated.process + estimated.caches + 12.5 * per_sample) / memory.CLOSE
    with pytest.raises(memory.MemoryRefused) as refused:
        memory.check(cfg, estimated, room, "available RAM is")
    assert str(refused.value).endswith("; --batch-size 12 fits, or the same batch 32 in micro-batches of 8 "
                                       "(--set train.accumulate_steps=4); --force runs it anyway")
    with pytest.raises(memory.MemoryRefused, match="not even a batch of one fits: a smaller image does "
                                                   r"\(experiments/quick.yaml\)"):
        memory.check(cfg, estimated, estimated.process, "available RAM is")
    split = memory.estimate(with_train(cfg, accumulate_steps=4), 320, 160)
    assert split.step == pytest.approx(8 * per_sample)
    assert split.process == pytest.approx(estimated.process + memory.ACCUMULATION_BYTES)
    with pytest.raises(memory.MemoryRefused, match=r"seed with train.batch_size 32 in 4 micro-batches needs .* "
                                                   r"--batch-size 12 fits, or the same batch 32 in micro-batches of 2 "
                                                   r"\(--set train.accumulate_steps=16\)"):
        memory.check(with_train(cfg, accumulate_steps=4), split,
                     (split.process + split.caches + 3.5 * per_sample) / memory.CLOSE, "available RAM is")


def test_on_a_gpu_a_replica_holds_its_share_of_the_micro_batch():
    cfg = with_train(config.load(SEED), accumulate_steps=2)  # micro-batches of 16
    one, four = memory.estimate(cfg, 320, 160, replicas=1), memory.estimate(cfg, 320, 160, replicas=4)
    assert one.caches == four.caches == 0
    assert one.process == four.process == memory.GPU_STATE_BYTES + memory.ACCUMULATION_BYTES
    assert one.step == pytest.approx(4 * four.step) and four.step == pytest.approx(4 * memory.sample_bytes(cfg))
    assert memory.largest_micro_batch(four, four.process + 10.5 * memory.sample_bytes(cfg)) == 42


def test_the_default_command_with_batch_64_is_refused_before_a_run_exists(tiny_data, tracking, monkeypatch, capsys):
    monkeypatch.setattr(memory, "ram_available", lambda: 24e9)  # this project's CI machine
    monkeypatch.setattr(memory, "gpu_free", lambda: None)
    monkeypatch.chdir(ROOT)  # where the command runs; the store stays in tmp_path
    # the tiny data stands in for the demo data: too small for 3 folds
    code = train.main(["--fold", "1", "--batch-size", "64", "--data-dir", str(tiny_data), "--set", "folds.n_splits=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.fullmatch(r"error: seed with train.batch_size 64 needs about (3\d\.\d) GB at its peak, available RAM is "
                        r"24.0 GB; --batch-size (\d+) fits, or the same batch 64 in micro-batches of (\d+) "
                        r"\(--set train.accumulate_steps=(\d+)\); --force runs it anyway", err[0]), err[0]
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_the_default_batch_fits_here_with_its_estimate_logged_and_a_tighter_fit_is_said(tiny_data, monkeypatch,
                                                                                          caplog):
    available = 24e9  # this project's CI machine
    monkeypatch.setattr(memory, "ram_available", lambda: available)
    monkeypatch.setattr(memory, "gpu_free", lambda: None)
    cfg = config.load(SEED, {"data.data_dir": str(tiny_data), "folds.n_splits": 2})
    batches = fit.fold_batches(cfg, 1, fit.prepare(cfg))
    with caplog.at_level("INFO", logger="rfcx_mlops.fit"):
        estimated = fit.check_memory(cfg, batches)
        available = 22e9
        fit.check_memory(cfg, batches)
        too_big = with_train(cfg, batch_size=64)
        assert fit.check_memory(too_big, fit.fold_batches(too_big, 1, fit.prepare(too_big)), force=True).total > 24e9
    assert 18 * GB < estimated.total < memory.CLOSE * 24e9
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" or r.getMessage().startswith("memory")]
    assert re.fullmatch(r"memory: about 1\d\.\d GB at the peak \(process 2.0, step 16.9, caches 0.0\); available RAM is "
                        r"24.0 GB", said[0]), said
    assert re.fullmatch(r"seed with train.batch_size 32 needs about 1\d\.\d GB at its peak, available RAM is 22.0 GB: "
                        r"close to the limit \(docs/experiments.md, \"Memory\"\)", said[1]), said
    assert re.fullmatch(r"seed with train.batch_size 64 needs about 3\d\.\d GB at its peak, available RAM is 22.0 GB: "
                        r"running it anyway \(--force\)", said[3]), said
