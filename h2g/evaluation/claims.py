"""The papers' claims as tested statements over several seeds.

A :class:`Claim` says that design ``better`` beats design ``worse`` on ``metric`` (higher is
better, or lower for a cost such as RAZN's relative inference time), in the paper's words
and with the paper's two figures.  Each system lists its claims in its package
(``h2g/systems/<name>/claims.py``); :func:`evaluate` checks them against run folders of the
same designs trained with different seeds (``experiments/run.py --seeds``).

For each claim (signs oriented so that a positive difference favours the claim):

- ``differences``: per seed, the claimed metric of ``better`` minus ``worse`` (the metric
  as the tables report it: the mean Dice over test slides, the pooled mean IoU, the mean
  relative time), and their ``mean`` and ``sd`` over seeds (sample sd);
- the test: the per-slide differences (each test slide's metric of the two designs under
  the same seed), averaged over the seeds for each slide, then a two-sided one-sample
  **t-test over the slides** (:func:`scipy.stats.ttest_1samp`).  Why: the test slides are
  the independent units here (the seeds retrain the networks on the same slides, so
  pooling seed x slide pairs would count each slide several times), averaging over seeds
  takes most of the training noise out of each slide's difference, and with 3 seeds a sign
  test over seeds cannot reach p < 0.25.  A metric with no per-slide value (a relative
  time) is tested over the seeds instead (``test`` says which);
- ``verdict``: ``holds`` when the mean over seeds favours the claim and p < ``ALPHA``
  (0.05); ``does not hold`` when the mean over seeds goes against it; ``undecided`` when
  it favours the claim but p >= 0.05.  A claim counts as holding only on the mean over
  seeds, never on one seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from h2g.core.errors import ConfigError
from h2g.evaluation.collapse import note

ALPHA = 0.05
HOLDS, DOES_NOT_HOLD, UNDECIDED = "holds", "does not hold", "undecided"


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` on ``metric`` (see the module doc)."""

    claim: str  # the paper's wording
    better: str  # design name
    worse: str  # design name
    metric: str  # "dice" | "mean_iou" | "relative_time" | "iou:<class>"
    paper: tuple = (None, None)  # the paper's figures of better and worse
    lower_is_better: bool = False


@dataclass
class SeedResults:
    """One seed's designs: ``metrics`` (each design's metrics.json, by design name)."""

    seed: int
    metrics: dict = field(default_factory=dict)


def design_value(metrics: Mapping, metric: str) -> float:
    """The value the tables report of ``metric`` in a design's metrics.json."""
    try:
        if metric == "dice":
            return float(metrics["dice_mean"])
        if metric == "mean_iou":
            return float(metrics["mean_iou"])
        if metric == "relative_time":
            return float(metrics["relative_time"]["mean"])
        if metric.startswith("iou:"):
            return float(metrics["classes"][metric[4:]]["iou"])
    except (KeyError, TypeError):
        raise ConfigError(f"design {metrics.get('design', '?')}: its metrics have no {metric}") from None
    raise ConfigError(f"unknown claim metric {metric!r}")


def slide_values(metrics: Mapping, metric: str) -> dict | None:
    """``{slide_id: value}`` of ``metric`` per test slide from a design's metrics.json
    (``dice_by_slide``, ``mean_iou_by_slide``), or None when the metric has none."""
    key = {"dice": "dice_by_slide", "mean_iou": "mean_iou_by_slide"}.get(metric)
    values = metrics.get(key) if key else None
    return {s: float(v) for s, v in values.items() if v is not None} if values else None


def _t_test(values: Sequence[float]) -> float | None:
    """Two-sided p of a one-sample t-test of ``values`` against 0 (None below 2 values; 0
    or 1 when every value is the same)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return None
    if np.ptp(values) == 0:
        return 1.0 if values[0] == 0 else 0.0
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(values, 0.0).pvalue)


def verdict(mean: float, p: float | None, alpha: float = ALPHA) -> str:
    """The module doc's rule, on a difference oriented to favour the claim."""
    if mean <= 0:
        return DOES_NOT_HOLD
    return HOLDS if p is not None and p < alpha else UNDECIDED


