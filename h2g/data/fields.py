"""Position-pure random fields for the synthetic cohort: every value is a function of a
key and a level-0 position only, so any region of a slide can be rendered on its own and
tiles rendered apart agree exactly (hashing, value noise, cellular noise on grids)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

MPP = 0.25                # microns per level-0 pixel


def um(microns: float) -> float:
    """Microns as level-0 pixels."""
    return microns / MPP


# ---------------------------------------------------------------- position hashing, noise

def _mix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijective scramble of 64-bit integers)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash01(key: int, ix, iy) -> np.ndarray:
    """A uniform number in [0, 1) per integer position ``(ix, iy)`` (broadcast), fixed by
    ``key``: the same position always gets the same number, whatever is asked with it."""
    ix = np.asarray(ix, np.int64).astype(np.uint64)
    iy = np.asarray(iy, np.int64).astype(np.uint64)
    h = _mix(ix * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key % 2**64))
    h = _mix(h ^ (iy * np.uint64(0xC2B2AE3D27D4EB4F)))
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


@dataclass(frozen=True)
class Grid:
    """A grid of ``shape`` (rows, cols) pixels of ``step`` level-0 px, the first covering
    ``[x0, x0 + step) x [y0, y0 + step)``."""

    x0: float
    y0: float
    shape: tuple[int, int]
    step: float

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of the pixel centres as a row (1, cols) and a column (rows, 1)."""
        rows, cols = self.shape
        xs = self.x0 + (np.arange(cols, dtype=np.float32) + 0.5) * self.step
        ys = self.y0 + (np.arange(rows, dtype=np.float32) + 0.5) * self.step
        return xs[None, :], ys[:, None]

    def resample(self, values: np.ndarray, spacing: float, origin=(0.0, 0.0),
                 resample=Image.BICUBIC) -> np.ndarray:
        """``values`` (one per ``spacing`` level-0 px, pixel ``[0, 0]`` covering
        ``origin``) interpolated at this grid: a pure function of position."""
        rows, cols = self.shape
        ox, oy = origin
        box = ((self.x0 - ox) / spacing, (self.y0 - oy) / spacing,
               (self.x0 + cols * self.step - ox) / spacing,
               (self.y0 + rows * self.step - oy) / spacing)
        image = Image.fromarray(np.ascontiguousarray(values, np.float32), "F")
        return np.asarray(image.resize((cols, rows), resample, box=box))

    def noise(self, key: int, spacing: float) -> np.ndarray:
        """Smooth value noise (lattice ``spacing`` level-0 px, values about 0..1)."""
        rows, cols = self.shape
        i0 = int(np.floor(self.x0 / spacing)) - 2
        i1 = int(np.ceil((self.x0 + cols * self.step) / spacing)) + 2
        j0 = int(np.floor(self.y0 / spacing)) - 2
        j1 = int(np.ceil((self.y0 + rows * self.step) / spacing)) + 2
        lattice = hash01(key, np.arange(i0, i1)[None, :], np.arange(j0, j1)[:, None])
        return self.resample(lattice, spacing, (i0 * spacing, j0 * spacing))

    def worley(self, key: int, cell: float, points: bool = False):
        """Cellular noise over a jittered grid of ``cell`` level-0 px: the distances to the
        nearest and second-nearest feature points and a uniform number of the nearest
        point's cell; with ``points``, also the angle (radians) of each pixel seen from its
        nearest point (the radial direction: a gland's rim runs across it)."""
        xs, ys = self.centres()
        cx = np.floor(xs[0] / cell).astype(np.int64)
        cy = np.floor(ys[:, 0] / cell).astype(np.int64)
        gx = np.arange(cx[0] - 1, cx[-1] + 2)[None, :]
        gy = np.arange(cy[0] - 1, cy[-1] + 2)[:, None]
        fx = ((gx + 0.1 + 0.8 * hash01(key, gx, gy)) * cell).astype(np.float32)
        fy = ((gy + 0.1 + 0.8 * hash01(key + 1, gx, gy)) * cell).astype(np.float32)
        ident = hash01(key + 2, gx, gy)
        f1 = np.full(self.shape, np.inf, np.float32)
        f2 = f1.copy()
        nearest = np.zeros(self.shape, np.float32)
        if points:
            near_x, near_y = np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32)
        d, dy2, closer = np.empty_like(f1), np.empty_like(f1), np.empty(self.shape, bool)
        for oy in (-1, 0, 1):
            rows = cy - gy[0, 0] + oy
            fx_rows, fy_rows, id_rows = fx[rows], fy[rows], ident[rows]
            for ox in (-1, 0, 1):
                cols = cx - gx[0, 0] + ox
                np.subtract(xs, np.take(fx_rows, cols, axis=1), out=d)
                np.square(d, out=d)
                np.subtract(ys, np.take(fy_rows, cols, axis=1), out=dy2)
                np.square(dy2, out=dy2)
                d += dy2
                np.less(d, f1, out=closer)
                np.copyto(nearest, np.take(id_rows, cols, axis=1), where=closer)
                if points:
                    np.copyto(near_x, np.take(fx_rows, cols, axis=1), where=closer)
                    np.copyto(near_y, np.take(fy_rows, cols, axis=1), where=closer)
                np.minimum(f2, np.maximum(f1, d, out=dy2), out=f2)
                np.minimum(f1, d, out=f1)
        if points:
            return np.sqrt(f1), np.sqrt(f2), nearest, np.arctan2(ys - near_y, xs - near_x)
        return np.sqrt(f1), np.sqrt(f2), nearest


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def fraction(u: np.ndarray, salt: float) -> np.ndarray:
    """Another uniform number derived from the uniform ``u`` (for several per cell)."""
    return (u * salt) % 1.0


def smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / field.std()


def as_distance(field: np.ndarray, spacing: float) -> np.ndarray:
    """``field`` rescaled so that near its zero level it reads as a signed distance in
    level-0 px (divided by its median gradient there)."""
    gy, gx = np.gradient(field, spacing)
    slope = np.hypot(gx, gy)
    near = np.abs(field) < np.quantile(np.abs(field), 0.1)
    return (field / np.median(slope[near])).astype(np.float32)
