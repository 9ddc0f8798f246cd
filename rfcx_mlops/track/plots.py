"""The pictures and tables a run logs: augmentation samples, per-species AP and precision-recall, the folds' summary."""

from __future__ import annotations

import math
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # drawn without pyplot: no global backend or figure state
from sklearn.metrics import average_precision_score, precision_recall_curve

from rfcx_mlops.learn.metrics import lwlrap


def augmentation_grid(before: list[np.ndarray], after: list[np.ndarray], titles: list[str],
                      params: list[dict[str, Any]]) -> Figure:
    """Each sample's mel image before (left) and after (right) augmentation, with labels and drawn parameters."""
    fig = Figure(figsize=(12, 2.4 * len(before)))
    axes = fig.subplots(len(before), 2, squeeze=False)
    for row, (b, a, title, p) in enumerate(zip(before, after, titles, params)):
        drawn = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
        for ax, image, label in ((axes[row, 0], b, f"{title}: original"), (axes[row, 1], a, f"augmented: {drawn}")):
            ax.imshow(image, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1)
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mel bin")
    fig.tight_layout()
    return fig


def log_species_ap(ap: pd.Series, title: str, folds: pd.DataFrame | None = None) -> None:
    """Per-species average precision as CSV (with each fold's column, for a CV run) and as a bar chart."""
    table = ap.rename("average_precision").rename_axis("species_id").reset_index()
    if folds is not None:
        table = table.join(folds.reset_index(drop=True))
    mlflow.log_text(table.to_csv(index=False), "species_ap.csv")
    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots()
    ax.bar(table["species_id"], table["average_precision"].fillna(0), color="tab:green")
    ax.set_xticks(table["species_id"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("species_id")
    ax.set_ylabel("validation AP")
    ax.set_title(title)
    fig.tight_layout()
    mlflow.log_figure(fig, "species_ap.png")


def log_species_pr(predictions: pd.DataFrame, title: str) -> None:
    """Each species' precision-recall curve over the validation windows (``y<k>`` truth, ``s<k>`` scores)."""
    truth, scores = predictions.filter(regex=r"^y\d+$").to_numpy(), predictions.filter(regex=r"^s\d+$").to_numpy()
    n = truth.shape[1]
    cols = 6
    fig = Figure(figsize=(2.2 * cols, 2.0 * math.ceil(n / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, sharex=True, sharey=True, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k >= n:
            ax.set_axis_off()
            continue
        if not truth[:, k].any():
            ax.set_title(f"s{k}: no calls", fontsize=8)
            continue
        precision, recall, _ = precision_recall_curve(truth[:, k], scores[:, k])
        ax.plot(recall, precision, color="tab:blue")
        ax.set_title(f"s{k}: AP {average_precision_score(truth[:, k], scores[:, k]):.2f}", fontsize=8)
    axes[0].set_xlim(0, 1)
    axes[0].set_ylim(0, 1.02)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.suptitle(title)
    mlflow.log_figure(fig, "species_pr.png")


def log_cv_summary(results: list, monitor: str) -> None:
    """On a cross-validation run: mean and std of the folds' best ``monitor``, per-species AP averaged over
    folds, and the out-of-fold predictions (each validation window scored by its fold's best model)."""
    best = np.array([r.best_value for r in results])
    oof = pd.concat([r.predictions for r in results], ignore_index=True)
    truth, scores = oof.filter(regex=r"^y\d+$").to_numpy(), oof.filter(regex=r"^s\d+$").to_numpy()
    mlflow.log_metrics({f"best_{monitor}": float(best.mean()), f"best_{monitor}_std": float(best.std()),
                        "oof_lwlrap": lwlrap(truth, scores),
                        **{f"best_{monitor}_fold{r.fold}": r.best_value for r in results}})
    per_fold = pd.DataFrame({f"fold{r.fold}": r.species_ap for r in results})
    log_species_ap(per_fold.mean(axis=1), f"Per-species validation AP, mean over {len(results)} folds", per_fold)
    mlflow.log_text(oof.to_csv(index=False, float_format="%.6g"), "oof_predictions.csv")
