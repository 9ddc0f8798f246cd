"""LWLRAP, the RFCX competition metric: label-weighted label-ranking average precision; the masked loss.

``lwlrap`` is the numpy value (scikit-learn); ``StreamingLWLRAP`` the Keras metric
that reaches the same value over an epoch of batches.  Targets are 1 (present), 0 (absent)
and, for ``MaskedBinaryCrossentropy``, ``UNKNOWN``: both metrics count only 1 as a true label.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
from keras import ops
from sklearn.metrics import average_precision_score, label_ranking_average_precision_score

UNKNOWN = -1.0  # a target neither labelled present (train_tp) nor verified absent (train_fp)


def lwlrap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """LWLRAP over the rows holding at least one true label (scikit-learn's LRAP weighted by labels per row)."""
    y_true = np.asarray(y_true) > 0.5
    scores = np.asarray(scores, dtype=np.float64)
    keep = y_true.any(axis=1)
    if not keep.any():
        raise ValueError("lwlrap needs at least one row with a true label")
    y, s = y_true[keep], scores[keep]
    return float(label_ranking_average_precision_score(y, s, sample_weight=y.sum(axis=1)))


def species_ap(y_true: np.ndarray, scores: np.ndarray) -> pd.Series:
    """Average precision of each species (column) over the rows; NaN for a species no row holds."""
    y_true = np.asarray(y_true) > 0.5
    return pd.Series({c: average_precision_score(y_true[:, c], scores[:, c]) if y_true[:, c].any() else np.nan
                      for c in range(y_true.shape[1])})


@keras.saving.register_keras_serializable(package="rfcx_mlops")
class StreamingLWLRAP(keras.metrics.Metric):
    """LWLRAP accumulated over every batch of an epoch.

    Per class it sums the precision at each true label's rank and counts the true
    labels; the result, the sum over classes divided by the count, equals the numpy
    value on the epoch's predictions (a mean of batch values would not).  Ties rank
    as in scikit-learn: an equal score counts as ranked above.
    """

    def __init__(self, num_classes: int, name: str = "lwlrap", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.precision_sum = self.add_variable(shape=(num_classes,), initializer="zeros", name="precision_sum")
        self.label_count = self.add_variable(shape=(num_classes,), initializer="zeros", name="label_count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.greater(y_true, 0.5), "float32")
        scores = ops.cast(y_pred, "float32")
        # above[b, c, k]: in sample b, class k scores at least as high as class c
        above = ops.cast(ops.greater_equal(scores[:, None, :], scores[:, :, None]), "float32")
        rank = ops.sum(above, axis=-1)
        hits = ops.sum(above * truth[:, None, :], axis=-1)
        self.precision_sum.assign_add(ops.sum(hits / rank * truth, axis=0))
        self.label_count.assign_add(ops.sum(truth, axis=0))

    def result(self):
        return ops.sum(self.precision_sum) / ops.maximum(ops.sum(self.label_count), 1.0)

    def reset_state(self):
        self.precision_sum.assign(ops.zeros_like(self.precision_sum))
        self.label_count.assign(ops.zeros_like(self.label_count))

    def get_config(self):
        return {"num_classes": self.num_classes, "name": self.name}


@keras.saving.register_keras_serializable(package="rfcx_mlops")
class MaskedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy on the known targets (1 or 0); an ``UNKNOWN`` one counts as 0 with ``unknown_weight``.

    Per sample: the weighted sum over classes divided by the number of classes (Keras'
    ``binary_crossentropy`` is the same mean with every weight 1), so ``unknown_weight=1``
    is plain binary cross-entropy with the unknowns taken as absent.
    """

    def __init__(self, unknown_weight: float = 0.0, name: str = "masked_binary_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.unknown_weight = unknown_weight

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.clip(ops.cast(y_pred, "float32"), keras.config.epsilon(), 1.0 - keras.config.epsilon())
        known = ops.not_equal(y_true, UNKNOWN)
        target = ops.where(known, y_true, 0.0)
        weight = ops.where(known, 1.0, self.unknown_weight)
        loss = -(target * ops.log(y_pred) + (1.0 - target) * ops.log(1.0 - y_pred))
        return ops.mean(weight * loss, axis=-1)

    def get_config(self):
        return {**super().get_config(), "unknown_weight": self.unknown_weight}
