"""Multi-stain rendering of the embedded cohort: IHC versions of its slide layouts and
per-slide scanner variation (m-UNet, ``../shared/paper/multiclass-multistain-unet.txt``).

A layer over :mod:`h2g.data.cohort`: the same layouts, structure and nuclei (so the same
label maps), drawn with other stains.  The H&E slides, masks and label maps of the
cohort are not touched; this module only adds slides and a manifest::

    <out>/data_manifest_multistain.csv             # stain and scanner columns
    <out>/data_manifest_multistain.classes.csv     # normal (stroma, fat, glass), tumour, other (acini)
    <out>/cohort/multistain/<id>_<stain>.tiff      # one IHC slide per layout

- **IHC** (:data:`STAINS`): haematoxylin counterstain (nuclei, and a light blue-grey
  tint of the tissue instead of eosin) plus DAB (brown).  Nuclear stains (ER, PR, Ki67)
  put DAB in a per-slide fraction of the *tumour* nuclei (a position hash decides which
  nucleus); the membrane stain (HER2) puts it in a ring round the positive tumour
  nuclei.  Nothing else is brown.
- **Scanner** (:data:`SCANNERS`): per-channel gain and gamma, Gaussian blur and
  position-hashed noise, all pure functions of the position, so a slide is rendered
  tile by tile and the same seed gives the same bytes.

The manifest's training and validation slides are IHC only; its test split has the IHC
test slides and the cohort's H&E test slides (``stain=he``): the stain never seen in
training (the paper's test).  Annotations are the cohort's label maps (partial for
train / val); :func:`classes_text` maps their values to the three classes.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from h2g.core.atomic import replace_atomically
from h2g.core.errors import ConfigError
from h2g.data import cohort
from h2g.io.classes import sidecar_path
from h2g.io.pyramid import write_pyramid_tiles

MULTISTAIN_MANIFEST_NAME = "data_manifest_multistain.csv"
HEADER = ("slide_id", "slide_path", "annotation_path", "grade", "split", "stain", "scanner")
DAB = np.array([0.27, 0.57, 0.78])           # optical density per unit DAB (Ruifrok & Johnston)
MAX_OD_IHC = (1.6, 1.4)                       # OD of amount 1 (haematoxylin, DAB)
COUNTERSTAIN = 0.3                           # haematoxylin tint of the tissue per unit eosin
MEMBRANE_UM = (1.0, 3.0)                      # membrane ring: between these distances from a nucleus


@dataclass(frozen=True)
class Stain:
    name: str
    target: str                               # "nuclear", "membrane" or "none" (H&E)
    positive: tuple[float, float]             # range of the per-slide positive fraction of tumour nuclei


STAINS = {
    "er": Stain("er", "nuclear", (0.6, 0.9)),
    "pr": Stain("pr", "nuclear", (0.4, 0.8)),
    "ki67": Stain("ki67", "nuclear", (0.15, 0.4)),
    "her2": Stain("her2", "membrane", (0.6, 0.95)),
}
IHC_ORDER = ("er", "pr", "ki67", "her2")


@dataclass(frozen=True)
class Scanner:
    name: str
    gain: tuple[float, float, float]          # per-channel multiplier of the RGB
    gamma: float
    blur: float                               # Gaussian sigma, level-0 px
    noise: float                              # amplitude of uniform noise, 0..255 units


SCANNERS = {
    "scanner_a": Scanner("scanner_a", (1.0, 1.0, 1.0), 1.0, 0.0, 0.0),
    "scanner_b": Scanner("scanner_b", (1.03, 0.97, 0.92), 0.9, 0.8, 4.0),
    "scanner_c": Scanner("scanner_c", (0.95, 1.0, 1.05), 1.12, 1.4, 8.0),
}


# 3 classes (the paper's): the cohort's label values clubbed; "other" = acini / ducts
MULTISTAIN_CLASSES = (("normal", (cohort.LABEL_STROMA, cohort.LABEL_FAT, cohort.LABEL_GLASS), "#f0f0f0"),
                      ("tumour", (cohort.LABEL_TUMOUR,), "#c80000"),
                      ("other", (cohort.LABEL_BENIGN,), "#00a050"))


def classes_text() -> str:
    """The class table of :data:`MULTISTAIN_MANIFEST_NAME` (:mod:`h2g.io.classes`)."""
    rows = ["name,value,colour"]
    for name, values, colour in MULTISTAIN_CLASSES:
        rows.append(f"{name},{';'.join(str(v) for v in values)},{colour}")
    rows.append(f"ignore,{cohort.UNANNOTATED},")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class StainSpec:
    """One multi-stain slide: a cohort layout (``base``) drawn with ``stain`` on ``scanner``."""

    base: cohort.SlideSpec
    stain: str
    scanner: str

    @property
    def slide_id(self) -> str:
        return f"{self.base.slide_id}_{self.stain}"

    @property
    def slide_path(self) -> str:
        if self.stain == "he":
            return self.base.slide_path
        return f"cohort/multistain/{self.slide_id}.tiff"

    @property
    def annotation_path(self) -> str:
        return self.base.multiclass_annotation_path


def stain_specs(preset_name: str) -> list[StainSpec]:
    """The slides of a preset's multi-stain manifest: each layout once in an IHC stain
    (cycling :data:`IHC_ORDER` within each split) on a scanner (cycling), then the
    H&E test slides (scanner ``scanner_a``, the cohort as it is)."""
    specs, seen = [], {}
    scanners = tuple(SCANNERS)
    for base in cohort.cohort_specs(preset_name):
        k = seen[base.split] = seen.get(base.split, -1) + 1
        specs.append(StainSpec(base, IHC_ORDER[k % len(IHC_ORDER)], scanners[(base.index + k // 4) % len(scanners)]))
    specs += [StainSpec(base, "he", "scanner_a") for base in cohort.cohort_specs(preset_name) if base.split == "test"]
    return specs


def manifest_text(preset_name: str) -> str:
    lines = [",".join(HEADER)]
    for s in stain_specs(preset_name):
        lines.append(f"{s.slide_id},{s.slide_path},{s.annotation_path},{s.base.grade},{s.base.split},"
                     f"{s.stain},{s.scanner}")
    return "\n".join(lines) + "\n"


def positive_fraction(spec: StainSpec, seed: int) -> float:
    lo, hi = STAINS[spec.stain].positive
    return float(np.random.default_rng([seed, spec.base.index, 0xDAB]).uniform(lo, hi))


def ihc_lut() -> np.ndarray:
    """RGB (65536, 3) uint8 of each ``haematoxylin << 8 | dab`` pair of 0..255 amounts."""
    amount = np.arange(256) / 255.0
    hv = cohort.HAEMATOXYLIN / np.linalg.norm(cohort.HAEMATOXYLIN) * MAX_OD_IHC[0]
    dv = DAB / np.linalg.norm(DAB) * MAX_OD_IHC[1]
    od = amount[:, None, None] * hv + amount[None, :, None] * dv
    return np.round(cohort.BACKGROUND * np.exp(-od)).astype(np.uint8).reshape(-1, 3)


class IHCRenderer(cohort.SlideRenderer):
    """Renders a cohort layout as an IHC slide on a scanner (see the module doc)."""

    def __init__(self, layout, key: tuple[int, int], stain: Stain, scanner: Scanner, positive: float):
        super().__init__(layout, key)
        self.stain, self.scanner, self.positive = stain, scanner, float(positive)
        state = np.random.SeedSequence([*key, 0x1EC]).generate_state(4, np.uint64)
        self.positive_key, *self.noise_keys = (int(k) for k in state)
        base = self.bank_base
        self.tumour_sprites = (int(base[cohort.GRADE1]), int(base[cohort.GRADE3]) + cohort.VARIANTS)
        self._positive_only = False
        self.ihc = ihc_lut()

    def _sprite_index(self, st, ix0: int, iy0: int) -> np.ndarray:
        index = super()._sprite_index(st, ix0, iy0)
        if not self._positive_only:
            return index
        rows, cols = index.shape
        ix = np.arange(ix0, ix0 + cols)[None, :]
        iy = np.arange(iy0, iy0 + rows)[:, None]
        lo, hi = self.tumour_sprites
        positive = (index >= lo) & (index < hi) & (cohort.hash01(self.positive_key, ix, iy) < self.positive)
        return np.where(positive, index, 0)

    def positive_nuclei(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Haematoxylin sprites of the DAB-positive tumour nuclei only ``(h, w)`` uint8."""
        self._positive_only = True
        try:
            return self._nuclei(x, y, w, h)
        finally:
            self._positive_only = False

    def stain_amounts(self, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(haematoxylin, DAB) amounts ``(h, w)`` uint8 over a level-0 region."""
        S = cohort.STRUCTURE
        sx0, sy0 = x // S - 3, y // S - 3
        cols = -(-(x + w) // S) + 3 - sx0
        rows = -(-(y + h) // S) + 3 - sy0
        grid = cohort.Grid(sx0 * S, sy0 * S, (rows, cols), S)
        st = self.structure(grid)
        box = ((x - grid.x0) / S, (y - grid.y0) / S, (x + w - grid.x0) / S, (y + h - grid.y0) / S)
        from PIL import Image

        tint = ndimage.gaussian_filter(st.h + COUNTERSTAIN * st.e, 0.8, truncate=2.5)
        image = Image.fromarray(np.clip(tint * 255, 0, 255).astype(np.uint8))
        haem = np.asarray(image.resize((w, h), Image.BILINEAR, box=box)).copy()
        np.maximum(haem, self._nuclei(x, y, w, h), out=haem)
        haem += self._grain(0, x, y, w, h)
        if self.stain.target == "nuclear":
            positive = self.positive_nuclei(x, y, w, h)
            dab = (positive.astype(np.float32) * 0.95).astype(np.uint8)
            haem = np.where(positive > 0, (haem * 0.35).astype(np.uint8), haem)
        else:  # membrane: a ring round each positive nucleus
            outer = int(round(cohort.um(MEMBRANE_UM[1])))
            inner = int(round(cohort.um(MEMBRANE_UM[0])))
            m = outer
            positive = self.positive_nuclei(x - m, y - m, w + 2 * m, h + 2 * m) > 40
            ring = (ndimage.maximum_filter(positive, size=2 * outer + 1)
                    & ~ndimage.maximum_filter(positive, size=2 * inner + 1))[m:m + h, m:m + w]
            dab = ring.astype(np.uint8) * 170
        return haem, dab

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        sc = self.scanner
        m = int(np.ceil(3 * sc.blur)) if sc.blur > 0 else 0
        haem, dab = self.stain_amounts(x - m, y - m, w + 2 * m, h + 2 * m)
        index = haem.astype(np.uint16)
        index <<= 8
        index |= dab
        rgb = np.take(self.ihc, index, axis=0)
        if sc == SCANNERS["scanner_a"]:
            return rgb[m:m + h, m:m + w]
        value = rgb.astype(np.float32) / 255.0
        value = np.power(value, sc.gamma) * np.asarray(sc.gain, np.float32)
        if sc.blur > 0:
            value = ndimage.gaussian_filter(value, (sc.blur, sc.blur, 0), truncate=3.0)
        value = value[m:m + h, m:m + w] * 255.0
        if sc.noise > 0:
            ix = np.arange(x, x + w)[None, :]
            iy = np.arange(y, y + h)[:, None]
            for c, key in enumerate(self.noise_keys):
                value[..., c] += (cohort.hash01(key, ix, iy) - 0.5) * 2 * sc.noise
        return np.clip(np.rint(value), 0, 255).astype(np.uint8)


def renderer_for(preset_name: str, spec: StainSpec, seed: int) -> IHCRenderer:
    layout = cohort.slide_layout(preset_name, spec.base, seed)
    return IHCRenderer(layout, (seed, spec.base.index), STAINS[spec.stain], SCANNERS[spec.scanner],
                       positive_fraction(spec, seed))


def write_stain_slide(out_dir: Path, preset_name: str, spec: StainSpec, seed: int, progress=None) -> None:
    renderer = renderer_for(preset_name, spec, seed)
    replace_atomically(Path(out_dir) / spec.slide_path, lambda tmp: write_pyramid_tiles(
        tmp, renderer.layout.size, renderer.render, mpp=cohort.MPP, progress=progress))


def make_multistain(out_dir, preset: str = "smoke", seed: int = 0, progress: bool = True,
                    only_missing: bool = False, workers: int | None = None) -> Path:
    """Write the IHC slides of ``preset`` (the cohort's own H&E slides, masks and label
    maps are made by :func:`h2g.data.cohort.make_cohort` first, when missing) and the
    multi-stain manifest with its class table; returns the manifest's path."""
    out_dir = Path(out_dir)
    cohort.get_preset(preset)
    cohort.make_cohort(out_dir, preset, seed, progress=progress, only_missing=True, workers=workers)
    specs = [s for s in stain_specs(preset) if s.stain != "he"
             and not (only_missing and (out_dir / s.slide_path).is_file())]
    tiles = {s.slide_id: cohort._tile_count(cohort.slide_size(preset, s.base, seed)) for s in specs}
    workers = min(len(specs), workers or min(2, os.cpu_count() or 1)) if specs else 1
    with tqdm(total=sum(tiles.values()), unit="tile", desc=f"multistain {preset}", disable=not progress) as bar:
        if workers <= 1:
            for spec in specs:
                write_stain_slide(out_dir, preset, spec, seed, progress=bar.update)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                jobs = {pool.submit(write_stain_slide, out_dir, preset, spec, seed): spec for spec in specs}
                for job in as_completed(jobs):
                    job.result()
                    bar.update(tiles[jobs[job].slide_id])
    manifest = out_dir / MULTISTAIN_MANIFEST_NAME
    cohort._write_text(manifest, manifest_text(preset))
    cohort._write_text(sidecar_path(manifest), classes_text())
    return manifest


def ensure_multistain(manifest_path, seed: int = 0) -> Path | None:
    """Generate the missing files of a preset's multi-stain manifest (``None`` when
    ``manifest_path`` is not one)."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        return None
    text = manifest_path.read_text()
    for name in cohort.PRESETS:
        if text == manifest_text(name):
            make_multistain(manifest_path.parent, name, seed, progress=True, only_missing=True)
            return manifest_path
    return None


def check_stain(name: str) -> Stain:
    if name not in STAINS:
        raise ConfigError(f"unknown stain {name!r}; choose one of {', '.join(STAINS)}")
    return STAINS[name]
