"""Every purpose of a run draws from its own random stream: no two purposes ever get the same numbers."""

from __future__ import annotations

import sys

import numpy as np

from rfcx_mlops import config, streams
from rfcx_mlops.streams import Purpose


def test_purposes_differ_whatever_their_keys():
    seen = {}
    for purpose in Purpose:
        for keys in [(), (0,), (1,), (0, 0), (1, 0, 0), (0, 1, 2)]:
            state = tuple(streams.seed_sequence(27, purpose, *keys).generate_state(4))
            assert state not in seen, f"{purpose.name}{keys} draws what {seen[state]} draws"
            seen[state] = f"{purpose.name}{keys}"
    a, b = streams.rng(27, Purpose.EPOCH_ORDER, 1), streams.rng(27, Purpose.EPOCH_ORDER, 1)
    assert np.array_equal(a.random(8), b.random(8))  # and each is reproducible


def test_no_two_purposes_of_a_training_run_share_a_stream(tiny_data, monkeypatch):
    """Every stream a run's data draws from (train_fp windows, random windows, two epochs of orders,
    augmentation and mixup, the tuning sampler), recorded as it is made with the function that asked for
    it: each state belongs to one purpose, its keys and one place in the code."""
    from rfcx_mlops.jobs import fit, tune

    cfg = config.load("tests/tiny.yaml", {"data.data_dir": str(tiny_data), "train.fp_windows": 0.5,
                                          "train.random_windows": 0.5, "augment.mixup_p": 0.5})
    owners: dict[tuple, set] = {}
    made = streams.seed_sequence

    def recorded(seed, purpose, *keys):
        sequence = made(seed, purpose, *keys)
        frame = sys._getframe(1)
        while frame.f_globals["__name__"] == streams.__name__:
            frame = frame.f_back
        owners.setdefault(tuple(sequence.generate_state(4)), set()).add(
            (Purpose(purpose), tuple(keys), frame.f_code.co_qualname))
        return sequence

    monkeypatch.setattr(streams, "seed_sequence", recorded)
    batches = fit.fold_batches(cfg, 1, fit.prepare(cfg)).train
    for _ in range(2):
        for index in range(len(batches)):
            batches[index]
        batches.on_epoch_end()
    tune.sampler_seed(cfg.seed, "sqlite:///optuna.db", 0)
    assert {owner[0] for owners_ in owners.values() for owner in owners_} == set(Purpose)
    shared = {state: keys for state, keys in owners.items() if len(keys) > 1}
    assert not shared, f"streams drawn for more than one purpose: {shared}"
