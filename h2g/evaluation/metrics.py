"""Pixel-wise segmentation metrics: H2G-Net's binary tumour figures and per-class ones.

- :func:`segmentation_metrics`: recall, precision and Dice of a binary tumour
  prediction (the H2G-Net tables), with 0 / 0 cases defined (see its doc).
- :func:`confusion_matrix`, :func:`class_metrics`: per-class IoU, Dice, recall and
  precision of a predicted label map against a true one whose :data:`IGNORE` pixels
  (unannotated) count for nothing.  Each class is scored one-vs-rest with the same 0 / 0
  rules as the binary figures (IoU like Dice: 1 when the class is absent from both), so
  the tumour class of a multi-class evaluation scores exactly what
  :func:`segmentation_metrics` gives its tumour masks.  The mean IoU averages the
  classes *present* (in the truth or the prediction, on labelled pixels): a class absent
  from both is undefined there and left out rather than counted as a perfect 1.
- :func:`tumour_metrics`: the binary tumour figures of a pair of label maps.

Label maps are counted chunk by chunk (no full-size int64 temporaries).  TensorFlow-free.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from h2g.io.classes import IGNORE, ClassTable

_CHUNK_VALUES = 1 << 22  # pixels counted per chunk


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
    return _scores(tp, fp, fn)


def _scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Recall, precision and Dice from pixel counts, 0 / 0 as in :func:`segmentation_metrics`."""
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


# ---------------------------------------------------------------- per-class metrics
def confusion_matrix(pred: np.ndarray, truth: np.ndarray, n_classes: int,
                     ignore: int = IGNORE) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 pixel counts, row = true class, column =
    predicted class, over the pixels whose truth is not ``ignore``.  ``pred`` must hold
    class indices ``0 .. n_classes - 1`` there, ``truth`` class indices or ``ignore``;
    anything else is a ``ValueError``."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    for name, array in (("pred", pred), ("truth", truth)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise ValueError(f"{name} must be a label map of integer class indices, got {array.dtype}")
    confusion = np.zeros(n_classes * n_classes, np.int64)
    flat_pred, flat_truth = pred.reshape(-1), truth.reshape(-1)
    for first in range(0, flat_truth.size, _CHUNK_VALUES):
        t = flat_truth[first:first + _CHUNK_VALUES]
        p = flat_pred[first:first + _CHUNK_VALUES]
        labelled = t != ignore
        t, p = t[labelled].astype(np.int64), p[labelled].astype(np.int64)
        bad_t = (t < 0) | (t >= n_classes)
        bad_p = (p < 0) | (p >= n_classes)
        if bad_t.any() or bad_p.any():
            values = sorted(set(np.unique(t[bad_t]).tolist()) | set(np.unique(p[bad_p]).tolist()))
            raise ValueError(f"label values {values[:10]} are neither class indices 0..{n_classes - 1} "
                             f"nor the ignore value {ignore} (ignore is only allowed in the truth)")
        confusion += np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return confusion.reshape(n_classes, n_classes)


@dataclass(frozen=True)
class ClassScores:
    """Per-class scores from a confusion matrix (rows true, columns predicted).

    ``iou``, ``dice``, ``recall``, ``precision`` are arrays in class order (0 / 0 rules
    in the module doc); ``present`` marks the classes in the truth or the prediction;
    ``mean_iou`` is the mean IoU of the present classes (NaN when none is)."""

    names: tuple[str, ...]
    confusion: np.ndarray
    iou: np.ndarray
    dice: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    present: np.ndarray

    @classmethod
    def from_confusion(cls, confusion: np.ndarray, names: Sequence[str]) -> ClassScores:
        """Scores of ``confusion`` (e.g. the sum of several slides' matrices, for scores
        pooled over a test set)."""
        confusion = np.asarray(confusion, np.int64)
        tp = np.diag(confusion)
        fp = confusion.sum(axis=0) - tp
        fn = confusion.sum(axis=1) - tp
        rows = [_scores(int(a), int(b), int(c)) for a, b, c in zip(tp, fp, fn)]
        iou = [a / (a + b + c) if a + b + c else 1.0 for a, b, c in zip(tp.tolist(), fp.tolist(), fn.tolist())]
        return cls(
            names=tuple(names),
            confusion=confusion,
            iou=np.array(iou, float),
            dice=np.array([r["dice"] for r in rows], float),
            recall=np.array([r["recall"] for r in rows], float),
            precision=np.array([r["precision"] for r in rows], float),
            present=(tp + fp + fn) > 0,
        )

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.iou[self.present])) if self.present.any() else float("nan")

    def __add__(self, other: ClassScores) -> ClassScores:
        """Pool two results (their confusion matrices add)."""
        if self.names != other.names:
            raise ValueError(f"cannot pool scores of classes {self.names} and {other.names}")
        return ClassScores.from_confusion(self.confusion + other.confusion, self.names)

    def to_dict(self) -> dict:
        """JSON-ready: ``{class name: {iou, dice, recall, precision, present}}`` and
        ``mean_iou``."""
        out = {"classes": {
            name: {"iou": float(self.iou[c]), "dice": float(self.dice[c]),
                   "recall": float(self.recall[c]), "precision": float(self.precision[c]),
                   "present": bool(self.present[c])}
            for c, name in enumerate(self.names)}}
        out["mean_iou"] = self.mean_iou
        return out


