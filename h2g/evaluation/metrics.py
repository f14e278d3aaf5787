"""(split from h2g.evaluation; docstring to write)"""
from __future__ import annotations


import numpy as np



# ---------------------------------------------------------------- per-slide metrics
def binarise(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Tumour where ``prob > threshold`` (strictly: with a two-class softmax this is the
    arg-max, and a tie at exactly 0.5 is non-tumour).  NaN probabilities raise
    ``ValueError`` rather than silently becoming non-tumour."""
    prob = np.asarray(prob)
    if np.issubdtype(prob.dtype, np.floating) and np.isnan(prob).any():
        raise ValueError("probability map contains NaN")
    return prob > threshold


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel-wise ``recall``, ``precision`` and ``dice`` of a binary prediction.

    ``pred`` and ``truth`` are boolean (or 0/1) arrays of one shape.  With TP, FP, FN
    the pixel counts, recall = TP / (TP + FN), precision = TP / (TP + FP) and
    Dice = 2 TP / (2 TP + FP + FN).  The 0 / 0 cases are defined, never NaN:

    * recall with an empty ground truth is 1: there was nothing to find, so nothing
      was missed; false positives are charged to precision and Dice instead;
    * precision with an empty prediction is 1 when the ground truth is empty too
      (a correct "no tumour") and 0 otherwise: an empty prediction on a slide with
      tumour finds nothing, and scoring it as perfectly precise would let a model that
      predicts nothing look good in the slide-averaged precision;
    * Dice with both empty is 1 (perfect agreement).

    So: both empty -> 1, 1, 1; truth empty, prediction not -> recall 1, precision 0,
    Dice 0; prediction empty, truth not -> 0, 0, 0.
    """
    pred, truth = _binary(pred, "pred"), _binary(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    recall = tp / (tp + fn) if tp + fn else 1.0
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"recall": recall, "precision": precision, "dice": dice}


def _binary(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1); threshold probabilities with binarise() first")
    return array.astype(bool)
