"""LWLRAP, the RFCX competition metric: label-weighted label-ranking average precision.

``lwlrap`` is the numpy value (scikit-learn); ``StreamingLWLRAP`` the Keras metric
that reaches the same value over an epoch of batches.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from sklearn.metrics import label_ranking_average_precision_score


def lwlrap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """LWLRAP over the rows holding at least one true label (scikit-learn's LRAP weighted by labels per row)."""
    y_true = np.asarray(y_true) > 0.5
    scores = np.asarray(scores, dtype=np.float64)
    keep = y_true.any(axis=1)
    if not keep.any():
        raise ValueError("lwlrap needs at least one row with a true label")
    y, s = y_true[keep], scores[keep]
    return float(label_ranking_average_precision_score(y, s, sample_weight=y.sum(axis=1)))


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
