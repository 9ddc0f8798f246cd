"""LWLRAP: the numpy value against scikit-learn, and the streaming Keras metric against the numpy value."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.metrics import label_ranking_average_precision_score

from rfcx_mlops.learn.metrics import StreamingLWLRAP, lwlrap


def random_multilabel(rng, n=97, c=24):
    y = (rng.random((n, c)) < 0.08).astype(np.float32)
    y[rng.random(n) < 0.1] = 0  # some rows without a label
    scores = rng.random((n, c)).astype(np.float32)  # continuous: no ties
    return y, scores


def reference(y, s):
    """The definition: mean over every (row, true label) of (true labels ranked at or above it) / rank."""
    precisions = []
    for row, score in zip(y > 0, s):
        for c in np.flatnonzero(row):
            above = score >= score[c]
            precisions.append((above & row).sum() / above.sum())
    return float(np.mean(precisions))


@pytest.mark.parametrize("seed", range(5))
def test_numpy_lwlrap_matches_sklearn_and_the_definition(seed):
    y, s = random_multilabel(np.random.default_rng(seed))
    keep = y.sum(1) > 0
    expected = label_ranking_average_precision_score(y[keep], s[keep], sample_weight=y[keep].sum(1))
    assert lwlrap(y, s) == pytest.approx(expected, abs=1e-12)
    assert lwlrap(y, s) == pytest.approx(reference(y, s), abs=1e-12)


def test_lwlrap_is_not_plain_lrap_and_perfect_is_one():
    rng = np.random.default_rng(0)
    y, s = random_multilabel(rng)
    keep = y.sum(1) > 0
    assert lwlrap(y, s) != pytest.approx(label_ranking_average_precision_score(y[keep], s[keep]), abs=1e-4)
    assert lwlrap(y, y + 0.01 * s) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lwlrap(np.zeros((3, 4)), np.ones((3, 4)))


@pytest.mark.parametrize("batch_size", [1, 7, 16, 32, 97])
def test_streaming_metric_equals_numpy_over_an_epoch(batch_size):
    y, s = random_multilabel(np.random.default_rng(batch_size))
    metric = StreamingLWLRAP(num_classes=24)
    for start in range(0, len(y), batch_size):  # 97 rows: the last batch is uneven
        metric.update_state(y[start : start + batch_size], s[start : start + batch_size])
    assert float(metric.result()) == pytest.approx(lwlrap(y, s), abs=1e-5)
    metric.reset_state()
    metric.update_state(y[:10], s[:10])
    assert float(metric.result()) == pytest.approx(lwlrap(y[:10], s[:10]), abs=1e-5)


def test_mean_of_batch_values_would_differ():
    y, s = random_multilabel(np.random.default_rng(11))
    batch_means = np.mean([lwlrap(y[i : i + 8], s[i : i + 8]) for i in range(0, len(y), 8)
                           if y[i : i + 8].any()])
    assert abs(batch_means - lwlrap(y, s)) > 1e-4


def test_sigmoid_outputs_train_with_binary_cross_entropy():
    from rfcx_mlops import config
    from rfcx_mlops.learn.model import build

    cfg = config.load(None, {"model.activation": "sigmoid", "features.n_mels": 32, "features.frames": 32,
                             "model.dense_units": 8})
    model = build(cfg, steps_per_epoch=1)
    assert isinstance(model.loss, keras.losses.BinaryCrossentropy) and model.get_layer("species").activation.__name__ == "sigmoid"
    scores = np.asarray(model(np.random.default_rng(0).random((2, 32, 32, 1), np.float32)))
    assert scores.shape == (2, 24) and not np.allclose(scores.sum(axis=1), 1.0)  # independent per species


def test_masked_binary_cross_entropy_by_hand():
    from rfcx_mlops.learn.metrics import UNKNOWN, MaskedBinaryCrossentropy

    y = np.array([[1.0, 0.0, UNKNOWN, UNKNOWN], [UNKNOWN, 1.0, 0.0, UNKNOWN]], np.float32)
    p = np.array([[0.9, 0.2, 0.7, 0.1], [0.5, 0.6, 0.3, 0.8]], np.float32)
    # row 1: -ln 0.9 - ln 0.8 over 4 classes; row 2: -ln 0.6 - ln 0.7; unknowns count with weight w as absent
    known = np.array([-np.log(0.9) - np.log(0.8), -np.log(0.6) - np.log(0.7)])
    unknown = np.array([-np.log(0.3) - np.log(0.9), -np.log(0.5) - np.log(0.2)])
    for w in (0.0, 0.25):
        expected = np.mean((known + w * unknown) / 4)
        assert float(MaskedBinaryCrossentropy(w)(y, p)) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.BinaryCrossentropy()(np.maximum(y, 0), p)
    assert float(MaskedBinaryCrossentropy(1.0)(y, p)) == pytest.approx(float(plain), rel=1e-5)


def test_unknown_targets_rank_as_absent_in_both_lwlraps():
    from rfcx_mlops.learn.metrics import UNKNOWN

    y, s = random_multilabel(np.random.default_rng(3))
    masked = np.where((y == 0) & (np.random.default_rng(4).random(y.shape) < 0.5), UNKNOWN, y)
    metric = StreamingLWLRAP(y.shape[1])
    metric.update_state(masked, s)
    assert float(metric.result()) == pytest.approx(lwlrap(y, s), abs=1e-6) == lwlrap(masked, s)
