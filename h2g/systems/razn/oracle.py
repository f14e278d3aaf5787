"""RAZN's oracle measurement over a finished ``--system razn`` run folder
(``tools/razn_oracle.py``): what a perfect zoom policy could reach with the run's
networks, and where RAZN's own policy zooms against where zooming helps.

On every annotated slide of a split, the run's networks segment the same region grid
as its pipeline does (:meth:`Pipeline.segmenter`: the label maps its ``metrics.json``
scored):

- ``Scale 1`` and ``Scale 2`` (``razn_scale1``, ``razn_scale2``): their unit models;
- when the run has RAZN (``razn``): RAZN as run (its policy), and its coarse network and
  its fine network each on *every* region (a constant policy of 0 or 1).

The region footprints on the evaluation grid (:func:`h2g.evaluation.zoom_oracle.region_blocks`)
then give, pooled over the slides: the oracle over Scale 1 / Scale 2 (zoom where Scale 2
labels more of the region right), the oracle over RAZN's own two networks, RAZN's
decisions applied to Scale 1 / Scale 2, and RAZN's decisions re-merged from its
coarse-only and fine-only maps (which must equal RAZN as run: a check of the merge).
Per region: the majority true class, each branch's correct pixels, the oracle's and
RAZN's decisions and, on the embedded cohort, the lesion kinds under it
(:data:`h2g.data.cohort.REGION_NAMES`, rendered from the cohort's layout and checked
against the label map).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from pathlib import Path

import numpy as np

from h2g.core.config import Config
from h2g.core.errors import ConfigError
from h2g.evaluation import metrics, zoom_oracle
from h2g.io.classes import IGNORE

log = logging.getLogger("h2g")
BASELINES = ("razn_scale1", "razn_scale2")
MIMIC_KINDS = ("adenosis", "sclerosing", "dcis", "lymphoid", "nodule")
KIND_SHARE = 0.1  # a region "holds" a lesion kind when it covers this share of the region


def _from_dict(cls, values: dict):
    """A config dataclass from its ``to_dict()`` (lists back to tuples; unknown keys are
    ignored, missing ones keep their defaults)."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            value = _from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kw[f.name] = value
    return cls(**kw)


def config_from_dict(saved: dict) -> Config:
    """The config a run folder's ``config.json`` (:meth:`Config.to_dict`) records: its
    preset and seed, each section read back into its dataclass (keys the section no longer
    has are ignored, missing ones keep the preset's value)."""
    from h2g.systems.registry import load_config

    config = load_config(saved.get("preset", "paper"), seed=int(saved.get("seed", 0)))
    return config.replace(**{name: _from_dict(type(section), {**dataclasses.asdict(section), **saved[name]})
                             for name, section in config.sections.items() if isinstance(saved.get(name), dict)})


