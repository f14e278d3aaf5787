"""Transfer of a trained H2G-Net run to real breast-cancer tissue: the BCSS regions.

The real-data folder (``$H2G_REAL_DATA``, by default ``../shared/data/real`` beside the
repository; never copied into it) holds ``bcss_roi/images/<id>.jpg``: regions of TCGA
breast H&E at 0.25 um/px (40x), and ``bcss_roi/masks/<id>.jpg``: their tumour masks,
JPEG-compressed RGB, tumour where grey > 127 (:func:`load_truth`).  A region's truth may
also be a polygon annotation of the same name (``masks/<id>.geojson`` / ``.xml``: QuPath,
ASAP or Aperio, in the region's pixels), read by :func:`h2g.io.annotation.load_annotation`.

Each region is written as a 0.25 um/px pyramidal tiled TIFF (:func:`write_region_slide`:
level 0 lossless, so it holds exactly the JPEG's decoded pixels; checked when opened) and
segmented by a *predictor*: a callable ``predictor(slide) -> Prediction`` (or a bare
probability array).  The real one is :class:`h2g.systems.h2g.runs.RunPredictor`: a
finished run of a patch-classifier + refinement design, through H2G-Net's deployed
segmenter with the run's settings (what the training pipeline does for cohort slides).

Scoring (:func:`score`): the prediction's grid is whatever the predictor returns (the
refinement resolution S x S over the region's full extent for a run); the truth is
area-averaged onto that grid and thresholded at >= 0.5 - the rule of
:func:`h2g.systems.h2g.refinement.target_mask`, which the run was scored with - and
Dice, recall and precision follow :func:`h2g.evaluation.metrics.segmentation_metrics`.
TensorFlow-free.
"""
from __future__ import annotations

import csv
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from h2g.core.atomic import write_json, write_text
from h2g.core.errors import ConfigError, H2GError
from h2g.evaluation.metrics import binarise, segmentation_metrics

#: microns per pixel of the BCSS regions (40x)
BCSS_MPP = 0.25
#: where the regions lie inside the real-data folder
BCSS_FOLDER = "bcss_roi"
#: the truth rule of the masks (grey level, 0-255)
GREY_THRESHOLD = 127
#: besides ``masks/<id>.jpg``: annotations of the same name that may hold a region's truth
TRUTH_SUFFIXES = (".png", ".tif", ".tiff", ".geojson", ".json", ".xml")
TRUTH_RULE = ("truth = mask grey > 127, area-averaged onto the prediction grid, then >= 0.5 "
              "(as h2g.systems.h2g.refinement.target_mask)")


# --------------------------------------------------------------------------------------
# The regions
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """One BCSS region: its image and tumour-mask JPEGs."""

    region_id: str
    image_path: Path
    mask_path: Path


def bcss_regions(real_data) -> list[Region]:
    """The BCSS regions under ``real_data`` (the real-data folder, or its ``bcss_roi``
    folder itself), sorted by id.  :class:`ConfigError` when the folder, its images or a
    mask are missing."""
    root = Path(real_data)
    if not root.is_dir():
        raise ConfigError(f"real-data folder {root} not found (give --real-data DIR or set H2G_REAL_DATA)")
    folder = root if (root / "images").is_dir() else root / BCSS_FOLDER
    images = sorted((folder / "images").glob("*.jpg"))
    if not images:
        raise ConfigError(f"{folder / 'images'}: no BCSS region images (*.jpg) found")
    regions = []
    for image in images:
        candidates = [folder / "masks" / image.name] + [folder / "masks" / (image.stem + s) for s in TRUTH_SUFFIXES]
        mask = next((c for c in candidates if c.is_file()), None)
        if mask is None:
            raise ConfigError(f"{candidates[0]}: the tumour mask of BCSS region {image.stem} is missing (or a "
                              f"{'/'.join(TRUTH_SUFFIXES)} annotation of the same name)")
        regions.append(Region(image.stem, image, mask))
    return regions


