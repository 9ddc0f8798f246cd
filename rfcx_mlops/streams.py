"""The random streams of a run: one named stream per purpose, so that no two purposes draw the same numbers.

A stream is a numpy Generator made from the config's ``seed`` and a spawn key that starts with
the purpose's id, followed by the purpose's own keys (an epoch, a sample, a batch).  Streams of
two purposes differ in the key's first entry, so their numbers never coincide, whatever their
other keys.

Drawn elsewhere, from the same seed: the folds (scikit-learn's ``StratifiedGroupKFold``,
``random_state=seed``, as the seed notebook did) and the weights' initialisation and dropout
(``keras.utils.set_random_seed(seed)``).
"""

from __future__ import annotations

import enum

import numpy as np


@enum.unique
class Purpose(enum.IntEnum):
    FP_WINDOWS = 1  # which train_fp rows get a training window
    RANDOM_WINDOWS = 2  # where the random training windows go
    EPOCH_ORDER = 3  # an epoch's order of the training samples; keys: epoch
    SAMPLE_DRAWS = 4  # a sample's augmentation draws; keys: epoch, sample, its repeat within the epoch
    MIXUP = 5  # a batch's mixup partners and weights; keys: epoch, batch
    TUNE_SAMPLER = 6  # a tuning worker's sampler; keys: trials the study held, and the worker's process id


def seed_sequence(seed: int, purpose: Purpose, *keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(int(purpose), *map(int, keys)))


def rng(seed: int, purpose: Purpose, *keys: int) -> np.random.Generator:
    """The Generator of ``purpose`` (with its ``keys``) in a run seeded ``seed``."""
    return np.random.default_rng(seed_sequence(seed, purpose, *keys))
