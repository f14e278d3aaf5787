"""Collapse detection: a design whose predictions fall almost entirely into one class.

A network that learned nothing but a prior - everything tumour, everything stroma - still
gets figures (recall 1.000, precision 0.258 for "all tumour" on a slide set with 26 %
tumour) that a table would show beside the others as an ordinary, if poor, row.  Such a
run must say so.

**Rule.** Over the evaluated pixels of a split (every pixel with a ground-truth label,
pooled over the split's slides), let ``d`` be the class the design predicts most.  The
design has *collapsed* when

- ``d`` takes at least :data:`DOMINANT_SHARE` (95 %) of the predicted pixels, and
- ``d`` covers at most :data:`TRUTH_SHARE` (90 %) of the ground truth,

that is, the prediction is nearly one class where the truth is not: a test set that is
itself 97 % stroma does not flag a model that calls 97 % stroma.  Both figures are in the
result (:func:`check`), so a borderline case can be judged.

:func:`check` works on per-class counts (predicted, true), :func:`from_confusion` on a
pooled confusion matrix (multi-class systems) and :func:`from_masks` on binary
predictions and truths (H2G-Net).  :func:`mark` records the outcome in a design's
``metrics.json`` dict (``collapsed``: bool; ``collapse``: the dominant class, its share of
the predictions and of the truth, the split), tags its per-slide rows (``collapsed``: a
short note the tables print beside the design's name, :mod:`h2g.evaluation.tables`) and
logs a warning.  TensorFlow-free.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("h2g")

#: A design predicting this share of one class or more ...
DOMINANT_SHARE = 0.95
#: ... where the truth has at most this share of it has collapsed.
TRUTH_SHARE = 0.90
RULE = (f"collapsed: at least {DOMINANT_SHARE:.0%} of the predicted pixels in one class, which covers at most "
        f"{TRUTH_SHARE:.0%} of the ground truth (pixels with a label, pooled over the split's slides)")


def check(predicted: Sequence[int], truth: Sequence[int], names: Sequence[str], where: str = "test") -> dict:
    """The collapse verdict from per-class pixel counts of the predictions and of the
    truth over ``where`` (a split): ``collapsed``, ``dominant`` (class name), ``share``
    (its share of the predictions), ``truth_share`` (its share of the truth), ``where``
    and ``rule``."""
    predicted = np.asarray(predicted, np.float64)
    truth = np.asarray(truth, np.float64)
    if predicted.shape != truth.shape or predicted.shape != (len(names),):
        raise ValueError(f"counts of {len(names)} classes expected, got {predicted.shape} and {truth.shape}")
    if predicted.sum() <= 0:
        return {"collapsed": False, "dominant": None, "share": float("nan"), "truth_share": float("nan"),
                "where": where, "rule": RULE}
    dominant = int(np.argmax(predicted))
    share = float(predicted[dominant] / predicted.sum())
    truth_share = float(truth[dominant] / truth.sum()) if truth.sum() > 0 else float("nan")
    collapsed = share >= DOMINANT_SHARE and not truth_share > TRUTH_SHARE
    return {"collapsed": bool(collapsed), "dominant": str(names[dominant]), "share": share,
            "truth_share": truth_share, "where": where, "rule": RULE}


def from_confusion(confusion, names: Sequence[str], where: str = "test") -> dict:
    """:func:`check` of a confusion matrix (rows true, columns predicted; e.g. pooled
    over the test slides: :attr:`h2g.evaluation.metrics.ClassScores.confusion`)."""
    confusion = np.asarray(confusion, np.int64)
    return check(confusion.sum(axis=0), confusion.sum(axis=1), names, where)


def from_masks(pairs: Iterable[tuple[np.ndarray, np.ndarray]], names: Sequence[str] = ("non-tumour", "tumour"),
               where: str = "test") -> dict:
    """:func:`check` of binary ``(prediction, truth)`` masks (tumour = true), pooled."""
    predicted, truth = np.zeros(2, np.int64), np.zeros(2, np.int64)
    for pred, true in pairs:
        pred, true = np.asarray(pred, bool), np.asarray(true, bool)
        predicted += (pred.size - int(pred.sum()), int(pred.sum()))
        truth += (true.size - int(true.sum()), int(true.sum()))
    return check(predicted, truth, names, where)


def note(verdict: dict) -> str:
    """The short text the tables print beside a collapsed design's name ('' if not)."""
    if not verdict.get("collapsed"):
        return ""
    return f"collapsed: {verdict['share']:.1%} {verdict['dominant']}"


def flagged_label(label: str, verdict: dict) -> str:
    """``label`` with the collapse note in bold brackets when ``verdict`` collapsed (the
    tables' way, :func:`h2g.evaluation.tables.flagged`)."""
    return f"{label} **[{note(verdict)}]**" if verdict.get("collapsed") else label


def mark(result: dict, verdict: dict, rows: Iterable[dict] = (), label: str | None = None) -> dict:
    """Record ``verdict`` in a design's ``result`` (``collapsed``, ``collapse``), tag its
    per-slide ``rows`` (``collapsed``: :func:`note`, '' when not collapsed) and, when it
    collapsed, log a warning naming the design; returns ``result``."""
    result["collapsed"] = bool(verdict["collapsed"])
    result["collapse"] = {k: v for k, v in verdict.items() if k != "collapsed"}
    text = note(verdict)
    for row in rows:
        row["collapsed"] = text
    if verdict["collapsed"]:
        name = label or result.get("label") or result.get("design") or "a design"
        log.warning("%s has COLLAPSED: %.1f %% of its %s predictions are %s (%.1f %% of the truth); its figures "
                    "are not a trained model's (metrics.json: collapsed)", name, 100 * verdict["share"],
                    verdict["where"], verdict["dominant"], 100 * verdict["truth_share"])
    return result
