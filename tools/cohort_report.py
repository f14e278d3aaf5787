#!/usr/bin/env python
"""Contact sheet and class statistics of the synthetic cohort against real Camelyon16 patches.

    python tools/cohort_report.py                                  # smoke, seed 0, into docs/cohort
    python tools/cohort_report.py --preset tiny --slides 2 --out /tmp/report
    python tools/cohort_report.py --seed 3 --real-data /data/real --quiet

Writes into ``--out``:

- ``contact_sheet.png``: thumbnails of the first ``--slides`` slides beside their region
  maps (coloured by :data:`h2g.data.cohort.REGION_NAMES`, with a legend); for every region
  kind of the preset, 256 x 256 crops at 40x, 20x, 10x and 5x centred on one point of a
  window of that kind; real Camelyon16 tumour and normal patches beside synthetic 40x
  crops of invasive tumour and of stroma / normal lobule at the same scale.
- ``colour_nuclei.png``: RGB histograms of tissue pixels and nucleus sizes (equivalent
  diameter, um) of synthetic invasive / non-tumour crops against real tumour / normal
  patches, and nucleus densities.
- ``cohort_stats.csv`` / ``cohort_stats.json``: per region kind (and per real class) its
  share of the slides and tissue, mean RGB, nucleus density per 1000 um^2 and nucleus
  diameter median / quartiles.  The JSON adds the crop positions, the group statistics
  of the plots and the method's parameters.

How things are chosen and measured (everything is deterministic for a preset and seed):
the windows of each region kind by :mod:`h2g.evaluation.cohort_windows`, the nuclei by
:mod:`h2g.evaluation.nuclei` (colour deconvolution, Otsu on haematoxylin), the statistics
by :mod:`h2g.evaluation.cohort_stats`; this tool draws them.

Slides are never written: every pixel comes from ``SlideRenderer.render``.  A thumbnail is
the slide rendered at level 0 in strips and box-averaged; above :data:`RENDER_BUDGET`
level-0 pixels only a band of rows per thumbnail row is rendered.  When the preset's
cohort is on disk (``data_manifest.csv`` in ``--cohort-dir``: the repository for smoke,
``cohort/<preset>`` otherwise) and a rendered probe matches its pixels (the files are of
this seed), the thumbnail is read from the slide's pyramid instead.

The sheet is a lossless PNG unless that exceeds :data:`MAX_SHEET_BYTES`; then it is saved
with 256 colours (:func:`to_palette`; the statistics never come from the sheet).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError, H2GError
from h2g.data import cohort
from h2g.evaluation.cohort_stats import (NON_TUMOUR_KINDS, TUMOUR_KIND, Sample, group_summary, groups,
                                         load_real, measure_kind, method_parameters, stats_rows, write_csv)
from h2g.evaluation.cohort_windows import (CROP, FALLBACK_PURITY, MAGNIFICATIONS, NOT_TISSUE, PURITY, STATS_CROPS,
                                           CropCache, SlideView, best_window, kind_area_shares, kind_names,
                                           open_slides, render_clipped)
from h2g.evaluation.nuclei import Nuclei

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = Path(os.environ.get("H2G_REAL_DATA", REPO.parent / "shared" / "data" / "real"))

SHOW_REAL = 4           # real patches (and synthetic crops) shown per class
THUMB = 230             # longest side of a slide thumbnail (px)
RENDER_BUDGET = 32_000_000   # level-0 px a thumbnail renders in full; beyond, bands only
BAND_ROWS = 8           # level-0 rows rendered per thumbnail row beyond the budget
STRIP_ROWS = 1024       # about this many level-0 rows per render call in full mode
PROBE_TOLERANCE = 12.0  # mean |rendered - on-disk| grey levels for a slide file to be this seed's

# Colours of the region kinds; a kind not listed gets one from matplotlib's tab20.
KIND_COLOURS = {
    "glass": (232, 232, 232), "stroma": (240, 150, 200), "inflamed_stroma": (150, 70, 200),
    "fat": (245, 215, 40), "normal_lobule": (0, 160, 80), "invasive": (200, 0, 0),
    "dcis": (255, 130, 0), "adenosis": (0, 190, 235), "lymphoid": (40, 60, 190),
    "sclerosing": (150, 100, 50),
}

MAX_SHEET_BYTES = 5_000_000

GAP = 8                 # px between images
MARGIN = 24             # px around blocks
BLOCK = len(MAGNIFICATIONS) * CROP + (len(MAGNIFICATIONS) - 1) * GAP  # four crops in a row
SHEET_WIDTH = 2 * BLOCK + 3 * MARGIN


# ---------------------------------------------------------------------------- colours

def kind_colour(name: str) -> tuple[int, int, int]:
    """Display colour of region kind ``name``."""
    if name in KIND_COLOURS:
        return KIND_COLOURS[name]
    from matplotlib import colormaps

    index = kind_names().index(name) if name in kind_names() else zlib.crc32(name.encode())
    rgba = colormaps["tab20"](index % 20)
    return tuple(int(round(255 * c)) for c in rgba[:3])


# ------------------------------------------------------------------------------ thumbnails

def thumbnail_factor(size: tuple[int, int], longest: int = THUMB) -> int:
    """Level-0 px per thumbnail px so that the longest side is at most ``longest``."""
    return max(1, math.ceil(max(size) / longest))


def thumbnail_shape(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(rows, cols) of the thumbnail of a slide of ``size`` at ``factor``."""
    return -(-size[1] // factor), -(-size[0] // factor)


def thumbnail_units(size: tuple[int, int], factor: int) -> int:
    """Render calls :func:`rendered_thumbnail` makes (for the progress bar)."""
    rows, _ = thumbnail_shape(size, factor)
    if size[0] * size[1] > RENDER_BUDGET:
        return rows
    per_call = max(1, STRIP_ROWS // factor)
    return -(-rows // per_call)


def rendered_thumbnail(renderer, size: tuple[int, int], factor: int, progress=None) -> np.ndarray:
    """The slide's thumbnail from level-0 renders: all of it box-averaged by ``factor``
    when it has at most :data:`RENDER_BUDGET` px, else a band of :data:`BAND_ROWS` rows
    through the middle of each thumbnail row, averaged over its columns."""
    rows, cols = thumbnail_shape(size, factor)
    width = cols * factor
    out = np.empty((rows, cols, 3), np.uint8)
    if size[0] * size[1] <= RENDER_BUDGET:
        per_call = max(1, STRIP_ROWS // factor)
        for first in range(0, rows, per_call):
            count = min(per_call, rows - first)
            strip = render_clipped(renderer, 0, first * factor, width, count * factor)
            out[first:first + count] = np.asarray(Image.fromarray(strip).reduce(factor))
            if progress:
                progress(1)
        return out
    band = min(BAND_ROWS, factor)
    for row in range(rows):
        top = row * factor + (factor - band) // 2
        strip = render_clipped(renderer, 0, top, width, band).astype(np.float32)
        out[row] = np.round(strip.reshape(band, cols, factor, 3).mean(axis=(0, 2))).astype(np.uint8)
        if progress:
            progress(1)
    return out


def region_thumbnail(renderer, size: tuple[int, int], factor: int) -> np.ndarray:
    """The slide's region map at thumbnail resolution, uint8 kind indices."""
    return renderer.regions(cohort.Grid(0, 0, thumbnail_shape(size, factor), factor))


def colour_regions(regions: np.ndarray) -> np.ndarray:
    """RGB image of a region map (:func:`kind_colour` per kind)."""
    palette = np.array([kind_colour(name) for name in kind_names()], np.uint8)
    return palette[np.minimum(regions, len(palette) - 1)]


def cohort_on_disk(preset: str, folder: Path | None) -> Path | None:
    """The folder of the preset's cohort files when its manifest is there and is
    exactly the preset's (:func:`cohort.manifest_text`), else None."""
    if folder is None:
        return None
    manifest = folder / cohort.MANIFEST_NAME
    try:
        return folder if manifest.read_text() == cohort.manifest_text(preset) else None
    except (OSError, UnicodeDecodeError):
        return None


def default_cohort_dir(preset: str) -> Path:
    """Where ``tools/make_cohort.py`` writes a preset's cohort by default."""
    return REPO if preset == "smoke" else REPO / "cohort" / preset


def disk_thumbnail(path: Path, view: SlideView, factor: int) -> np.ndarray | None:
    """The thumbnail read from the slide file's pyramid (the finest level no finer than
    needed, box-resized), or None when the file is unreadable or is not of this seed (a
    rendered 40x probe on tissue differs from the file by more than
    :data:`PROBE_TOLERANCE` grey levels on average)."""
    from h2g.io.slide import Slide

    if not path.is_file():
        return None
    try:
        with Slide(path) as slide:
            if tuple(slide.dimensions) != view.size:
                return None
            probe = best_window(view, kind_names().index(TUMOUR_KIND), CROP, CROP)
            if probe is not None:
                _, cx, cy = probe
                on_disk = slide.read_region((cx - CROP // 2, cy - CROP // 2), (CROP, CROP), 40)
                rendered = view.renderer.render(cx - CROP // 2, cy - CROP // 2, CROP, CROP)
                if np.abs(on_disk.astype(np.float32) - rendered).mean() > PROBE_TOLERANCE:
                    return None
            level = slide.best_level_for(factor)
            image = slide.read_level(level)
    except H2GError:
        return None
    rows, cols = thumbnail_shape(view.size, factor)
    scale = factor / slide.level_downsamples[level]
    height, width = image.shape[:2]  # the thumbnail covers whole factor-px cells, the last partly
    box = (0, 0, min(cols * scale, width), min(rows * scale, height))
    return np.asarray(Image.fromarray(image).resize((cols, rows), Image.BOX, box=box))


# ---------------------------------------------------------------------------- drawing

@functools.lru_cache(maxsize=16)
def font(size: int, mono: bool = False):
    """DejaVu Sans (Mono) as shipped with matplotlib at ``size`` px; PIL's default
    otherwise."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans Mono" if mono else "DejaVu Sans"), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def text_image(lines, width: int, size: int = 18, colour=(20, 20, 20), mono: bool = False) -> Image.Image:
    """White strip of ``width`` px with ``lines`` of text."""
    lines = [lines] if isinstance(lines, str) else list(lines)
    height = (size + 6) * len(lines) + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((0, 2 + i * (size + 6)), line, fill=colour, font=font(size, mono))
    return image


def labelled(image: np.ndarray | Image.Image, label: str, size: int = 14) -> Image.Image:
    """An image with a one-line caption above it."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    caption = text_image(label, image.width, size)
    out = Image.new("RGB", (image.width, caption.height + image.height), "white")
    out.paste(caption, (0, 0))
    out.paste(image, (0, caption.height))
    return out


def row_of(images: list[Image.Image], gap: int = GAP) -> Image.Image:
    """Images side by side, tops aligned."""
    width = sum(i.width for i in images) + gap * max(0, len(images) - 1)
    height = max((i.height for i in images), default=1)
    out = Image.new("RGB", (max(1, width), height), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width + gap
    return out


def flow(cells: list[Image.Image], width: int, gap: int = MARGIN) -> Image.Image:
    """Cells left to right, wrapping into rows at ``width`` px."""
    rows, current, used = [], [], 0
    for cell in cells:
        if current and used + gap + cell.width > width:
            rows.append(row_of(current, gap))
            current, used = [], 0
        used += cell.width + (gap if current else 0)
        current.append(cell)
    if current:
        rows.append(row_of(current, gap))
    return column_of(rows, GAP)


def column_of(images: list[Image.Image], gap: int = MARGIN, width: int | None = None) -> Image.Image:
    """Images one below the other, left aligned, on a white sheet."""
    width = width or max((i.width for i in images), default=1)
    height = sum(i.height for i in images) + gap * max(0, len(images) - 1)
    out = Image.new("RGB", (width, max(1, height)), "white")
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height + gap
    return out


def legend(width: int, present: set[str]) -> Image.Image:
    """Colour boxes with the names of every region kind (those absent marked)."""
    cells = []
    for name in kind_names():
        cell = Image.new("RGB", (22 + 10 * len(name) + 90, 24), "white")
        draw = ImageDraw.Draw(cell)
        draw.rectangle((0, 3, 17, 20), fill=kind_colour(name), outline=(90, 90, 90))
        draw.text((24, 2), name + ("" if name in present else " (absent)"), fill=(20, 20, 20), font=font(16))
        cells.append(cell)
    return flow(cells, width, gap=16)


# ------------------------------------------------------------------------------ the report

class Report(NamedTuple):
    """Everything the sheet, plots and tables are drawn from."""

    preset: str
    seed: int
    views: list
    shown: list                      # (view, thumbnail, region thumbnail, source)
    crops: dict                      # kind -> (Window, [images per magnification]) or None
    samples: dict                    # kind -> Sample (40x statistics crops)
    real: dict                       # class -> Sample
    real_note: str | None
    shares: dict


def build_report(preset: str, seed: int, count: int, real_data: Path, cohort_dir: Path | None,
                 progress: bool = True) -> Report:
    """Render the thumbnails, find the windows (vetoing any under pen ink), render the
    crops, load and measure the real patches."""
    views = open_slides(preset, seed)
    shares = kind_area_shares(views)
    present = [k for k in kind_names() if shares[k][0] > 0]
    real, real_note = load_real(real_data)
    shown_views = views[:count]
    disk = cohort_on_disk(preset, cohort_dir)
    factors = [thumbnail_factor(v.size) for v in shown_views]
    estimate = (sum(thumbnail_units(v.size, f) for v, f in zip(shown_views, factors))
                + len(present) * (len(MAGNIFICATIONS) + STATS_CROPS) + sum(len(s.images) for s in real.values()))
    with tqdm(total=estimate, desc=f"report {preset}", unit="render", disable=not progress) as bar:
        shown = []
        for view, factor in zip(shown_views, factors):
            thumb = disk_thumbnail(disk / view.spec.slide_path, view, factor) if disk else None
            source = "slide file"
            if thumb is None:
                thumb, source = rendered_thumbnail(view.renderer, view.size, factor, bar.update), "rendered"
            else:
                bar.update(thumbnail_units(view.size, factor))
            shown.append((view, thumb, region_thumbnail(view.renderer, view.size, factor), source))
        cache = CropCache(views, bar.update)
        crops, samples = {}, {}
        for kind in present:
            crops[kind], samples[kind] = measure_kind(views, kind, cache)
        for sample in real.values():  # measured now so the bar covers the slow part
            _ = sample.nuclei
            bar.update(len(sample.images))
        bar.total = bar.n
        bar.refresh()
    return Report(preset, seed, views, shown, crops, samples, real, real_note, shares)


def real_shown(sample: Sample, count: int = SHOW_REAL) -> list[np.ndarray]:
    """``count`` evenly spaced patches of a real class (file-name order)."""
    n = len(sample.images)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(count, n))})
    return [sample.images[i] for i in picks]


def synthetic_side(report: Report, kinds, count: int = SHOW_REAL) -> list[np.ndarray]:
    """``count`` synthetic 40x crops of ``kinds`` (statistics crops, interleaving kinds)."""
    pools = [report.samples[k].images for k in kinds if k in report.samples and report.samples[k].images]
    out = []
    for i in range(count):
        for pool in pools:
            if len(out) < count and i < len(pool):
                out.append(pool[i])
    return out


def sheet_thumbnails(report: Report) -> Image.Image:
    """Section 1: thumbnails beside region maps, and the legend."""
    cells = []
    for view, thumb, regions, source in report.shown:
        spec = view.spec
        pair = row_of([Image.fromarray(thumb), Image.fromarray(colour_regions(regions))], GAP)
        cells.append(labelled(pair, f"{spec.slide_id}  grade {spec.grade}  {spec.split}  "
                                    f"{view.size[0]}x{view.size[1]} px  ({source})"))
    present = {k for k, (area, _) in report.shares.items() if area > 0}
    title = text_image(f"Slides (first {len(report.shown)} of {len(report.views)}): image | region map",
                       SHEET_WIDTH - 2 * MARGIN, 22)
    return column_of([title, flow(cells, SHEET_WIDTH - 2 * MARGIN), legend(SHEET_WIDTH - 2 * MARGIN, present)], GAP)


def sheet_kinds(report: Report) -> Image.Image:
    """Section 2: per region kind, crops at 40x, 20x, 10x and 5x on one centre."""
    blocks, missing = [], []
    for kind, found in report.crops.items():
        if found is None:
            missing.append(kind)
            continue
        window, images = found
        view = report.views[window.slide]
        share = f"{100 * window.share:.0f}% of the 20x field"
        if not window.pure:
            share += f" (best found; < {100 * PURITY:.0f}%)"
        crops = [labelled(image, f"{power}x  {CROP * ds * cohort.MPP:.0f} um")
                 for image, (power, ds) in zip(images, MAGNIFICATIONS)]
        head = text_image(f"{kind}: {view.spec.slide_id} (grade {view.spec.grade}) at "
                          f"({window.cx}, {window.cy}), {share}", BLOCK, 17, kind_colour_text(kind))
        blocks.append(column_of([head, row_of(crops)], 2))
    parts = [text_image("Region kinds: the same centre at 40x, 20x, 10x, 5x (256 px each, area-averaged)",
                        SHEET_WIDTH - 2 * MARGIN, 22)]
    if missing:
        parts.append(text_image(f"not found (no 20x field >= {100 * FALLBACK_PURITY:.0f}% of the kind "
                                f"in {len(report.views)} slides): {', '.join(missing)}",
                                SHEET_WIDTH - 2 * MARGIN, 17, (170, 0, 0)))
    parts.append(flow(blocks, SHEET_WIDTH - 2 * MARGIN, MARGIN))
    return column_of(parts, GAP)


def kind_colour_text(kind: str) -> tuple[int, int, int]:
    """The kind's colour darkened enough to read as text on white."""
    return tuple(int(c * 0.6) for c in kind_colour(kind))


def sheet_real(report: Report) -> Image.Image:
    """Section 3: real Camelyon16 patches above synthetic 40x crops at the same scale."""
    width = SHEET_WIDTH - 2 * MARGIN
    title = text_image("Real Camelyon16 (40x, 0.243 um/px) vs synthetic (40x, 0.25 um/px): "
                       "64 um fields", width, 22)
    if not report.real:
        return column_of([title, text_image(report.real_note or "no real data", width, 18, (170, 0, 0))], GAP)
    columns = []
    for real_name, label, kinds, synthetic_label in (
            ("tumor", "real tumour (lymph-node metastasis)", (TUMOUR_KIND,), "synthetic invasive"),
            ("normal", "real normal (lymph node)", NON_TUMOUR_KINDS, "synthetic " + " / ".join(NON_TUMOUR_KINDS))):
        rows = []
        if real_name in report.real:
            rows.append(labelled(row_of([Image.fromarray(i) for i in real_shown(report.real[real_name])]), label, 16))
        synthetic = synthetic_side(report, kinds)
        if synthetic:
            rows.append(labelled(row_of([Image.fromarray(i) for i in synthetic]), synthetic_label, 16))
        if rows:
            columns.append(column_of(rows, GAP, BLOCK))
    parts = [title]
    if report.real_note:
        parts.append(text_image(report.real_note, width, 16, (170, 0, 0)))
    parts.append(row_of(columns, MARGIN))
    return column_of(parts, GAP)


def sheet_summary(rows: list[dict]) -> Image.Image:
    """Section 4: a few numbers from cohort_stats.csv."""
    lines = ["Statistics (cohort_stats.csv): mean RGB of measured pixels; nuclei per 1000 um^2 tissue; "
             "nucleus diameter median [IQR] um"]
    for row in rows:
        rgb = "-" if row["mean_r"] is None else f"({row['mean_r']:.0f}, {row['mean_g']:.0f}, {row['mean_b']:.0f})"
        dens = "-" if row["nuclei_per_1000um2"] is None else f"{row['nuclei_per_1000um2']:.1f}"
        diam = ("-" if row["diameter_median_um"] is None else
                f"{row['diameter_median_um']:.1f} [{row['diameter_q1_um']:.1f}-{row['diameter_q3_um']:.1f}]")
        share = "" if row["tissue_share"] is None else f"{100 * row['tissue_share']:.1f}% of tissue"
        lines.append(f"  {row['source']:<16} {row['name']:<16} {share:<15} {row['crops']:>3} crops  RGB {rgb:<16} "
                     f"{dens:>5} nuclei  diameter {diam}")
    return text_image(lines, SHEET_WIDTH - 2 * MARGIN, 15, mono=True)


def contact_sheet(report: Report, rows: list[dict]) -> Image.Image:
    """The whole contact sheet."""
    head = text_image(f"Synthetic cohort '{report.preset}', seed {report.seed}: {len(report.views)} slides, "
                      f"level 0 = 40x ({cohort.MPP} um/px)", SHEET_WIDTH - 2 * MARGIN, 26)
    body = column_of([head, sheet_thumbnails(report), sheet_kinds(report), sheet_real(report),
                      sheet_summary(rows)], MARGIN + 8)
    out = Image.new("RGB", (SHEET_WIDTH, body.height + 2 * MARGIN), "white")
    out.paste(body, (MARGIN, MARGIN))
    return out


def save_sheet(sheet: Image.Image, path: Path, limit: int = MAX_SHEET_BYTES) -> bool:
    """Save the sheet as PNG, as a 256-colour one (:func:`to_palette`) when the lossless
    file would exceed ``limit`` bytes; returns whether it was reduced to a palette."""
    import io

    buffer = io.BytesIO()
    sheet.save(buffer, "PNG")
    reduced = buffer.tell() > limit
    if reduced:
        buffer = io.BytesIO()
        to_palette(sheet).save(buffer, "PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return reduced


def to_palette(sheet: Image.Image, chunk: int = 8192) -> Image.Image:
    """The sheet with 256 colours: the kinds' colours, black and white exactly, the rest
    from a median-cut palette; every colour mapped to its nearest palette entry (no
    dithering, so text and region maps stay crisp)."""
    fixed = list(dict.fromkeys([kind_colour(n) for n in kind_names()] + [(0, 0, 0), (255, 255, 255)]))[:64]
    adaptive = sheet.quantize(256 - len(fixed), method=Image.Quantize.MEDIANCUT).getpalette()
    adaptive = np.asarray(adaptive[:3 * (256 - len(fixed))], np.int32).reshape(-1, 3)
    palette = np.concatenate([np.asarray(fixed, np.int32), adaptive])
    rgb = np.asarray(sheet.convert("RGB")).astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    unique, inverse = np.unique(packed.ravel(), return_inverse=True)
    colours = np.stack([unique >> 16, (unique >> 8) & 255, unique & 255], axis=1)
    nearest = np.empty(len(unique), np.uint8)
    for first in range(0, len(unique), chunk):
        part = colours[first:first + chunk, None, :] - palette[None, :, :]
        nearest[first:first + chunk] = np.einsum("ijk,ijk->ij", part, part).argmin(axis=1)
    out = Image.fromarray(nearest[inverse].reshape(packed.shape), "P")
    out.putpalette(palette.astype(np.uint8).ravel().tolist())
    return out


def plot_colour_nuclei(report: Report, measured: dict[str, Nuclei], path: Path) -> None:
    """colour_nuclei.png: RGB histograms of tissue pixels, nucleus diameter histograms
    and nucleus densities of the four groups (and densities of every synthetic kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"synthetic invasive": ("#c00000", "-"), "real tumour": ("#600000", "--"),
              "synthetic non-tumour": ("#0060c0", "-"), "real normal": ("#002a60", "--")}
    group = groups(report.samples, report.real)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), dpi=100)
    bins = np.arange(0, 257, 4)
    for c, (ax, channel) in enumerate(zip(axes[0], ("red", "green", "blue"))):
        for name, sample in group.items():
            pixels = sample.tissue_pixels()
            if len(pixels):
                colour, line = styles[name]
                ax.hist(pixels[:, c], bins=bins, density=True, histtype="step", color=colour,
                        linestyle=line, linewidth=1.6, label=f"{name} ({len(sample.images)})")
        ax.set_title(f"{channel} channel, tissue pixels")
        ax.set_xlabel("value")
        ax.set_xlim(0, 255)
    axes[0][0].legend(fontsize=9)
    dbins = np.arange(0, 20.5, 0.5)
    for ax, names, title in ((axes[1][0], ("synthetic invasive", "real tumour"), "tumour"),
                             (axes[1][1], ("synthetic non-tumour", "real normal"), "non-tumour")):
        for name in names:
            if name in measured and measured[name].diameters.size:
                nuc = measured[name]
                colour, line = styles[name]
                ax.hist(np.clip(nuc.diameters, 0, 20), bins=dbins, density=True, histtype="step",
                        color=colour, linestyle=line, linewidth=1.6,
                        label=f"{name}: median {np.median(nuc.diameters):.1f} um, n={nuc.diameters.size}")
        ax.set_title(f"nucleus equivalent diameter, {title}")
        ax.set_xlabel("um (clipped at 20)")
        ax.legend(fontsize=9)
    ax = axes[1][2]
    labels, values, colours = [], [], []
    for name, nuc in measured.items():
        labels.append(name)
        values.append(nuc.density or 0.0)
        colours.append(styles.get(name, ("#888888", "-"))[0])
    for kind, sample in report.samples.items():
        if sample.images and kind != NOT_TISSUE:
            labels.append(f"kind: {kind}")
            values.append(sample.nuclei.density or 0.0)
            colours.append("#%02x%02x%02x" % kind_colour(kind))
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("nuclei per 1000 um^2 of tissue")
    ax.set_title("nucleus density")
    note = "" if report.real else f" - {report.real_note}"
    fig.suptitle(f"Synthetic '{report.preset}' seed {report.seed} vs real Camelyon16 patches (40x){note}",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- outputs

def stats_json(report: Report, rows: list[dict], measured: dict[str, Nuclei], real_data: Path) -> dict:
    """cohort_stats.json: the rows plus slides, windows, group statistics and method."""
    windows = {}
    for kind, found in report.crops.items():
        windows[kind] = {"display": None if found is None else found[0].as_dict(report.views),
                         "stats": [w.as_dict(report.views) for w in report.samples[kind].windows]}
    group_stats = {name: group_summary(sample, measured[name])
                   for name, sample in groups(report.samples, report.real).items()}
    return {
        "preset": report.preset, "seed": report.seed,
        "slides": [{"slide_id": v.spec.slide_id, "grade": v.spec.grade, "split": v.spec.split,
                    "size": list(v.size), "region_step_px": v.step} for v in report.views],
        "shown": [{"slide_id": v.spec.slide_id, "thumbnail": source} for v, _, _, source in report.shown],
        "region_names": list(kind_names()),
        "real_data": str(real_data), "real_data_used": bool(report.real), "real_note": report.real_note,
        "rows": rows, "windows": windows, "groups": group_stats,
        "not_found": [k for k, found in report.crops.items() if found is None],
        "method": method_parameters(),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(parser)
    parser.add_argument("--preset", default="smoke", help=f"cohort preset: {', '.join(cohort.PRESETS)} (default smoke)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "cohort",
                        help="output folder (default docs/cohort)")
    parser.add_argument("--real-data", type=Path, default=DEFAULT_REAL_DATA,
                        help="real data folder with camelyon16_patches/{tumor,normal}/*.png "
                             "(default $H2G_REAL_DATA or ../shared/data/real); absent: omitted")
    parser.add_argument("--slides", type=int, default=6, help="slides shown as thumbnails (default 6)")
    parser.add_argument("--cohort-dir", type=Path, default=None,
                        help="folder of the preset's data_manifest.csv, to read thumbnails from its "
                             "slide files (default: where tools/make_cohort.py writes it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def check_args(args) -> None:
    """ConfigError (one line) for a bad option."""
    cohort.get_preset(args.preset)  # names the presets when unknown
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.slides < 1:
        raise ConfigError(f"--slides must be >= 1, got {args.slides}")
    if args.real_data.exists() and not args.real_data.is_dir():
        raise ConfigError(f"--real-data {args.real_data} is not a folder")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot create the folder ({exc.strerror})") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    start = time.perf_counter()
    cohort_dir = args.cohort_dir if args.cohort_dir is not None else default_cohort_dir(args.preset)
    report = build_report(args.preset, args.seed, args.slides, args.real_data, cohort_dir,
                          progress=not args.quiet)
    rows = stats_rows(report.shares, report.samples, report.real)
    measured = {name: sample.nuclei for name, sample in groups(report.samples, report.real).items()}
    out = args.out
    sheet = contact_sheet(report, rows)
    paths = {"contact_sheet": out / "contact_sheet.png", "colour_nuclei": out / "colour_nuclei.png",
             "csv": out / "cohort_stats.csv", "json": out / "cohort_stats.json"}
    if save_sheet(sheet, paths["contact_sheet"]):
        print(f"contact sheet saved with a 256-colour palette (lossless > {MAX_SHEET_BYTES / 1e6:.0f} MB)")
    plot_colour_nuclei(report, measured, paths["colour_nuclei"])
    write_csv(paths["csv"], rows)
    paths["json"].write_text(json.dumps(stats_json(report, rows, measured, args.real_data), indent=1) + "\n")
    if report.real_note:
        print(report.real_note)
    print(f"contact sheet {sheet.width}x{sheet.height} px")
    for path in paths.values():
        print(f"wrote {path}")
    print(f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
