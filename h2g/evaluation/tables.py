"""Evaluation as in Section 3.3 of the paper: per-slide pixel-wise recall, precision and
Dice of binary segmentations, their macro mean and sample standard deviation over the
test slides, Dice per histological grade, pairwise Tukey HSD on Dice between designs,
the paper's Table 1 / Table 2 layouts as Markdown and CSV, and figures; and, for
multi-class systems, per-class tables (:func:`write_class_tables`: IoU, Dice, recall
and precision per class and the mean IoU, from :class:`h2g.evaluation.metrics.ClassScores`).

A per-slide result ("row") is a dict with the keys ``design``, ``slide_id``, ``grade``,
``recall``, ``precision`` and ``dice``.

TensorFlow-free: numpy, scipy and matplotlib (Agg, through ``matplotlib.figure.Figure``,
never pyplot's global state).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from h2g.core.errors import ConfigError
from h2g.evaluation.collapse import RULE, from_confusion, note

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    from h2g.evaluation.metrics import ClassScores

METRICS = ("recall", "precision", "dice")
CLASS_METRICS = ("iou", "dice", "recall", "precision")
ROW_KEYS = ("design", "slide_id", "grade", *METRICS)


# ---------------------------------------------------------------- summaries
@dataclass(frozen=True)
class MeanSD:
    """Macro mean and sample standard deviation (ddof = 1; 0 for a single slide)."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> MeanSD:
        values = np.asarray(list(values), dtype=float)
        if values.size == 0:
            raise ValueError("no values to summarise")
        sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
        return cls(float(np.mean(values)), sd, int(values.size))

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f}"


@dataclass(frozen=True)
class DesignSummary:
    """One design's slide-level summary."""

    design: str
    n: int
    recall: MeanSD
    precision: MeanSD
    dice: MeanSD
    dice_by_grade: dict[str, MeanSD]  # grade (as a string) -> Dice over that grade's slides


def summarise(per_slide: Sequence[dict]) -> dict[str, DesignSummary]:
    """Per design (in order of first appearance): mean and sd of each metric over its
    slides, and Dice per histological grade (grades sorted numerically)."""
    rows = _check_rows(per_slide)
    out = {}
    for design in dict.fromkeys(r["design"] for r in rows):
        mine = [r for r in rows if r["design"] == design]
        grades = sorted({_grade(r) for r in mine}, key=_grade_order)
        out[design] = DesignSummary(
            design=design,
            n=len(mine),
            recall=MeanSD.of(r["recall"] for r in mine),
            precision=MeanSD.of(r["precision"] for r in mine),
            dice=MeanSD.of(r["dice"] for r in mine),
            dice_by_grade={g: MeanSD.of(r["dice"] for r in mine if _grade(r) == g) for g in grades},
        )
    return out


def metrics_summary(per_slide: Sequence[dict], design: str) -> dict:
    """The evaluation part of a design's ``metrics.json``: ``design``,
    ``n_test_slides``, mean and sd of recall, precision and Dice, and
    ``dice_by_grade`` (grade -> mean Dice) with ``dice_by_grade_sd`` and
    ``n_by_grade``.  :class:`ConfigError` when the design has no per-slide results."""
    summary = summarise([r for r in per_slide if r.get("design") == design]).get(design)
    if summary is None:
        raise ConfigError(f"no per-slide results for design {design!r} (no annotated test slides?)")
    out: dict = {"design": design, "n_test_slides": summary.n}
    for metric in METRICS:
        value = getattr(summary, metric)
        out[f"{metric}_mean"], out[f"{metric}_sd"] = value.mean, value.sd
    out["dice_by_grade"] = {g: v.mean for g, v in summary.dice_by_grade.items()}
    out["dice_by_grade_sd"] = {g: v.sd for g, v in summary.dice_by_grade.items()}
    out["n_by_grade"] = {g: v.n for g, v in summary.dice_by_grade.items()}
    return out


# ---------------------------------------------------------------- Tukey HSD
@dataclass(frozen=True)
class TukeyResult:
    """Pairwise Tukey HSD p-values on Dice.  ``pvalues[i][j]`` compares ``designs[i]``
    with ``designs[j]``; ``None`` where a test is not possible (see ``note``)."""

    designs: tuple[str, ...]
    pvalues: tuple[tuple[float | None, ...], ...]
    note: str

    def p(self, a: str, b: str) -> float | None:
        return self.pvalues[self.designs.index(a)][self.designs.index(b)]