def metrics_of(seed: SeedResults, name: str) -> Mapping | None:
    """A design's metrics in ``seed``: ``design`` or ``design/round<k>`` (an entry of the
    design's ``rounds``, m-UNet's pseudo-label rounds); None when it did not run."""
    design, _, part = name.partition("/")
    metrics = seed.metrics.get(design)
    if metrics is None or not part:
        return metrics
    k = int(part.removeprefix("round"))
    rounds = {r.get("round"): r for r in metrics.get("rounds", [])}
    return rounds.get(k)


def collapsed_run(seed: SeedResults, name: str) -> bool:
    """Whether design ``name`` (``design/round<k>``: its design) was flagged as collapsed
    under ``seed`` (:mod:`h2g.evaluation.collapse`: its predictions almost all one class)."""
    metrics = seed.metrics.get(name.partition("/")[0])
    return bool(metrics and metrics.get("collapsed"))


def evaluate(claims: Sequence[Claim], seeds: Sequence[SeedResults], alpha: float = ALPHA) -> list[dict]:
    """Each claim whose two designs ran under every seed and report its metric, evaluated
    (module doc); the others are left out.  ``collapsed`` names the runs of the two designs
    flagged as collapsed: the claims table never shows their verdict without that flag."""
    out = []
    for claim in claims:
        pairs = [(metrics_of(s, claim.better), metrics_of(s, claim.worse)) for s in seeds]
        if not seeds or any(a is None or b is None for a, b in pairs):
            continue
        try:
            values = [(design_value(a, claim.metric), design_value(b, claim.metric)) for a, b in pairs]
        except ConfigError:  # e.g. a class the manifest does not have
            continue
        sign = -1.0 if claim.lower_is_better else 1.0
        differences = [sign * (a - b) for a, b in values]
        per_slide = []
        for a_metrics, b_metrics in pairs:
            a = slide_values(a_metrics, claim.metric)
            b = slide_values(b_metrics, claim.metric)
            per_slide.append(None if a is None or b is None else {k: sign * (a[k] - b[k]) for k in a if k in b})
        if all(d is not None for d in per_slide) and per_slide:
            slides = sorted(set.intersection(*(set(d) for d in per_slide)))
            averaged = [float(np.mean([d[k] for d in per_slide])) for k in slides]
            p, test = _t_test(averaged), (f"two-sided t-test over {len(slides)} test slides of the per-slide "
                                          f"differences averaged over {len(seeds)} seeds")
        else:
            p, test = _t_test(differences), f"two-sided t-test over {len(seeds)} seeds (no per-slide values)"
        mean = float(np.mean(differences))
        sd = float(np.std(differences, ddof=1)) if len(differences) > 1 else 0.0
        collapsed = [f"{name} seed {s.seed}" for name in (claim.better, claim.worse) for s in seeds
                     if collapsed_run(s, name)]
        out.append({
            "claim": claim.claim, "better": claim.better, "worse": claim.worse, "metric": claim.metric,
            "lower_is_better": claim.lower_is_better, "paper": list(claim.paper),
            "seeds": [s.seed for s in seeds],
            "differences": differences, "mean": mean, "sd": sd, "test": test,
            "p": None if p is None or math.isnan(p) else p, "verdict": verdict(mean, p, alpha),
            "collapsed": collapsed,
        })
    return out


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean_sd(mean: float, sd: float, n: int, sign: str = "") -> str:
    """``mean ± sd`` over ``n`` seeds; one seed has no sd, and says so."""
    return f"{mean:{sign}.3f} ± {sd:.3f}" if n > 1 else f"{mean:{sign}.3f} (one seed)"


def _label(name: str, labels: Mapping[str, str]) -> str:
    """A design's label; ``design/round<k>`` (a pseudo-label round) as "<label> round k"."""
    design, _, part = name.partition("/")
    label = labels.get(design, design)
    return f"{label} round {part.removeprefix('round')}" if part else label


