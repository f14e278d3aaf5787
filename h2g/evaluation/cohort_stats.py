"""The synthetic cohort's region kinds measured against real Camelyon16 patches: colour
and nuclei of 40x crops, per region kind and per real class (cohort_stats.csv / .json of
``tools/cohort_report.py``).

A region kind is measured on its statistics windows
(:func:`h2g.evaluation.cohort_windows.stats_windows`), on the pixels of that kind only; a
real class on every patch of its folder (:func:`load_real`), whole.  Nuclei by
:func:`h2g.evaluation.nuclei.measure_nuclei`, the same method on both.  The plots' four
groups (:func:`groups`) compare synthetic invasive tumour and non-tumour
(:data:`NON_TUMOUR_KINDS`) 40x crops, measured whole, with the real tumour and normal
patches.  TensorFlow-free.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from h2g.core.errors import ConfigError
from h2g.data import cohort
from h2g.data.stain import BETA
from h2g.evaluation.cohort_windows import (CROP, FALLBACK_PURITY, MAGNIFICATIONS, PURITY, PURITY_WINDOW,
                                           STATS_CROPS, STATS_PURITY, CropCache, SlideView, Window,
                                           crop_kind_mask, find_window, kind_names, stats_windows)
from h2g.evaluation.nuclei import (H_FULL_SCALE, MIN_NUCLEUS_OD, MIN_NUCLEUS_UM2, SMOOTH_PX, Nuclei, measure_nuclei,
                                   rounded, tissue_mask)

REAL_PATCHES = "camelyon16_patches"
REAL_CLASSES = ("tumor", "normal")      # folders under REAL_PATCHES
REAL_MPP = 0.243                         # um/px of the Camelyon16 patches (level 0, 40x)
TUMOUR_KIND = "invasive"
NON_TUMOUR_KINDS = ("stroma", "normal_lobule")  # the synthetic counterpart of real "normal"


@dataclass
class Sample:
    """Images of one kind or class with what is measured on them: ``images`` (for the
    sheet and histograms), ``areas`` (the pixels measured; None = all), ``um_per_px``."""

    name: str
    source: str
    um_per_px: float
    images: list = field(default_factory=list)
    areas: list = field(default_factory=list)
    windows: list = field(default_factory=list)

    @functools.cached_property
    def nuclei(self) -> Nuclei:
        """Nuclei pooled over the images (each on its own measured area)."""
        total = Nuclei()
        for image, area in zip(self.images, self.areas):
            total = total + measure_nuclei(image, self.um_per_px, area)
        return total

    def mean_rgb(self) -> list | None:
        """Mean RGB over the measured pixels of every image."""
        sums, count = np.zeros(3), 0
        for image, area in zip(self.images, self.areas):
            pixels = image.reshape(-1, 3) if area is None else image[area]
            sums += pixels.astype(np.float64).sum(axis=0)
            count += len(pixels)
        return [round(v, 1) for v in sums / count] if count else None

    def tissue_pixels(self) -> np.ndarray:
        """RGB ``(N, 3)`` of the tissue pixels (within the measured areas)."""
        parts = [image[tissue_mask(image) & (np.ones(image.shape[:2], bool) if area is None else area)]
                 for image, area in zip(self.images, self.areas)]
        return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)


def load_real(folder: Path) -> tuple[dict[str, Sample], str | None]:
    """The real Camelyon16 patches per class (RGBA composited on white), and a note when
    the folder or a class is missing.  An unreadable PNG is a ConfigError."""
    root = folder / REAL_PATCHES
    if not folder.exists():
        return {}, f"real data folder {folder} is absent: real comparison omitted"
    if not folder.is_dir():
        raise ConfigError(f"--real-data {folder} is not a folder")
    samples, missing = {}, []
    for name in REAL_CLASSES:
        files = sorted((root / name).glob("*.png"))
        if not files:
            missing.append(str(root / name))
            continue
        sample = Sample(name, "real_camelyon16", REAL_MPP)
        for path in files:
            sample.images.append(read_png(path))
            sample.areas.append(None)
            sample.windows.append(path.name)
        samples[name] = sample
    note = f"no real patches in {', '.join(missing)}" if missing else None
    return samples, note


def read_png(path: Path) -> np.ndarray:
    """An RGB(A) image as RGB uint8, transparency composited on white."""
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the image ({exc})") from None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))



def sample_row(sample: Sample, share: tuple[float, float | None] | None) -> dict:
    """One row of cohort_stats.csv."""
    rgb = sample.mean_rgb()
    row = {"source": sample.source, "name": sample.name, "crops": len(sample.images),
           "um_per_px": sample.um_per_px,
           "area_share": rounded(share[0], 4) if share else None,
           "tissue_share": rounded(share[1], 4) if share else None,
           "mean_r": rgb[0] if rgb else None, "mean_g": rgb[1] if rgb else None,
           "mean_b": rgb[2] if rgb else None}
    row.update(sample.nuclei.summary() if sample.images else Nuclei().summary() | {"nuclei": None})
    return row


CSV_COLUMNS = ("source", "name", "crops", "um_per_px", "area_share", "tissue_share",
               "mean_r", "mean_g", "mean_b", "nuclei", "nuclei_per_1000um2",
               "diameter_median_um", "diameter_q1_um", "diameter_q3_um", "diameter_iqr_um",
               "threshold_od_median")


def write_csv(path: Path, rows: list[dict]) -> None:
    """cohort_stats.csv (empty cells for missing values)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})



