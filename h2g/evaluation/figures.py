"""Figures of a run: example segmentations beside their ground truth (``figure_grid``;
``label_map_grid`` for multi-class label maps) and the Dice box plot per design
(``dice_boxplot``).  matplotlib through
``matplotlib.figure.Figure`` (Agg), never pyplot's global state."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from h2g.core.errors import ConfigError
from h2g.evaluation.tables import _check_rows


# ---------------------------------------------------------------- figures
def figure_grid(path: str | Path, rows: Sequence[tuple]) -> Path:
    """PNG grid, one row per slide: image, ground truth, heatmap, prediction.

    ``rows``: ``(title, image, truth, heatmap, prediction)`` with ``image`` RGB
    (``uint8`` or float in [0, 1]), ``truth`` / ``prediction`` boolean masks and
    ``heatmap`` a float probability map or ``None`` (designs without one)."""
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("figure_grid needs at least one row")
    columns = ("image", "ground truth", "heatmap", "prediction")
    fig = Figure(figsize=(3 * len(columns), 3 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (title, image, truth, heatmap, prediction) in enumerate(rows):
        panels = (image, truth, heatmap, prediction)
        for c, (name, panel) in enumerate(zip(columns, panels)):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if panel is None:
                ax.text(0.5, 0.5, "no heatmap", ha="center", va="center", transform=ax.transAxes)
            elif c == 0:
                ax.imshow(panel)
            elif c == 2:
                ax.imshow(panel, cmap="inferno", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(np.asarray(panel, dtype=float), cmap="gray", vmin=0.0, vmax=1.0)
        axes[r, 0].set_ylabel(str(title))
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def label_map_grid(path: str | Path, rows: Sequence[tuple], classes) -> Path:
    """PNG grid, one row per slide: ground truth and prediction label maps coloured by
    the class table ``classes`` (unannotated truth pixels white), with a legend.

    ``rows``: ``(title, prediction, truth)`` integer label maps of one shape (class
    indices; 255 in the truth = unannotated)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("label_map_grid needs at least one row")
    from h2g.io.classes import colour_rgb

    palette = np.array([colour_rgb(c) for c in classes.colours], np.uint8)

    def colour(labels):
        labels = np.asarray(labels)
        out = np.full((*labels.shape, 3), 255, np.uint8)
        valid = (labels >= 0) & (labels < len(palette))
        out[valid] = palette[labels[valid]]
        return out

    fig = Figure(figsize=(7, 3 * len(rows) + 0.8), dpi=100)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for r, (title, prediction, truth) in enumerate(rows):
        for c, (name, panel) in enumerate((("ground truth", truth), ("prediction", prediction))):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            ax.imshow(colour(panel), interpolation="nearest")
        axes[r, 0].set_ylabel(str(title))
    handles = [Patch(color=palette[i] / 255.0, label=name) for i, name in enumerate(classes.names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3 * len(rows) + 0.8), 1, 1))
    fig.savefig(path, format="png")
    return Path(path)


def dice_boxplot(path: str | Path, per_slide: Sequence[dict], designs: Sequence[str] | None = None) -> Path:
    """PNG box plot of per-slide Dice for each design (default: every design in the
    rows, in order of first appearance), with the individual slides as points."""
    from matplotlib.figure import Figure

    rows = _check_rows(per_slide)
    designs = list(designs) if designs is not None else list(dict.fromkeys(r["design"] for r in rows))
    scores = [[r["dice"] for r in rows if r["design"] == d] for d in designs]
    empty = [d for d, s in zip(designs, scores) if not s]
    if not designs or empty:
        raise ConfigError(f"no per-slide results for design(s) {', '.join(empty) or '(none given)'}")
    fig = Figure(figsize=(max(4.0, 1.2 * len(designs)), 4.5), dpi=100)
    ax = fig.subplots()
    ax.boxplot(scores, showfliers=False)
    jitter = np.random.default_rng(0)
    for i, s in enumerate(scores, start=1):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(s)), s, s=12, alpha=0.7, color="tab:blue")
    ax.set_xticks(range(1, len(designs) + 1), designs, rotation=30, ha="right")
    ax.set_ylabel("Dice (per test slide)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def group_iou_plot(path: str | Path, groups: dict, classes: Sequence[str], title: str = "") -> Path:
    """PNG bar chart of IoU per group (``{"stain=er": ClassScores.to_dict(), ...}``),
    one panel per group attribute (stain, scanner), one bar per class in ``classes``
    (m-UNet's Table 3 as a plot)."""
    from matplotlib.figure import Figure

    attributes = list(dict.fromkeys(key.split("=", 1)[0] for key in groups))
    if not attributes:
        raise ConfigError("no groups to plot")
    fig = Figure(figsize=(5.0 * len(attributes), 4.0), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(attributes)))
    width = 0.8 / max(1, len(classes))
    for ax, attribute in zip(axes, attributes):
        keys = [k for k in groups if k.split("=", 1)[0] == attribute]
        x = np.arange(len(keys))
        for i, name in enumerate(classes):
            values = [groups[k]["classes"][name]["iou"] for k in keys]
            ax.bar(x + (i - (len(classes) - 1) / 2) * width, np.nan_to_num(values), width, label=name)
        ax.set_xticks(x, [k.split("=", 1)[1] for k in keys])
        ax.set_ylim(0, 1)
        ax.set_ylabel("IoU (test slides)")
        ax.set_title(f"{title} by {attribute}".strip())
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)