def tukey(per_slide: Sequence[dict], designs: Sequence[str]) -> TukeyResult:
    """Tukey's HSD (``scipy.stats.tukey_hsd``) on per-slide Dice between ``designs``.

    A design with fewer than 2 slides has no within-design variance to test against:
    its row and column are ``None`` ("n/a" in the tables), and with fewer than two
    testable designs every entry is ``None``; ``note`` says why.  When every testable
    design's Dice values are constant (zero pooled variance) scipy's statistic is
    0 / 0 for equal means: such a pair gets p = 1 (no evidence of a difference) and a
    pair with different means p = 0.
    """
    rows = _check_rows(per_slide)
    designs = tuple(designs)
    scores = {d: np.array([r["dice"] for r in rows if r["design"] == d], dtype=float) for d in designs}
    testable = [d for d in designs if len(scores[d]) >= 2]
    notes = [f"{d}: {len(scores[d])} slide(s), needs at least 2" for d in designs if d not in testable]
    matrix: list[list[float | None]] = [[None] * len(designs) for _ in designs]
    if len(testable) >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            p = stats.tukey_hsd(*(scores[d] for d in testable)).pvalue
        p = np.where(np.isnan(p), 1.0, p)
        for i, a in enumerate(testable):
            for j, b in enumerate(testable):
                matrix[designs.index(a)][designs.index(b)] = float(p[i, j])
    elif designs:
        notes.append("fewer than two designs with at least 2 slides: no pairwise test")
    return TukeyResult(designs, tuple(tuple(r) for r in matrix), "; ".join(notes))


# ---------------------------------------------------------------- tables
def write_tables(
    out_dir: str | Path,
    per_slide: Sequence[dict],
    designs: Sequence[str],
    resolution: int | str = 1024,
    tukey_designs: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the evaluation tables of ``designs`` (in that order) to ``out_dir``.

    ``tables.md``: Table 1 (Design | Recall | Precision | DSC, mean ± sd), Table 2
    (DSC per grade), the Tukey HSD p-value matrix between ``tukey_designs`` (default:
    all of ``designs``; the paper tests its deep-learning designs only) and the
    evaluation resolution (``resolution``: a side in pixels, or a phrase such as "each
    design's own").  CSV: ``table1.csv``, ``table2.csv`` (numbers at full
    precision), ``tukey.csv`` (empty cells where not testable) and ``per_slide.csv``.
    Returns the written paths by name.  :class:`ConfigError` if a design has no rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(designs)
    rows = [r for r in _check_rows(per_slide) if r["design"] in wanted]
    summary = summarise(rows)
    missing = [d for d in designs if d not in summary]
    if missing:
        raise ConfigError(f"no per-slide results for design(s) {', '.join(missing)}")
    summaries = [summary[d] for d in designs]
    grades = sorted({g for s in summaries for g in s.dice_by_grade}, key=_grade_order)
    tk = tukey(rows, tukey_designs if tukey_designs is not None else designs)
    collapsed = _collapse_notes(rows)

    paths = {name: out_dir / f"{name}.{ext}" for name, ext in
             (("tables", "md"), ("table1", "csv"), ("table2", "csv"), ("tukey", "csv"), ("per_slide", "csv"))}
    paths["tables"].write_text(_markdown(summaries, grades, tk, resolution, collapsed), encoding="utf-8")
    _write_csv(paths["table1"], ["design", "n_slides"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "sd")]
               + ["collapsed"],
               [[s.design, s.n] + [v for m in METRICS for v in (getattr(s, m).mean, getattr(s, m).sd)]
                + [collapsed.get(s.design, "")] for s in summaries])
    _write_csv(paths["table2"], ["design"] + [f"grade_{g}_{s}" for g in grades for s in ("mean", "sd", "n")],
               [[s.design] + [v for g in grades for v in _grade_cells(s, g)] for s in summaries])
    _write_csv(paths["tukey"], ["design", *tk.designs],
               [[a, *("" if p is None else p for p in row)] for a, row in zip(tk.designs, tk.pvalues)])
    _write_csv(paths["per_slide"], list(ROW_KEYS),
               [[r[k] for k in ROW_KEYS] for d in designs for r in rows if r["design"] == d])
    return paths


def _collapse_notes(rows: Sequence[dict]) -> dict[str, str]:
    """design -> the collapse note its rows carry (:func:`h2g.evaluation.collapse.mark`)."""
    return {r["design"]: r["collapsed"] for r in rows if r.get("collapsed")}


def flagged(design: str, collapsed: Mapping[str, str]) -> str:
    """A design's name as the tables print it: with its collapse note when it has one, so
    a collapsed run is never an ordinary row."""
    return f"{design} **[{collapsed[design]}]**" if collapsed.get(design) else design