def load_image(path) -> np.ndarray:
    """A region's ``(h, w, 3)`` uint8 RGB pixels, as decoded from its JPEG."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_truth(path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A region's ``(h, w)`` boolean tumour mask: grey (ITU-R 601 luma; the BCSS masks are
    grey, R = G = B) > 127; or, for a polygon annotation (QuPath GeoJSON, ASAP / Aperio
    XML, level-0 pixels of the region, binary classes: tumour names are tumour), the
    pixels whose centre lies in a tumour polygon on the region's ``shape`` = (h, w)."""
    from h2g.io.polygons import sniff

    if sniff(path) is not None:
        if shape is None:
            raise ConfigError(f"{path}: a polygon annotation needs the region's size")
        from types import SimpleNamespace

        from h2g.io.annotation import load_annotation

        region = SimpleNamespace(dimensions=(int(shape[1]), int(shape[0])), path=Path(path))
        return np.asarray(load_annotation(path, region, downsample=1.0).mask, bool)
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L")) > GREY_THRESHOLD


def truth_on_grid(truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``truth`` (full resolution, boolean) on a ``shape`` = (rows, cols) grid spanning the
    same extent: area-averaged (box filter), then tumour where >= 0.5.  The identity when
    ``shape`` is the truth's own."""
    truth = np.asarray(truth, bool)
    if tuple(shape) == truth.shape:
        return truth.copy()
    rows, cols = (int(s) for s in shape)
    averaged = Image.fromarray(truth.astype(np.float32), mode="F").resize((cols, rows), Image.BOX)
    return np.asarray(averaged) >= 0.5


# --------------------------------------------------------------------------------------
# Regions as slides
# --------------------------------------------------------------------------------------
def write_region_slide(image: np.ndarray, path, mpp: float = BCSS_MPP) -> Path:
    """Write ``image`` as a pyramidal tiled TIFF that OpenSlide opens (generic-tiff) at
    ``mpp`` um/px: :func:`h2g.io.pyramid.write_pyramid` with lossless (zlib) tiles, so that
    level 0 holds exactly ``image``; reduced levels (x4, ...) are its box averages, like
    the cohort's slides."""
    from h2g.io.pyramid import write_pyramid

    return write_pyramid(path, np.ascontiguousarray(image, np.uint8), mpp=mpp, compression="zlib")


def open_region_slide(path, image: np.ndarray | None = None, mpp: float = BCSS_MPP, crop: int = 256):
    """Open a slide written by :func:`write_region_slide` as :class:`h2g.io.slide.Slide`
    and check it: its mpp reads back as ``mpp`` and (given ``image``) a ``crop`` px square
    of level 0 at the image's centre equals the image there.  :class:`H2GError` otherwise."""
    from h2g.io.slide import Slide

    slide = Slide(path)
    try:
        if not np.isclose(slide.mpp, mpp, rtol=1e-6):
            raise H2GError(f"{path}: written at {mpp} um/px but reads back as {slide.mpp} um/px")
        if image is not None:
            h, w = image.shape[:2]
            if slide.dimensions != (w, h):
                raise H2GError(f"{path}: level 0 is {slide.dimensions}, the image {w}x{h}")
            size = min(crop, w, h)
            x, y = (w - size) // 2, (h - size) // 2
            read = slide.read_region((x, y), (size, size), magnification=slide.objective_power)
            if not np.array_equal(read, image[y:y + size, x:x + size]):
                raise H2GError(f"{path}: level-0 pixels differ from the image's")
    except BaseException:
        slide.close()
        raise
    return slide


# --------------------------------------------------------------------------------------
# Predictions and scores
# --------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """What a predictor returns for one slide: the tumour probability on its grid (the
    refinement resolution for a run), and for the figure and diagnostics the image and
    heatmap it saw on the same grid (optional)."""

    prob: np.ndarray  # (rows, cols) tumour probability (or 0/1) over the slide's extent
    image: np.ndarray | None = None  # (rows, cols, 3) in [0, 1]
    heat: np.ndarray | None = None  # (rows, cols) patch heatmap on the same grid
    patches: int | None = None
    info: dict = field(default_factory=dict)


Predictor = Callable[[object], "Prediction | np.ndarray"]


def _as_prediction(out) -> Prediction:
    if isinstance(out, Prediction):
        return out
    return Prediction(prob=np.asarray(out, np.float32))


def score(prediction, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """Scores of ``prediction`` (a :class:`Prediction` or a probability array, on any grid
    spanning the region) against the full-resolution boolean ``truth``: Dice, recall and
    precision on the prediction's grid (:func:`truth_on_grid`), the predicted tumour share
    (``prob > threshold``), the true share at full resolution and on the grid, the Dice an
    all-tumour prediction would get (``2p / (1 + p)``, p the share on the grid: the
    reference a useful model must beat); with a heatmap, the Dice and share of the
    heatmap alone (the patch-wise design's prediction)."""
    prediction = _as_prediction(prediction)
    prob = np.asarray(prediction.prob)
    if prob.ndim != 2:
        raise ValueError(f"prediction must be a 2-D probability map, got shape {prob.shape}")
    grid_truth = truth_on_grid(truth, prob.shape)
    mask = binarise(prob, threshold)
    row = {
        "dice": None, "recall": None, "precision": None,  # keep the column order
        "pred_share": float(mask.mean()),
        "true_share": float(np.asarray(truth, bool).mean()),
        "true_share_grid": float(grid_truth.mean()),
        "grid": f"{prob.shape[0]}x{prob.shape[1]}",
    }
    row.update(segmentation_metrics(mask, grid_truth))
    share = row["true_share_grid"]  # reference: Dice of calling everything tumour, 2p / (1 + p)
    row["dice_all_tumour"] = 2 * share / (1 + share) if share else 0.0
    if prediction.heat is not None:
        heat_mask = binarise(np.asarray(prediction.heat), threshold)
        row["dice_heatmap"] = segmentation_metrics(heat_mask, truth_on_grid(truth, heat_mask.shape))["dice"]
        row["heatmap_share"] = float(heat_mask.mean())
    return row


@dataclass
class RegionResult:
    region: Region
    row: dict  # the scores and facts written to the CSV / JSON
    prediction: Prediction
    truth: np.ndarray  # full resolution
    thumbnail: np.ndarray  # (h, w, 3) uint8, small
    threshold: float = 0.5


def evaluate_region(region: Region, predictor: Predictor, slide_dir, *, threshold: float = 0.5,
                    mpp: float = BCSS_MPP, keep_slide: bool = False) -> RegionResult:
    """Write ``region`` as a slide under ``slide_dir``, open and check it
    (:func:`open_region_slide`), run ``predictor`` on it and :func:`score` the result.
    The slide file is deleted afterwards unless ``keep_slide``."""
    image = load_image(region.image_path)
    truth = load_truth(region.mask_path, image.shape[:2])
    if truth.shape != image.shape[:2]:
        raise ConfigError(f"{region.mask_path}: mask is {truth.shape[1]}x{truth.shape[0]}, "
                          f"its image {image.shape[1]}x{image.shape[0]}")
    path = Path(slide_dir) / f"bcss_{region.region_id}.tiff"
    write_region_slide(image, path, mpp=mpp)
    t0 = time.perf_counter()
    try:
        slide = open_region_slide(path, image, mpp=mpp)
        try:
            prediction = _as_prediction(predictor(slide))
            dimensions = slide.dimensions
        finally:
            slide.close()
    finally:
        if not keep_slide:
            path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    row = {"region": region.region_id, "width": dimensions[0], "height": dimensions[1], "mpp": mpp,
           **score(prediction, truth, threshold)}
    if prediction.patches is not None:
        row["patches"] = prediction.patches
    row["seconds"] = round(seconds, 3)
    scale = 256 / max(image.shape[:2])
    thumb = Image.fromarray(image).resize((max(1, round(image.shape[1] * scale)),
                                           max(1, round(image.shape[0] * scale))), Image.BOX)
    return RegionResult(region, row, prediction, truth, np.asarray(thumb), threshold)


def evaluate(regions: list[Region], predictor: Predictor, *, threshold: float = 0.5, slide_dir=None,
             progress: Callable[[RegionResult], None] | None = None) -> list[RegionResult]:
    """:func:`evaluate_region` for each region; slides go to a temporary folder (deleted)
    unless ``slide_dir`` is given (kept there).  ``progress`` is called after each."""
    results = []
    with tempfile.TemporaryDirectory(prefix="h2g-bcss-") as scratch:
        folder = Path(slide_dir) if slide_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for region in regions:
            results.append(evaluate_region(region, predictor, folder, threshold=threshold,
                                           keep_slide=slide_dir is not None))
            if progress is not None:
                progress(results[-1])
    return results


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------
def summary(results: list[RegionResult], **extra) -> dict:
    """The JSON document of an evaluation: per-region rows, mean Dice (and of the heatmap
    alone when there is one), the truth rule, and ``extra``."""
    rows = [r.row for r in results]
    out = {**extra, "truth_rule": TRUTH_RULE, "regions": rows,
           "mean_dice": float(np.mean([r["dice"] for r in rows])) if rows else None}
    if rows:
        out["mean_dice_all_tumour"] = float(np.mean([r["dice_all_tumour"] for r in rows]))
    if rows and all("dice_heatmap" in r for r in rows):
        out["mean_dice_heatmap"] = float(np.mean([r["dice_heatmap"] for r in rows]))
    return out


def write_csv(path, rows: list[dict]) -> Path:
    """``rows`` as CSV (columns in first-seen order), written atomically."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return write_text(path, buffer.getvalue())


def _panel(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A grid map shown at the region's aspect ratio (``size`` = (w, h))."""
    values = np.asarray(values, np.float32)
    return np.asarray(Image.fromarray(values, mode="F").resize(size, Image.BILINEAR))


def write_figure(path, results: list[RegionResult]) -> Path:
    """PNG, one row per region: image | truth | heatmap | prediction, each at the region's
    aspect ratio (256 px long side) - :func:`h2g.evaluation.figures.figure_grid`."""
    from h2g.core.atomic import replace_atomically
    from h2g.evaluation.figures import figure_grid

    rows = []
    for r in results:
        h, w = r.thumbnail.shape[:2]
        pred = binarise(np.asarray(r.prediction.prob), r.threshold)
        heat = None if r.prediction.heat is None else np.clip(_panel(r.prediction.heat, (w, h)), 0, 1)
        rows.append((f"{r.region.region_id}  Dice {r.row['dice']:.3f}", r.thumbnail,
                     _panel(r.truth, (w, h)) >= 0.5, heat, _panel(pred, (w, h)) >= 0.5))
    return replace_atomically(path, lambda tmp: figure_grid(tmp, rows))


def write_outputs(out_dir, results: list[RegionResult], **extra) -> dict[str, Path]:
    """``real_bcss.csv``, ``real_bcss.json`` and ``real_bcss.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "real_bcss.csv", "json": out / "real_bcss.json", "figure": out / "real_bcss.png"}
    write_csv(paths["csv"], [r.row for r in results])
    write_json(paths["json"], summary(results, **extra))
    write_figure(paths["figure"], results)
    return paths


def format_table(results: list[RegionResult]) -> str:
    """The per-region figures and the mean Dice as a small text table."""
    heat = all("dice_heatmap" in r.row for r in results)
    head = (f"{'region':<8} {'size':>10} {'dice':>6} {'recall':>7} {'precision':>9} {'pred %':>7} {'true %':>7}"
            f" {'all-tumour dice':>15}")
    head += f" {'heatmap dice':>12} {'heatmap %':>9}" if heat else ""
    lines = [head]
    for r in results:
        row = r.row
        line = (f"{row['region']:<8} {row['width']:>5}x{row['height']:<4} {row['dice']:>6.3f} {row['recall']:>7.3f} "
                f"{row['precision']:>9.3f} {100 * row['pred_share']:>7.1f} {100 * row['true_share']:>7.1f}"
                f" {row['dice_all_tumour']:>15.3f}")
        if heat:
            line += f" {row['dice_heatmap']:>12.3f} {100 * row['heatmap_share']:>9.1f}"
        lines.append(line)
    s = summary(results)
    tail = f"{'mean':<8} {'':>10} {s['mean_dice']:>6.3f} {'':>7} {'':>9} {'':>7} {'':>7} {s['mean_dice_all_tumour']:>15.3f}"
    if heat:
        tail += f" {s['mean_dice_heatmap']:>12.3f}"
    lines.append(tail)
    return "\n".join(lines)
