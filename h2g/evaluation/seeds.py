"""Designs compared over several training seeds.

One seed on a handful of test slides cannot separate designs a few hundredths of Dice
apart: the run-to-run spread of a smoke design is of that size.  This module reads the
``metrics.json`` of several run folders (one seed each, written by
``experiments/run.py --seed S --out FOLDER``), and gives, per design, the mean and sample
standard deviation over seeds of the test-set Dice, and for a pair of designs the
per-seed difference (paired by seed: both designs of one seed share the run's stages).

Runs must be comparable: the same preset and the same test slides, one folder per seed;
anything else is a :class:`h2g.core.errors.ConfigError` naming the folders.
TensorFlow-free.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from h2g.core.errors import ConfigError
from h2g.evaluation.tables import MeanSD


@dataclass(frozen=True)
class SeedRun:
    """The designs' test Dice of one run folder."""

    folder: Path
    seed: int
    preset: str
    n_test_slides: int
    dice: dict[str, float]  # design name -> mean Dice over the test slides
    labels: dict[str, str]  # design name -> display label


@dataclass(frozen=True)
class OverSeeds:
    """A value over seeds: its per-seed values, and their mean and sample sd
    (:class:`h2g.evaluation.tables.MeanSD`: ddof 1; 0 for one seed)."""

    values: tuple[float, ...]

    @property
    def summary(self) -> MeanSD:
        return MeanSD.of(self.values)

    @property
    def mean(self) -> float:
        return self.summary.mean

    @property
    def sd(self) -> float:
        return self.summary.sd


def load_run(folder: Path) -> SeedRun:
    """The ``metrics.json`` of every design folder in ``folder``."""
    folder = Path(folder)
    files = sorted(folder.glob("*/metrics.json"))
    if not files:
        raise ConfigError(f"{folder}: no <design>/metrics.json (not a folder written by experiments/run.py)")
    dice, labels, seen = {}, {}, set()
    for path in files:
        try:
            m = json.loads(path.read_text())
            name, value = m["design"], float(m["dice_mean"])
            seen.add((int(m["seed"]), str(m["preset"]), int(m["n_test_slides"])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable metrics ({exc.__class__.__name__}: {exc})") from None
        if math.isnan(value):
            raise ConfigError(f"{path}: dice_mean is NaN")
        dice[name], labels[name] = value, str(m.get("label", name))
    if len(seen) != 1:
        raise ConfigError(f"{folder}: its designs were run with different seeds, presets or test sets: "
                          f"{sorted(seen)}")
    seed, preset, n = seen.pop()
    return SeedRun(folder, seed, preset, n, dice, labels)


def load_runs(folders: Iterable[Path]) -> list[SeedRun]:
    """One :class:`SeedRun` per folder, checked to be comparable (one seed each, same
    preset and number of test slides), sorted by seed."""
    runs = [load_run(f) for f in folders]
    if not runs:
        raise ConfigError("no run folders given")
    by_seed: dict[int, list[Path]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r.folder)
    twice = {s: f for s, f in by_seed.items() if len(f) > 1}
    if twice:
        raise ConfigError("one folder per seed: " + "; ".join(
            f"seed {s} in {', '.join(map(str, f))}" for s, f in sorted(twice.items())))
    kinds = {(r.preset, r.n_test_slides) for r in runs}
    if len(kinds) != 1:
        raise ConfigError("runs with different presets or test sets cannot be compared: " + "; ".join(
            f"{r.folder}: {r.preset}, {r.n_test_slides} test slides" for r in runs))
    return sorted(runs, key=lambda r: r.seed)


def common_designs(runs: Sequence[SeedRun], order: Sequence[str] = ()) -> list[str]:
    """The designs every run has, in ``order`` (the tools pass the registry's: the papers'
    tables'); names not in it come last, alphabetically."""
    order = {name: i for i, name in enumerate(order)}
    names = [n for n in runs[0].dice if all(n in r.dice for r in runs)]
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def design_dice(runs: Sequence[SeedRun], design: str) -> OverSeeds:
    """``design``'s test Dice in each run (seed order)."""
    missing = [str(r.folder) for r in runs if design not in r.dice]
    if missing:
        raise ConfigError(f"design {design!r} is not in {', '.join(missing)}")
    return OverSeeds(tuple(r.dice[design] for r in runs))


def paired_difference(runs: Sequence[SeedRun], a: str, b: str) -> OverSeeds:
    """Dice of ``a`` minus Dice of ``b``, seed by seed."""
    da, db = design_dice(runs, a), design_dice(runs, b)
    return OverSeeds(tuple(x - y for x, y in zip(da.values, db.values)))


def summary_markdown(runs: Sequence[SeedRun], pairs: Sequence[tuple[str, str]] = (), order: Sequence[str] = ()) -> str:
    """The per-design table (Dice per seed, mean +- sd over seeds; designs in ``order``) and, for each pair
    ``(a, b)``, the per-seed differences ``a - b``, their mean +- sd and in how many seeds
    ``a`` is above ``b``."""
    seeds = [r.seed for r in runs]
    labels = runs[0].labels
    head = "| Design | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |"
    lines = [f"Test-set Dice ({runs[0].preset} preset, {runs[0].n_test_slides} test slides) over "
             f"{len(runs)} seeds; sd: sample standard deviation over seeds.", "", head,
             "|---" * (len(seeds) + 2) + "|"]
    for name in common_designs(runs, order):
        d = design_dice(runs, name)
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(f"{v:.3f}" for v in d.values)
                     + f" | {d.summary} |")
    if pairs:
        lines += ["", "| Difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | above in |",
                  "|---" * (len(seeds) + 3) + "|"]
        for a, b in pairs:
            d = paired_difference(runs, a, b)
            above = sum(v > 0 for v in d.values)
            lines.append(f"| {labels.get(a, a)} − {labels.get(b, b)} | "
                         + " | ".join(f"{v:+.3f}" for v in d.values)
                         + f" | {d.mean:+.3f} ± {d.sd:.3f} | {above} of {len(d.values)} |")
    return "\n".join(lines) + "\n"


def seed_figure(path: str | Path, runs: Sequence[SeedRun], order: Sequence[str] = ()) -> Path:
    """PNG: each design's test Dice per seed (one marker per seed, a line joining one
    seed's designs) and the mean over seeds (a bar), designs in ``order``."""
    from matplotlib.figure import Figure

    names = common_designs(runs, order)
    labels = runs[0].labels
    x = np.arange(len(names))
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6), dpi=100)
    ax = fig.subplots()
    ax.bar(x, [design_dice(runs, n).mean for n in names], color="0.85", width=0.6, label="mean over seeds")
    for r in runs:
        ax.plot(x, [r.dice[n] for n in names], marker="o", linewidth=0.8, alpha=0.8, label=f"seed {r.seed}")
    ax.set_xticks(x, [labels.get(n, n) for n in names], rotation=30, ha="right")
    ax.set_ylabel("test Dice")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)