def load_run(run_dir) -> tuple[Path, Config, tuple[str, ...]]:
    """``(manifest path, config, designs present)`` of a RAZN run folder; a
    :class:`ConfigError` when Scale 1 or Scale 2 is missing or unfinished."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a folder")
    missing = [d for d in BASELINES if not (run_dir / d / "metrics.json").is_file()]
    if missing:
        raise ConfigError(f"{run_dir}: no finished {', '.join(missing)} (run experiments/run.py --system razn "
                          f"--out {run_dir} first)")
    try:
        saved = json.loads((run_dir / "razn_scale1" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir / 'razn_scale1' / 'config.json'}: cannot read it ({exc})") from None
    config = config_from_dict(saved)
    designs = tuple(d for d in (*BASELINES, "razn") if (run_dir / d / "metrics.json").is_file())
    return Path(saved["manifest"]), config, designs


class ConstantPolicy:
    """A policy backend that answers ``value`` for every region (0: never zoom, 1: always)."""

    def __init__(self, value: float):
        self.value, self.source, self.metadata = float(value), f"constant policy {value:g}", None

    def predict(self, x):
        return np.full((len(x), 1), self.value, np.float32)


def cohort_kinds(manifest_path: Path, record, shape: tuple[int, int], downsample: float, truth: np.ndarray,
                 cohort_seed: int = 0) -> np.ndarray | None:
    """The embedded cohort's region kinds (indices into ``REGION_NAMES``) of ``record`` on
    the label-map grid, or None when ``manifest_path`` is not an embedded cohort's
    multi-class manifest or the rendered kinds disagree with ``truth`` (another seed)."""
    from h2g.data import cohort
    from h2g.data.fields import Grid

    text = Path(manifest_path).read_text()
    preset = next((p for p in cohort.PRESETS if text == cohort.manifest_text(p, multiclass=True)), None)
    if preset is None:
        return None
    spec = next(s for s in cohort.cohort_specs(preset) if s.slide_id == record.slide_id)
    renderer = cohort.SlideRenderer(cohort.slide_layout(preset, spec, cohort_seed), key=(cohort_seed, spec.index))
    kinds = renderer.regions(Grid(0.0, 0.0, tuple(shape), float(downsample)))
    expected = cohort.LABEL_OF_REGION[kinds].astype(np.int64) - 1  # pixel value 1.. -> class index 0..
    annotated = truth != IGNORE
    agree = float((expected[annotated] == truth[annotated]).mean()) if annotated.any() else 0.0
    if agree < 0.98:
        log.warning("%s: the cohort's regions (seed %d) match its label map on %.0f %% of pixels; no lesion "
                    "kinds", record.slide_id, cohort_seed, 100 * agree)
        return None
    return kinds


def measure(run_dir, split: str = "test", cohort_seed: int = 0, figure_slides: int = 4,
            progress: bool = True) -> dict:
    """The oracle measurement (module doc) of a run folder: ``{"variants": {name:
    ClassScores}, "regions": {column: array}, "figures": [...], "config", "designs"}``."""
    from tqdm.auto import tqdm

    from h2g.data.cohort import REGION_NAMES
    from h2g.inference.backends import KerasBackend
    from h2g.io.slide import open_slide
    from h2g.systems.razn.designs import DESIGNS
    from h2g.systems.razn.pipeline import Pipeline

    run_dir = Path(run_dir)
    manifest_path, config, designs = load_run(run_dir)
    pipe = Pipeline(manifest_path, run_dir, config)
    names = pipe.classes.names
    segmenters = {d: pipe.segmenter_of(DESIGNS[d], {"segmentation": KerasBackend(run_dir / d / "models" /
                                                                                   "segmenter.keras")})
                  for d in BASELINES}
    razn = None
    if "razn" in designs:
        razn = {r: KerasBackend(run_dir / "razn" / "models" / f"{r}.keras") for r in ("policy", "coarse", "fine")}
        segmenters["razn"] = pipe.segmenter_of(DESIGNS["razn"], razn)
        for label, value in (("razn_coarse", 0.0), ("razn_fine", 1.0)):
            segmenters[label] = pipe.segmenter_of(DESIGNS["razn"], {**razn, "policy": ConstantPolicy(value)})

    def segment(name, record):  # (raster, zoom decisions or None), as the run's evaluation segments
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            seg = segmenters[name].segment(slide)
        return seg.raster, seg.zoom
    records = [r for r in pipe.records(split) if r.annotation_path is not None]
    if not records:
        raise ConfigError(f"{manifest_path}: no annotated {split} slide")
    variants: dict[str, metrics.ClassScores] = {}
    columns: dict[str, list] = {}
    figures = []

    def add(name, pred, truth):
        scores = metrics.class_metrics(pred, truth, names)
        variants[name] = scores if name not in variants else variants[name] + scores

    for record in tqdm(records, desc="oracle slides", unit="slide", disable=not progress):
        annotation = pipe.annotation(record)
        maps = {}
        for d in BASELINES:
            raster, _ = segment(d, record)
            maps[d], truth = metrics.raster_labels(raster, annotation, names)
        grid_downsample = raster.downsample
        top_left, size = _grid(pipe, record)
        zoomed = None
        if razn is not None:
            raster, stats = segment("razn", record)
            if not np.array_equal(stats.top_left, top_left):
                raise ConfigError(f"{record.slide_id}: RAZN's region grid is not the baselines'")
            maps["razn"], _ = metrics.raster_labels(raster, annotation, names)
            zoomed = stats.zoomed
            for label, value in (("razn_coarse", 0.0), ("razn_fine", 1.0)):
                raster, _ = segment(label, record)
                maps[label], _ = metrics.raster_labels(raster, annotation, names)
        shape = truth.shape
        blocks = zoom_oracle.region_blocks(top_left, size, grid_downsample / annotation.downsample, shape)
        table = zoom_oracle.region_table(maps["razn_scale1"], maps["razn_scale2"], truth, blocks, len(names))
        add("Scale 1", maps["razn_scale1"], truth)
        add("Scale 2", maps["razn_scale2"], truth)
        oracle_map = zoom_oracle.merge(maps["razn_scale1"], maps["razn_scale2"], blocks, table["oracle"])
        add("Oracle (Scale 1 / Scale 2)", oracle_map, truth)
        n = len(blocks)
        columns.setdefault("slide", []).extend([record.slide_id] * n)
        for k, v in table.items():
            columns.setdefault(k, []).extend(v.tolist())
        if razn is not None:
            own = zoom_oracle.region_table(maps["razn_coarse"], maps["razn_fine"], truth, blocks, len(names))
            add("RAZN (as run)", maps["razn"], truth)
            add("RAZN coarse net, every region", maps["razn_coarse"], truth)
            add("RAZN fine net, every region", maps["razn_fine"], truth)
            add("RAZN re-merged from its two nets", zoom_oracle.merge(maps["razn_coarse"], maps["razn_fine"],
                                                                        blocks, zoomed), truth)
            add("Oracle (RAZN's coarse / fine)", zoom_oracle.merge(maps["razn_coarse"], maps["razn_fine"], blocks,
                                                                    own["oracle"]), truth)
            add("RAZN's policy on Scale 1 / Scale 2", zoom_oracle.merge(maps["razn_scale1"], maps["razn_scale2"],
                                                                         blocks, zoomed), truth)
            columns.setdefault("razn_zoom", []).extend(np.asarray(zoomed, bool).tolist())
            columns.setdefault("oracle_own", []).extend(own["oracle"].tolist())
            columns.setdefault("correct_razn_coarse", []).extend(own["correct_coarse"].tolist())
            columns.setdefault("correct_razn_fine", []).extend(own["correct_fine"].tolist())
        kinds = cohort_kinds(manifest_path, record, shape, annotation.downsample, truth, cohort_seed)
        for name in MIMIC_KINDS:  # NaN: the slide's lesion kinds are unknown
            k = REGION_NAMES.index(name)
            share = [float((kinds[b] == k).mean()) if kinds is not None and kinds[b].size else np.nan
                     for b in blocks]
            columns.setdefault(f"share_{name}", []).extend(share)
        if len(figures) < figure_slides:
            figures.append({"slide": record.slide_id, "truth": truth, "kinds": kinds, "blocks": blocks,
                            "oracle": table["oracle"], "razn_zoom": zoomed,
                            "gain": (table["correct_fine"] - table["correct_coarse"])
                            / np.maximum(table["annotated"], 1)})
    regions = {k: np.asarray(v) for k, v in columns.items()}
    return {"variants": variants, "regions": regions, "figures": figures, "config": config, "designs": designs,
            "classes": names, "colours": pipe.classes.colours, "manifest": str(manifest_path), "split": split,
            "slides": len(records)}


def _grid(pipe, record) -> tuple[np.ndarray, int]:
    """The region grid the pipeline segments ``record`` on: top-left corners (raster px)
    and the region side on the fine grid."""
    from h2g.io.slide import open_slide
    from h2g.tiling.tissue import detect_tissue
    from h2g.tiling.windows import window_grid

    c = pipe.config
    _, v1 = pipe.zoom_views
    with open_slide(record.slide_path, mpp=record.mpp) as slide:
        tissue = detect_tissue(slide, magnification=c.patches.tissue_magnification,
                               saturation_threshold=c.patches.saturation_threshold)
        grid = window_grid(slide, magnification=v1.magnification, size=v1.size, stride=v1.size, tissue=tissue)
    return np.asarray(grid.top_left, np.int64).reshape(-1, 2), v1.size


def reward_signal(run_dir, batches: int = 40) -> dict:
    """The reward RAZN's policy learns from, on the first ``batches`` training batches
    (the sampler's, as training draws them) scored by the run's final Scale 1 and Scale 2
    networks (what RAZN's coarse and fine networks are when trained on every region):
    per majority class of the regions, the mean advantage ``(J0 - J1) / max(J0,
    reward_floor)`` and the share of regions where it is > 0, with the networks in their
    training pass (batch statistics) and as inference runs them (moving statistics).
    Each mode has its own copy of the networks (a training-mode call updates the moving
    statistics)."""
    from h2g.inference.backends import load_keras_model
    from h2g.systems.razn.pipeline import Pipeline
    from h2g.systems.razn.training import masked_cross_entropy

    run_dir = Path(run_dir)
    manifest_path, config, _ = load_run(run_dir)
    pipe = Pipeline(manifest_path, run_dir, config)
    nets = {mode: [load_keras_model(run_dir / d / "models" / "segmenter.keras") for d in BASELINES]
            for mode in ("training", "inference")}
    floor = max(config.razn.reward_floor, 1e-6)
    adv = {mode: [] for mode in nets}
    floored = {mode: [] for mode in nets}
    majority = []
    data = iter(pipe.batches(0))
    for _ in range(batches):
        inputs, y = next(data)
        labels = np.asarray(y)
        for mode, (s1, s2) in nets.items():
            j0 = masked_cross_entropy(s1(inputs["x0"], training=mode == "training"), y).numpy()
            j1 = masked_cross_entropy(s2(inputs["x1"], training=mode == "training"), y).numpy()
            adv[mode].append((j0 - j1) / np.maximum(j0, floor))
            floored[mode].append(j0 < floor)
        for lab in labels:
            lab = lab[lab != IGNORE]
            majority.append(int(np.bincount(lab, minlength=len(pipe.classes.names)).argmax()) if lab.size else -1)
    majority = np.asarray(majority)
    out = {"regions": int(len(majority)), "batches": batches, "reward_floor": floor}
    for mode in nets:
        a = np.concatenate(adv[mode])
        out[mode] = {"all": {"regions": int(len(a)), "advantage": float(a.mean()), "positive": float((a > 0).mean())}}
        out[f"{mode}_floored"] = float(np.concatenate(floored[mode]).mean())  # share of regions with J0 < floor
        for i, name in enumerate(pipe.classes.names):
            m = majority == i
            if m.any():
                out[mode][name] = {"regions": int(m.sum()), "advantage": float(a[m].mean()),
                                   "positive": float((a[m] > 0).mean())}
    return out


def reward_markdown(r: dict) -> str:
    """:func:`reward_signal` as a markdown table."""
    groups = list(r["training"])
    lines = [f"Reward signal on {r['regions']} training regions ({r['batches']} batches; advantage (J0 - J1) / "
             f"max(J0, {r['reward_floor']:g}) of the final Scale 1 / Scale 2 nets; share > 0 in brackets)", "",
             "| networks | " + " | ".join(f"{g} ({r['training'][g]['regions']})" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for mode, label in (("training", "training pass (batch statistics)"), ("inference", "as at inference")):
        cells = [f"{r[mode][g]['advantage']:+.2f} ({100 * r[mode][g]['positive']:.0f} %)" for g in groups]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"J0 below the floor (the floor sets the denominator): {100 * r['training_floored']:.1f} % of the "
                  f"regions in the training pass, {100 * r['inference_floored']:.1f} % as at inference."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------
def summary(result: dict) -> dict:
    """JSON-ready figures: per variant mIoU and per-class IoU; zoom shares (of the
    annotated regions); per majority class and per lesion kind: regions, oracle and RAZN
    zoom shares, the mean gain of Scale 2 over Scale 1 in correct pixels (share of the
    region's annotated pixels)."""
    names = result["classes"]
    reg = result["regions"]
    annotated = reg["annotated"] > 0
    gain = (reg["correct_fine"] - reg["correct_coarse"]) / np.maximum(reg["annotated"], 1)
    out = {"manifest": result["manifest"], "split": result["split"], "slides": result["slides"],
           "regions": int(annotated.sum()), "designs": list(result["designs"]),
           "variants": {k: {"mean_iou": float(v.mean_iou),
                            "iou": {n: float(v.iou[i]) for i, n in enumerate(names) if v.present[i]}}
                        for k, v in result["variants"].items()},
           "oracle_zoom_share": float(reg["oracle"][annotated].mean())}
    has_razn = "razn_zoom" in reg
    if has_razn:
        z, o = reg["razn_zoom"][annotated], reg["oracle"][annotated]
        out["razn_zoom_share"] = float(z.mean())
        out["razn_zoom_precision"] = float(o[z].mean()) if z.any() else None  # its zooms the oracle makes too
        out["razn_zoom_recall"] = float(z[o].mean()) if o.any() else None  # the oracle's zooms it makes
        out["oracle_own_zoom_share"] = float(reg["oracle_own"][annotated].mean())

    def group(mask) -> dict:
        m = mask & annotated
        row = {"regions": int(m.sum())}
        if m.any():
            row["oracle_zoom"] = float(reg["oracle"][m].mean())
            row["scale2_gain"] = float(gain[m].mean())
            if has_razn:
                row["razn_zoom"] = float(reg["razn_zoom"][m].mean())
        return row

    out["by_class"] = {n: group(reg["majority"] == i) for i, n in enumerate(names)}
    known = np.isfinite(reg["share_" + MIMIC_KINDS[0]])  # regions of slides whose lesion kinds are known
    if known.any():
        mimic = np.zeros(len(gain), bool)
        for k in MIMIC_KINDS:
            holds = known & (np.nan_to_num(reg[f"share_{k}"]) >= KIND_SHARE)
            mimic |= holds
            out.setdefault("by_lesion", {})[k] = group(holds)
        out["by_lesion"]["no mimic"] = group(known & ~mimic)
    return out


def markdown(s: dict) -> str:
    """The summary as markdown tables."""
    lines = [f"Oracle over {s['slides']} {s['split']} slides ({s['regions']} annotated regions) of {s['manifest']}",
             "", "| Variant | mIoU | " + " | ".join(next(iter(s["variants"].values()))["iou"]) + " |",
             "|---|---|" + "---|" * len(next(iter(s["variants"].values()))["iou"])]
    for name, v in s["variants"].items():
        lines.append(f"| {name} | {v['mean_iou']:.3f} | " + " | ".join(f"{x:.3f}" for x in v["iou"].values()) + " |")
    lines += ["", f"Oracle (Scale 1 / Scale 2) zooms {100 * s['oracle_zoom_share']:.1f} % of the regions."]
    if "razn_zoom_share" in s:
        prec = s["razn_zoom_precision"]
        rec = s["razn_zoom_recall"]
        lines.append(f"RAZN zooms {100 * s['razn_zoom_share']:.1f} %; of its zooms "
                     f"{'-' if prec is None else f'{100 * prec:.1f} %'} are the oracle's, of the oracle's zooms it "
                     f"makes {'-' if rec is None else f'{100 * rec:.1f} %'}. The oracle over RAZN's own nets zooms "
                     f"{100 * s['oracle_own_zoom_share']:.1f} %.")

    def table(title, groups):
        head = f"| {title} | regions | Scale 2 gain (share of px) | oracle zooms | RAZN zooms |"
        rows = [head, "|---|---|---|---|---|"]
        for k, g in groups.items():
            if not g["regions"]:
                rows.append(f"| {k} | 0 | - | - | - |")
                continue
            razn = f"{100 * g['razn_zoom']:.0f} %" if "razn_zoom" in g else "-"
            rows.append(f"| {k} | {g['regions']} | {g['scale2_gain']:+.3f} | {100 * g['oracle_zoom']:.0f} % | {razn} |")
        return rows

    lines += ["", *table("majority class", s["by_class"])]
    if "by_lesion" in s:
        lines += ["", *table(f"lesion (>= {100 * KIND_SHARE:.0f} % of the region)", s["by_lesion"])]
    return "\n".join(lines) + "\n"


def figure(path: Path, result: dict) -> Path:
    """PNG, one row per slide: the truth (class colours, mimic lesions outlined), the gain
    of Scale 2 over Scale 1 per region (share of its pixels; red: Scale 2 better), the
    oracle's zooms and RAZN's zooms (red: zoom, blue: coarse)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from h2g.core.atomic import replace_atomically
    from h2g.data.cohort import REGION_NAMES
    from h2g.io.classes import colour_rgb

    rows = result["figures"]
    colours = np.array([colour_rgb(c) for c in result["colours"]], float) / 255
    has_razn = any(r["razn_zoom"] is not None for r in rows)
    ncols = 4 if has_razn else 3
    fig = Figure(figsize=(3 * ncols, 3 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for row, ax in zip(rows, axes):
        truth = row["truth"]
        image = np.ones(truth.shape + (3,))
        valid = truth != IGNORE
        image[valid] = colours[truth[valid]]
        ax[0].imshow(image)
        if row["kinds"] is not None:
            mimic = np.isin(row["kinds"], [REGION_NAMES.index(k) for k in MIMIC_KINDS])
            if mimic.any():
                ax[0].contour(mimic, levels=[0.5], colors="k", linewidths=0.6)
        ax[0].set_ylabel(row["slide"])
        maps = [("Scale 2 gain over Scale 1", row["gain"], "RdBu_r", -0.5, 0.5),
                ("oracle zooms (red)", row["oracle"].astype(float), ListedColormap(["#3060c0", "#d03030"]), 0, 1)]
        if has_razn:
            maps.append(("RAZN zooms (red)", np.asarray(row["razn_zoom"], float),
                         ListedColormap(["#3060c0", "#d03030"]), 0, 1))
        for a, (title, values, cmap, lo, hi) in zip(ax[1:], maps):
            grid = np.full(truth.shape, np.nan, np.float32)
            for block, v in zip(row["blocks"], values):
                grid[block] = v
            a.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi)
            if row is rows[0]:
                a.set_title(title, fontsize=9)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_title("truth (mimics outlined)", fontsize=9)
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