def class_metrics(pred: np.ndarray, truth: np.ndarray, classes: ClassTable | Sequence[str],
                  ignore: int = IGNORE) -> ClassScores:
    """Per-class IoU, Dice, recall and precision of the label map ``pred`` against
    ``truth`` (``ignore`` pixels of the truth count for nothing); ``classes`` is the class
    table or the class names in index order."""
    names = classes.names if isinstance(classes, ClassTable) else tuple(classes)
    return ClassScores.from_confusion(confusion_matrix(pred, truth, len(names), ignore), names)


def tumour_metrics(pred: np.ndarray, truth: np.ndarray, tumour_index: int, n_classes: int,
                   ignore: int = IGNORE) -> dict[str, float]:
    """H2G-Net's binary tumour ``recall``, ``precision``, ``dice`` of two label maps of
    ``n_classes`` classes: the tumour class against the rest, over the pixels whose truth
    is not ``ignore``; for binary maps the numbers of :func:`segmentation_metrics`."""
    return tumour_scores(confusion_matrix(pred, truth, n_classes, ignore), tumour_index)


def tumour_scores(confusion: np.ndarray, tumour_index: int) -> dict[str, float]:
    """The binary tumour figures of a confusion matrix (e.g. :attr:`ClassScores.confusion`)."""
    confusion = np.asarray(confusion, np.int64)
    tp = int(confusion[tumour_index, tumour_index])
    fp = int(confusion[:, tumour_index].sum()) - tp
    fn = int(confusion[tumour_index].sum()) - tp
    return _scores(tp, fp, fn)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive``
    (Mann-Whitney U with mid-ranks for ties); NaN when one side is empty."""
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0  # 1-based mid-rank of each tie group
    ranks[order] = np.repeat(mid, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def threshold_counts(prob: np.ndarray, positive: np.ndarray, thresholds) -> np.ndarray:
    """``(T, 4)`` int64 counts ``tp, fp, fn, tn`` of ``prob > t`` against ``positive`` for
    each threshold ``t`` (the one threshold rule of :func:`binarise`); sum them over
    slides, then :func:`threshold_scores`."""
    prob = np.asarray(prob).ravel()
    positive = np.asarray(positive, bool).ravel()
    out = np.zeros((len(thresholds), 4), np.int64)
    n_pos = int(positive.sum())
    for i, t in enumerate(thresholds):
        pred = binarise(prob, t)
        tp = int(np.count_nonzero(pred & positive))
        fp = int(np.count_nonzero(pred)) - tp
        out[i] = (tp, fp, n_pos - tp, len(prob) - n_pos - fp)
    return out


def dice_by_threshold(prob: np.ndarray, truth: np.ndarray, thresholds) -> np.ndarray:
    """``(T,)`` Dice of ``prob > t`` against the boolean ``truth`` for each threshold
    ``t`` (the rule of :func:`binarise`; both empty scores 1, as in
    :func:`segmentation_metrics`).  A threshold-free view of a probability map: a
    design whose maps rank tumour well but sit below 0.5 scores 0 at the paper's
    threshold and well at a lower one."""
    prob, truth = np.asarray(prob), np.asarray(truth)
    if prob.shape != truth.shape:
        raise ValueError(f"probability shape {prob.shape} differs from ground truth shape {truth.shape}")
    counts = threshold_counts(prob, truth, thresholds)
    return np.array([_scores(int(tp), int(fp), int(fn))["dice"] for tp, fp, fn, _ in counts])


def threshold_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall (= sensitivity) and specificity per row of :func:`threshold_counts`."""
    tp, fp, fn, tn = (np.asarray(counts, np.float64)[:, i] for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
                "recall": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
                "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan)}


# ---------------------------------------------------------------- rasters and weighted IoU
BACKGROUND_NAMES = ("glass", "background")  # the class of pixels no window covered, when the table has one


def raster_labels(raster, annotation, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, truth labels) of a class-probability raster
    (:class:`h2g.inference.raster.Raster`) on ``annotation``'s label-map grid.  Pixels no
    window covered are the ``glass`` / ``background`` class when ``class_names`` has
    one, else they are not scored (truth set to :data:`IGNORE`)."""
    truth = annotation.labels
    resized = raster.resized(annotation.downsample)
    names = [n.lower() for n in class_names]
    fill = next((names.index(n) for n in BACKGROUND_NAMES if n in names), -1)
    pred = resized.label_map(fill=fill)
    rows, cols = min(pred.shape[0], truth.shape[0]), min(pred.shape[1], truth.shape[1])
    pred, truth = pred[:rows, :cols], truth[:rows, :cols].copy()
    if fill < 0:
        truth[pred < 0] = IGNORE
        pred = np.where(pred < 0, 0, pred)
    return pred.astype(np.int64), truth


def weighted_iou(scores: ClassScores, weighting: str = "frequency") -> float:
    """IoU averaged over the classes present in the truth, weighted by each class's share
    of the annotated truth pixels (``"frequency"``: the usual frequency-weighted IoU) or
    by the inverse of that share, normalised to sum to 1 (``"inverse"``: Dong et al.'s
    wording, "the weight is proportional to the inverse of the frequency")."""
    counts = scores.confusion.sum(axis=1).astype(np.float64)
    present = counts > 0
    if not present.any():
        return float("nan")
    if weighting == "frequency":
        w = counts[present] / counts[present].sum()
    elif weighting == "inverse":
        w = 1.0 / counts[present]
        w /= w.sum()
    else:
        raise ValueError(f"weighting must be 'frequency' or 'inverse', got {weighting!r}")
    return float(np.sum(w * scores.iou[present]))