def _markdown(summaries: list[DesignSummary], grades: list[str], tk: TukeyResult, resolution: int | str,
              collapsed: Mapping[str, str] | None = None) -> str:
    collapsed = collapsed or {}
    n_slides = sorted({s.n for s in summaries})
    where = f"at {resolution}x{resolution} pixels per slide" if isinstance(resolution, int) else f"at {resolution}"
    lines = [
        "# Test set segmentation performance",
        "",
        f"Pixel-wise metrics of binary segmentations (threshold 0.5) {where}"
        f", macro mean ± sample standard deviation over test slides (n = {', '.join(map(str, n_slides))}).",
        "",
        "## Table 1",
        "",
        _md_table(["Design", "Recall", "Precision", "DSC"],
                  [[flagged(s.design, collapsed), str(s.recall), str(s.precision), str(s.dice)] for s in summaries]),
        "",
        "DSC: Dice similarity coefficient. Mean ± standard deviation over slides.",
        *(["", f"**collapsed**: the design's predictions fall almost entirely into one class ({RULE}); its "
               "figures are not those of a trained model."] if collapsed else []),
        "",
        "## Table 2: DSC per histological grade",
        "",
        _md_table(["Design"] + [f"Grade {g} (n = {_grade_n(summaries, g)})" for g in grades],
                  [[flagged(s.design, collapsed)] + [str(s.dice_by_grade[g]) if g in s.dice_by_grade else "n/a"
                                                     for g in grades]
                   for s in summaries]),
        "",
        "n: test slides of that grade (several numbers when designs differ); n/a: no slide of that grade.",
        "",
        "## Tukey HSD p-values (DSC)",
        "",
        _md_table(["Design", *tk.designs],
                  [[flagged(a, collapsed), *(_format_p(p) for p in row)] for a, row in zip(tk.designs, tk.pvalues)]),
        "",
    ]
    if tk.note:
        lines += [f"n/a: {tk.note}.", ""]
    return "\n".join(lines)