def claims_markdown(results: Sequence[dict], labels: Mapping[str, str] | None = None) -> str:
    """The claims table: the claim, the paper's figures, each seed's difference (oriented
    to favour the claim), mean ± sd over seeds, p and the verdict."""
    labels = labels or {}
    if not results:
        return "No claim of the chosen designs ran under every seed.\n"
    seeds = results[0]["seeds"]
    head = ["Claim", "Metric", "Paper", *(f"seed {s}" for s in seeds), "Mean ± sd", "p", "Verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        better, worse = _label(r["better"], labels), _label(r["worse"], labels)
        relation = "<" if r["lower_is_better"] else ">"
        paper = " vs ".join("-" if v is None else f"{v:g}" for v in r["paper"])
        lines.append("| " + " | ".join([
            f"{better} {relation} {worse}: {r['claim']}", r["metric"], paper,
            *(f"{d:+.3f}" for d in r["differences"]),
            _mean_sd(r["mean"], r["sd"], len(r["differences"]), "+"),
            _f(r["p"], 4),
            f"**{r['verdict']}**" + (f" (collapsed: {', '.join(r['collapsed'])})" if r.get("collapsed") else "")])
            + " |")
    tests: dict[str, list[str]] = {}
    for r in results:
        metrics = tests.setdefault(r["test"].split(" of ")[0], [])
        if r["metric"] not in metrics:
            metrics.append(r["metric"])
    used = (next(iter(tests)) if len(tests) == 1
            else "; ".join(f"{test} ({', '.join(metrics)})" for test, metrics in tests.items()))
    lines += ["", "Differences favour the claim when positive (for a cost, lower is better: the sign is "
              "turned).  p: " + used + " (see "
              "h2g.evaluation.claims); holds: the mean over seeds favours the claim and p < 0.05; does not "
              "hold: the mean goes against it; undecided: it favours it but p >= 0.05."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Run folders over seeds
# --------------------------------------------------------------------------------------
def load_seeds(folders: Mapping[int, Path]) -> list[SeedResults]:
    """``{seed: run folder}`` -> each seed's finished designs (``<folder>/<design>/metrics.json``)."""
    import json
    from pathlib import Path

    out = []
    for seed, folder in sorted(folders.items()):
        metrics = {}
        for path in sorted(Path(folder).glob("*/metrics.json")):
            try:
                metrics[path.parent.name] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: cannot read it ({exc})") from None
        out.append(SeedResults(int(seed), metrics))
    return out


#: What the tables over seeds show of a design, when its metrics have it.
TABLE_METRICS = (("dice", "Dice"), ("mean_iou", "mean IoU"), ("relative_time", "relative time"))


def seeds_markdown(seeds: Sequence[SeedResults], designs: Sequence[str], labels: Mapping[str, str] | None = None,
                   classes: bool = True) -> str:
    """Each design's metrics as mean ± sd over seeds (sample sd), with every seed's value:
    Dice (binary tumour, mean over test slides), mean IoU, each class's IoU (pooled over
    the test pixels) and the relative inference time, where the design reports them.  A
    value from a run flagged as collapsed carries "(collapsed)", and a note below the table
    says what it predicted."""
    labels = labels or {}
    lines = [f"Mean ± sd over {len(seeds)} seeds ({', '.join(str(s.seed) for s in seeds)}); sample sd over seeds."
             if len(seeds) > 1 else f"One seed ({seeds[0].seed}): no sd over seeds." if seeds else "No seed.",
             "", "| Design | Metric | " + " | ".join(f"seed {s.seed}" for s in seeds) + " | Mean ± sd |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for name in designs:
        runs = [metrics_of(s, name) for s in seeds]
        if not runs or any(r is None for r in runs):
            continue
        metrics = list(TABLE_METRICS)
        if classes and runs[0].get("classes"):
            metrics += [(f"iou:{c}", f"{c} IoU") for c in runs[0]["classes"]]
        for metric, title in metrics:
            try:
                values = [design_value(r, metric) for r in runs]
            except ConfigError:
                continue
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            flags = [" (collapsed)" if collapsed_run(s, name) else "" for s in seeds]
            lines.append(f"| {labels.get(name, name)} | {title} | "
                         + " | ".join(f"{v:.3f}{flag}" for v, flag in zip(values, flags))
                         + f" | {_mean_sd(float(np.mean(values)), sd, len(values))}"
                         + f"{' (collapsed runs in it)' if any(flags) else ''} |")
    notes = [f"{labels.get(name, name)} seed {s.seed}: {_collapse_text(s.metrics[name.partition('/')[0]])}"
             for name in designs for s in seeds if collapsed_run(s, name)]
    if notes:
        lines += ["", "Collapsed runs (their predictions fall almost entirely into one class: not a trained "
                  "model's figures): " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def _collapse_text(metrics: Mapping) -> str:
    c = metrics.get("collapse") or {}
    return note({**c, "collapsed": True}) if c.get("dominant") else "collapsed"