def measure_kind(views: list[SlideView], kind: str,
                 cache: CropCache) -> tuple[tuple[Window, list[np.ndarray]] | None, Sample]:
    """Region kind ``kind``: its display window (:func:`find_window`, vetoed when its 20x
    crop has pen ink) with its crops at every one of :data:`MAGNIFICATIONS`, or None when
    not found; and its 40x statistics crops (:func:`stats_windows`, vetoed when the crop
    has pen ink), each measured on the pixels of the kind."""
    window = find_window(views, kind, accept=lambda w: cache.clean(w, 2))
    display = None if window is None else (
        window, [cache.get(window.slide, window.cx, window.cy, ds) for _, ds in MAGNIFICATIONS])
    sample = Sample(kind, "synthetic", cohort.MPP)
    kind_index = kind_names().index(kind)
    for w in stats_windows(views, kind, accept=lambda w: cache.clean(w, 1)):
        sample.images.append(cache.get(w.slide, w.cx, w.cy, 1))
        sample.areas.append(crop_kind_mask(views[w.slide].renderer, w.cx, w.cy, kind_index))
        sample.windows.append(w)
    return display, sample


def groups(samples: dict[str, Sample], real: dict[str, Sample]) -> dict[str, Sample]:
    """The four groups of the plots: synthetic invasive and non-tumour (stroma, normal
    lobule) 40x crops measured whole, real tumour and normal patches."""
    out = {}
    tumour = samples.get(TUMOUR_KIND)
    if tumour is not None and tumour.images:
        out["synthetic invasive"] = Sample("synthetic invasive", "synthetic", cohort.MPP,
                                           list(tumour.images), [None] * len(tumour.images))
    normal = Sample("synthetic non-tumour", "synthetic", cohort.MPP)
    for kind in NON_TUMOUR_KINDS:
        if kind in samples:
            normal.images += samples[kind].images
            normal.areas += [None] * len(samples[kind].images)
    if normal.images:
        out["synthetic non-tumour"] = normal
    for name, label in (("tumor", "real tumour"), ("normal", "real normal")):
        if name in real:
            out[label] = real[name]
    return out


def stats_rows(shares: dict[str, tuple[float, float | None]], samples: dict[str, Sample],
               real: dict[str, Sample]) -> list[dict]:
    """cohort_stats.csv: one row per region kind present (``shares``, from
    :func:`h2g.evaluation.cohort_windows.kind_area_shares`), then per real class."""
    rows = []
    for kind in kind_names():
        share = shares[kind]
        if share[0] > 0:
            rows.append(sample_row(samples[kind], share))
    for name in REAL_CLASSES:
        if name in real:
            rows.append(sample_row(real[name], None))
    return rows


def group_summary(sample: Sample, nuclei: Nuclei) -> dict:
    """A group's statistics for cohort_stats.json: images, scale, mean and sd RGB of its
    tissue pixels and its ``nuclei`` (:meth:`Nuclei.summary`)."""
    rgb = sample.tissue_pixels()
    return {"images": len(sample.images), "um_per_px": sample.um_per_px,
            "tissue_mean_rgb": [round(float(v), 1) for v in rgb.mean(axis=0)] if len(rgb) else None,
            "tissue_std_rgb": [round(float(v), 1) for v in rgb.std(axis=0)] if len(rgb) else None,
            **nuclei.summary()}


def method_parameters() -> dict:
    """The method's parameters, as cohort_stats.json records them."""
    return {
        "crop_px": CROP, "magnifications": [{"power": p, "downsample": d} for p, d in MAGNIFICATIONS],
        "purity": PURITY, "fallback_purity": FALLBACK_PURITY, "purity_field_px": PURITY_WINDOW,
        "stats_purity": STATS_PURITY, "stats_crops_per_kind": STATS_CROPS,
        "stain_matrix": "Ruifrok-Johnston H, E, DAB (rows normalised)",
        "threshold": f"max(Otsu on tissue pixels of smoothed H OD (0..{H_FULL_SCALE} -> 0..255), "
                     f"{MIN_NUCLEUS_OD})",
        "smooth_sigma_px": SMOOTH_PX, "min_nucleus_um2": MIN_NUCLEUS_UM2,
        "tissue": f"optical density norm >= {BETA}", "real_um_per_px": REAL_MPP,
        "synthetic_um_per_px": cohort.MPP,
        "non_tumour_kinds": [k for k in NON_TUMOUR_KINDS if k in kind_names()],
    }