def write_class_tables(
    out_dir: str | Path,
    scores: Mapping[str, ClassScores],
    designs: Sequence[str] | None = None,
    stem: str = "class_tables",
) -> dict[str, Path]:
    """Write per-class tables of ``scores`` (design -> :class:`ClassScores`, e.g. pooled
    over the test slides) for ``designs`` (default: all, in mapping order).

    ``<stem>.md``: one table per metric (IoU, Dice, recall, precision: rows designs,
    columns classes, and mIoU, the mean IoU over the classes present, beside IoU); a
    class absent from both truth and prediction shows "n/a".  ``<stem>.csv``: one row
    per design and class (``design, class, iou, dice, recall, precision, present``, full
    precision) followed by a ``mean_iou`` row per design.  Returns the paths by name
    (``markdown``, ``csv``).  :class:`ConfigError` for a design without scores or
    designs with different classes."""
    designs = list(scores) if designs is None else list(designs)
    missing = [d for d in designs if d not in scores]
    if missing:
        raise ConfigError(f"no per-class scores for design(s) {', '.join(missing)}")
    if not designs:
        raise ConfigError("no designs to tabulate")
    names = scores[designs[0]].names
    other = [d for d in designs if scores[d].names != names]
    if other:
        raise ConfigError(f"design(s) {', '.join(other)} have classes other than {', '.join(names)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}

    def cell(s: ClassScores, metric: str, c: int) -> str:
        return f"{getattr(s, metric)[c]:.3f}" if s.present[c] else "n/a"

    lines = ["# Per-class segmentation performance", "",
             ("Pixel-wise, unannotated pixels ignored; n/a: class absent from truth and prediction; "
              "mIoU: mean IoU over the classes present."), ""]
    collapsed = {d: note(from_confusion(scores[d].confusion, names)) for d in designs}
    if any(collapsed.values()):
        lines += [f"**collapsed**: the design's predictions fall almost entirely into one class ({RULE}).", ""]
    for metric in CLASS_METRICS:
        extra = ["mIoU"] if metric == "iou" else []
        body = []
        for d in designs:
            s = scores[d]
            row = [flagged(d, collapsed)] + [cell(s, metric, c) for c in range(len(names))]
            if metric == "iou":
                row.append("n/a" if math.isnan(s.mean_iou) else f"{s.mean_iou:.3f}")
            body.append(row)
        title = {"iou": "IoU", "dice": "Dice"}.get(metric, metric.capitalize())
        lines += [f"## {title}", "", _md_table(["Design", *names, *extra], body), ""]
    paths["markdown"].write_text("\n".join(lines), encoding="utf-8")
    body = []
    for d in designs:
        s = scores[d]
        body += [[d, name, *(float(getattr(s, m)[c]) for m in CLASS_METRICS), bool(s.present[c]), collapsed[d]]
                 for c, name in enumerate(names)]
        body.append([d, "mean_iou", s.mean_iou, "", "", "", "", collapsed[d]])
    _write_csv(paths["csv"], ["design", "class", *CLASS_METRICS, "present", "collapsed"], body)
    return paths


#: Thresholds of the sweep in ``thresholds.md`` (the paper scores at 0.5 only).
SWEEP_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def threshold_sweep(per_slide_dice: Sequence[Sequence[float]], aucs: Sequence[float],
                    thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> dict:
    """The sweep part of a design's ``metrics.json`` from per-slide Dice at each
    threshold (``(slides, T)``, :func:`h2g.evaluation.metrics.dice_by_threshold`) and
    per-slide pixel AUCs: ``thresholds``, ``dice_mean`` / ``dice_sd`` per threshold
    (over slides), ``best_threshold`` / ``best_dice`` (the best mean, the lowest
    threshold on a tie) and ``pixel_auc_mean`` / ``pixel_auc_sd`` (slides with one
    class only have no AUC and are left out; NaN when none is left)."""
    dice = np.asarray(per_slide_dice, np.float64).reshape(-1, len(thresholds))
    if dice.shape[0] == 0:
        raise ValueError("no slides to sweep")
    means = [MeanSD.of(dice[:, i]) for i in range(len(thresholds))]
    best = int(np.argmax([m.mean for m in means]))
    finite = [a for a in aucs if math.isfinite(a)]
    auc = MeanSD.of(finite) if finite else MeanSD(float("nan"), float("nan"), 0)
    return {"thresholds": [float(t) for t in thresholds],
            "dice_mean": [m.mean for m in means], "dice_sd": [m.sd for m in means],
            "best_threshold": float(thresholds[best]), "best_dice": means[best].mean,
            "pixel_auc_mean": auc.mean, "pixel_auc_sd": auc.sd}


def write_threshold_table(out_dir: str | Path, sweeps: Mapping[str, dict]) -> dict[str, Path]:
    """``thresholds.md`` and ``thresholds.csv``: for each design (label -> the dict of
    :func:`threshold_sweep`), mean Dice over test slides at every threshold, the best
    one and the mean pixel AUC.  Shows whether an ordering at the paper's threshold of
    0.5 holds at every threshold, or only because one design's probabilities sit on the
    wrong side of 0.5."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = {tuple(s["thresholds"]) for s in sweeps.values()}
    if len(grids) != 1:
        raise ConfigError("designs were swept over different thresholds; cannot tabulate them together")
    thresholds = next(iter(grids))
    header = ["Design", *(f"{t:g}" for t in thresholds), "best", "pixel AUC"]
    body = [[label, *(f"{d:.3f}" for d in s["dice_mean"]), f"{s['best_dice']:.3f} at {s['best_threshold']:g}",
             f"{s['pixel_auc_mean']:.3f}"] for label, s in sweeps.items()]
    text = "\n".join([
        "# Dice by threshold",
        "",
        "Mean Dice over test slides of the tumour probability thresholded at each value "
        "(the tables score at 0.5, the paper's threshold), the best of them, and the mean "
        "pixel-wise ROC AUC of the probability map.",
        "",
        _md_table(header, body),
        "",
    ])
    paths = {"thresholds_md": out_dir / "thresholds.md", "thresholds_csv": out_dir / "thresholds.csv"}
    paths["thresholds_md"].write_text(text, encoding="utf-8")
    _write_csv(paths["thresholds_csv"],
               ["design", *(f"dice_{t:g}" for t in thresholds), "best_threshold", "best_dice", "pixel_auc_mean",
                "pixel_auc_sd"],
               [[label, *s["dice_mean"], s["best_threshold"], s["best_dice"], s["pixel_auc_mean"], s["pixel_auc_sd"]]
                for label, s in sweeps.items()])
    return paths


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _grade_cells(summary: DesignSummary, grade: str) -> tuple:
    value = summary.dice_by_grade.get(grade)
    return ("", "", 0) if value is None else (value.mean, value.sd, value.n)


def _grade_n(summaries: list[DesignSummary], grade: str) -> str:
    counts = sorted({s.dice_by_grade[grade].n for s in summaries if grade in s.dice_by_grade})
    return "/".join(map(str, counts))


def _write_csv(path: Path, header: list[str], body: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)


# ---------------------------------------------------------------- helpers
def _check_rows(per_slide: Sequence[dict]) -> list[dict]:
    rows = list(per_slide)
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"per-slide row {i} lacks {', '.join(missing)}")
        bad = [m for m in METRICS if not (isinstance(row[m], (int, float, np.number)) and math.isfinite(row[m]))]
        if bad:
            raise ValueError(f"per-slide row {i} ({row['design']}, {row['slide_id']}): non-finite {', '.join(bad)}")
    return rows


def _grade(row: dict) -> str:
    return str(row["grade"])


def _grade_order(grade: str):
    return (0, int(grade), "") if grade.lstrip("-").isdigit() else (1, 0, grade)
