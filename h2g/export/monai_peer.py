"""MONAI as a peer for the sliding-window rows of the runtime table: what a MONAI user
would write to segment a slide with one of our exported ONNX models, timed against ours.

The formulation (``pip install 'h2g[peers]'``: MONAI and a CPU build of PyTorch):

- the slide is read through ``monai.data.WSIReader`` (OpenSlide backend by default;
  ``tifffile`` also works), one *chunk* at a time: ``chunk`` x ``chunk`` cells of our
  window grid (default 16), each chunk that has a tissue window read once per view as a
  region of the pyramid level whose downsample divides the view's exactly, shrunk to the
  view's magnification by ``monai.transforms.Resize(mode="area")`` (a box filter for
  integer factors), scaled to [0, 1] by ``ScaleIntensityRange`` and reflect-padded where
  it runs past the slide;
- ``monai.inferers.sliding_window_inference`` slides the model's target view (DMMN: x20)
  over the chunk with ``roi_size`` = the view's size, ``overlap`` = 1 - stride / size
  (its scan interval is then our stride) and ``sw_batch_size`` = our batch size; blend
  ``centre`` (keep = stride) gives ``roi_weight_map`` the same 0 / 1 weights as ours and
  ``tent`` our tent, so MONAI's weighted average is ours;
- the predictor is a plain ONNX Runtime ``InferenceSession`` on the same exported model.
  Models with several co-centred views (DMMN: x20, x10, x5; m-UNet: two levels) get their
  context views from ``with_coord=True``: the predictor receives each window's position
  and crops the other views around the same centre from the chunk's context images (read
  once per chunk, like the target view).  Windows of the chunk whose cell has no tissue
  are not run (zeros), so the peer runs exactly our windows and its windows/s counts the
  same windows as ours.

Where it cannot be ours (and so where the outputs may differ):

- no tissue detector in MONAI: the peer uses ours (:func:`h2g.tiling.tissue.detect_tissue`,
  the same window grid), timed in its runs as in ours;
- views at a magnification without a pyramid level are area-shrunk as float means,
  where ours rounds them to uint8 first (input differences up to 0.5 / 255); at levels
  that exist the pixels are OpenSlide's in both;
- reflection at the slide's edge is of the chunk, ours of each window's view: the same
  pixels unless a view reaches further past the edge than it lies inside the slide;
- MONAI normalises each chunk on its own: with overlapping windows (``tent``) pixels
  within size - stride of a chunk seam, and next to windows skipped as glass (their zero
  predictions are in MONAI's average), differ from ours; ``chunk=0`` runs the whole slide
  in one call (exact, if the slide's view images fit in memory);
- the model's output must have the target view's size (true of DMMN and m-UNet).

:func:`monai_segmentation` returns the probability :class:`~h2g.inference.raster.Raster`
(the tests compare it with ours); :func:`monai_peer` times it (one warm-up, ``repeats``
runs) and returns a result shaped like :func:`h2g.export.fast.fast_peer`'s, or
``{"skipped": reason}`` when MONAI is not installed.  TensorFlow-free.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2g.core.errors import ConfigError, ExportError
from h2g.data.views import View

MONAI_INSTALL_HINT = ("pip install 'h2g[peers]' (MONAI and a CPU build of PyTorch; the extra pins torch so that "
                      "pip does not pull a CUDA build)")
BACKENDS = ("openslide", "tifffile")


def monai_available() -> str | None:
    """None when MONAI (and PyTorch) import, else why not (with the install hint)."""
    try:
        import monai  # noqa: F401
        import torch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken torch build's OSError
        return f"MONAI cannot be imported ({exc}); {MONAI_INSTALL_HINT}"
    return None


@dataclass(frozen=True)
class _Reading:
    """How a view is read: pyramid ``level`` and integer ``factor`` from it to the view."""

    view: View
    downsample: float  # level-0 px per view px
    level: int
    factor: int


def _reading(slide, view: View) -> _Reading:
    d = slide.downsample_for(view.magnification)
    level = slide.best_level_for(d)
    factor = d / slide.level_downsamples[level]
    if abs(factor - round(factor)) > 1e-6:
        raise ConfigError(f"{slide.path}: view {view.name!r} at {view.magnification:g}x is not an integer shrink of "
                          f"a pyramid level (downsamples {list(slide.level_downsamples)}): the MONAI peer reads "
                          "levels and shrinks them by whole factors")
    return _Reading(view, d, level, int(round(factor)))


def _session(model, device: str, provider: str | None, threads: int | None):
    """A plain ONNX Runtime session, as a MONAI user would make one."""
    import onnxruntime as ort

    from h2g.inference.backends import gpu_providers

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    providers = ["CPUExecutionProvider"]
    if str(device).upper() == "GPU":
        providers = gpu_providers(ort.get_available_providers(), provider) + providers
    try:
        return ort.InferenceSession(str(model), options, providers=providers)
    except Exception as exc:  # onnxruntime's own error types
        raise ExportError(f"{model}: ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None


class MonaiSlidingWindow:
    """MONAI's ``sliding_window_inference`` over one slide with an ONNX model (module doc).

    ``model``: an exported ``.onnx`` whose metadata names its views (or ``metadata``);
    ``stride`` / ``keep`` / ``blend`` as :func:`h2g.inference.sliding.sliding_segmentation`
    (``keep`` must equal the stride for ``centre``); ``chunk``: cells a side read per
    ``sliding_window_inference`` call (0: the whole slide).  ``torch_threads`` (default 1,
    None: PyTorch's default of one per core) is set process-wide: PyTorch only reads,
    shrinks and accumulates here while ONNX Runtime has the cores, and PyTorch's OpenMP
    threads spin-waiting beside ONNX Runtime's made the peer several times slower on a
    shared 2-core machine."""

    def __init__(self, slide_path, model, *, metadata=None, stride: int | None = None, keep: int | None = None,
                 blend: str = "centre", batch_size: int = 8, chunk: int = 16, backend: str = "openslide",
                 device: str = "CPU", provider: str | None = None, threads: int | None = None,
                 mpp: float | None = None, torch_threads: int | None = 1):
        why = monai_available()
        if why:
            raise ExportError(why)
        if torch_threads:  # PyTorch only accumulates windows here; ONNX Runtime has the cores
            import torch

            torch.set_num_threads(int(torch_threads))
        from h2g.inference.metadata import model_metadata
        from h2g.inference.sliding import BLENDS

        self.slide_path, self.model = Path(slide_path), Path(model)
        self.metadata = metadata or model_metadata(self.model)
        if self.metadata is None or not self.metadata.views:
            raise ExportError(f"{self.model}: no views in the model's metadata (export it with export/convert.py)")
        if blend not in BLENDS:
            raise ConfigError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"MONAI WSIReader backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if batch_size < 1 or chunk < 0:
            raise ConfigError(f"batch_size must be >= 1 and chunk >= 0, got {batch_size} and {chunk}")
        self.target = self.metadata.view()
        size = self.target.size
        self.stride = int(stride or size)
        if not 1 <= self.stride <= size:
            raise ConfigError(f"stride must be in 1..{size} (the target view's size), got {self.stride}")
        if blend == "centre" and (keep or self.stride) != self.stride:
            raise ConfigError(f"the MONAI peer keeps each window's central stride x stride pixels (keep = stride "
                              f"= {self.stride}); keep {keep} has no MONAI counterpart")
        if (size - self.stride) % 2:
            raise ConfigError(f"size - stride must be even for windows centred on their cells, got "
                              f"{size} - {self.stride}")
        self.blend, self.batch_size, self.chunk, self.backend, self.mpp = blend, int(batch_size), int(chunk), backend, mpp
        self.device = str(device).upper()
        self.session = _session(self.model, self.device, provider, threads)
        names = {i.name for i in self.session.get_inputs()}
        if names != {v.name for v in self.metadata.views}:
            raise ExportError(f"{self.model}: the model's inputs {sorted(names)} are not its views "
                              f"{[v.name for v in self.metadata.views]}")
        self.output = self.session.get_outputs()[0].name
        self._zero_feed = {v.name: np.zeros((1, v.size, v.size, 3), np.float32) for v in self.metadata.views}
        out = self.session.run([self.output], self._zero_feed)[0]
        if out.ndim != 4 or out.shape[1:3] != (size, size):
            raise ExportError(f"{self.model}: output of shape {tuple(out.shape)}; the MONAI peer needs the target "
                              f"view's size ({size} x {size}) per window")
        self.classes = int(out.shape[-1])
        from h2g.inference.sliding import blend_weights

        self.weights = blend_weights(size, blend, self.stride if blend == "centre" else None)

    # ------------------------------------------------------------------ versions
    def info(self) -> dict:
        import monai
        import onnxruntime
        import torch

        return {"engine": "MONAI sliding_window_inference + ONNX Runtime",
                "version": f"monai {monai.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
                "device": self.device, "precision": "f32", "providers": self.session.get_providers(),
                "reader": f"monai.data.WSIReader({self.backend})", "threads": None}

    # ------------------------------------------------------------------ reading
    def _read(self, reader, wsi, slide, reading: _Reading, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """``(3, height, width)`` float32 in [0, 1]: the view's pixels whose top-left is
        level-0 ``(x0, y0)``, read through WSIReader at ``reading.level``, area-shrunk by
        its factor, reflect-padded beyond the slide."""
        from monai.transforms import Resize, ScaleIntensityRange

        d, f = reading.downsample, reading.factor
        slide_w, slide_h = slide.dimensions

        def inside(start: float, count: int, limit: int) -> tuple[int, int]:  # view px whose centres are inside
            lo = math.ceil((0 - start) / d - 0.5)
            hi = math.ceil((limit - start) / d - 0.5)
            return min(max(lo, 0), count), min(max(hi, 0), count)

        (c0, c1), (r0, r1) = inside(x0, width, slide_w), inside(y0, height, slide_h)
        if c0 >= c1 or r0 >= r1:
            return np.zeros((3, height, width), np.float32)  # nothing of the slide here (never a tissue window)
        patch, _ = reader.get_data(wsi, location=(int(round(y0 + r0 * d)), int(round(x0 + c0 * d))),
                                   size=((r1 - r0) * f, (c1 - c0) * f), level=reading.level)
        image = np.asarray(patch, np.float32)
        if f > 1:
            image = np.asarray(Resize((r1 - r0, c1 - c0), mode="area")(image), np.float32)
        image = np.asarray(ScaleIntensityRange(0.0, 255.0, 0.0, 1.0)(image), np.float32)
        pad = ((0, 0), (r0, height - r1), (c0, width - c1))
        if any(p for pair in pad for p in pair):
            image = np.pad(image, pad, mode="reflect" if min(image.shape[1:]) > 1 else "edge")
        return image

    # ------------------------------------------------------------------ one slide
    def segment(self, tissue=None, timings: dict | None = None):
        """The slide's class-probability :class:`~h2g.inference.raster.Raster` (covered:
        the central stride x stride pixels of every window over tissue)."""
        import torch
        from monai.data import WSIReader
        from monai.inferers import sliding_window_inference

        from h2g.inference.raster import Raster
        from h2g.io.slide import Slide
        from h2g.tiling.tissue import detect_tissue
        from h2g.tiling.windows import window_grid

        t = dict.fromkeys(("tissue", "reading", "sliding_window", "inference", "stitching"), 0.0)
        t0 = time.perf_counter()
        size, stride = self.target.size, self.stride
        margin = (size - stride) // 2
        with Slide(self.slide_path, mpp=self.mpp) as slide:
            if tissue is None:
                tissue = detect_tissue(slide)
            grid = window_grid(slide, magnification=self.target.magnification, size=size, stride=stride,
                               tissue=tissue)
            readings = {v.name: _reading(slide, v) for v in self.metadata.views}
            raster = Raster.empty(slide.dimensions, grid.downsample, self.classes)
            t["tissue"] = time.perf_counter() - t0
            rows, cols = grid.grid_shape
            tissue_cells = np.zeros(grid.grid_shape, bool)
            tissue_cells[grid.cells[:, 0], grid.cells[:, 1]] = True
            side = self.chunk or max(rows, cols)
            reader = WSIReader(backend=self.backend, channel_dim=0)
            wsi = reader.read(str(self.slide_path))
            d_t = readings[self.target.name].downsample
            weight_map = torch.from_numpy(self.weights)
            ran = 0
            try:
                for i0 in range(0, rows, side):
                    for j0 in range(0, cols, side):
                        cells = tissue_cells[i0:i0 + side, j0:j0 + side]
                        if not cells.any():
                            continue
                        ni, nj = cells.shape
                        top, left = i0 * stride - margin, j0 * stride - margin  # target px of the chunk
                        height, width = ni * stride + size - stride, nj * stride + size - stride
                        tr = time.perf_counter()
                        images = {self.target.name: self._read(reader, wsi, slide, readings[self.target.name],
                                                               left * d_t, top * d_t, width, height)}
                        origins = {}
                        for view in self.metadata.views:
                            if view.name == self.target.name:
                                continue
                            r = readings[view.name]
                            # the first window's view top-left, level-0, and the extent of all the chunk's views
                            x0 = (left + size / 2) * d_t - view.size * r.downsample / 2
                            y0 = (top + size / 2) * d_t - view.size * r.downsample / 2
                            if abs(x0 / r.downsample - round(x0 / r.downsample)) > 1e-6 or \
                                    abs(y0 / r.downsample - round(y0 / r.downsample)) > 1e-6 or \
                                    abs(stride * d_t / r.downsample - round(stride * d_t / r.downsample)) > 1e-6:
                                raise ConfigError(f"view {view.name!r}: windows {stride} px apart at "
                                                  f"{self.target.magnification:g}x do not fall on its pixel grid; "
                                                  "the MONAI peer crops context views at whole pixels")
                            step = int(round(stride * d_t / r.downsample))
                            images[view.name] = self._read(reader, wsi, slide, r, int(round(x0)), int(round(y0)),
                                                           (nj - 1) * step + view.size, (ni - 1) * step + view.size)
                            origins[view.name] = step
                        t["reading"] += time.perf_counter() - tr
                        inputs = torch.from_numpy(images[self.target.name])[None]

                        def predictor(windows, coords):
                            nonlocal ran
                            keep = []
                            for k, where in enumerate(coords):
                                r, c = where[2].start // stride, where[3].start // stride
                                if cells[r, c]:
                                    keep.append((k, r, c))
                            out = torch.zeros((len(coords), self.classes, size, size), dtype=torch.float32)
                            if not keep:
                                return out
                            index = [k for k, _, _ in keep]
                            feed = {self.target.name: np.ascontiguousarray(windows[index].permute(0, 2, 3, 1).numpy())}
                            for name, step in origins.items():
                                s = readings[name].view.size
                                feed[name] = np.ascontiguousarray(np.stack(
                                    [images[name][:, r * step:r * step + s, c * step:c * step + s]
                                     for _, r, c in keep]).transpose(0, 2, 3, 1))
                            ti = time.perf_counter()
                            probs = self.session.run([self.output], feed)[0]
                            t["inference"] += time.perf_counter() - ti
                            ran += len(keep)
                            out[index] = torch.from_numpy(np.ascontiguousarray(probs.transpose(0, 3, 1, 2)))
                            return out

                        ts = time.perf_counter()
                        result = sliding_window_inference(
                            inputs, roi_size=(size, size), sw_batch_size=self.batch_size, predictor=predictor,
                            overlap=(size - stride) / size, mode="constant", roi_weight_map=weight_map,
                            with_coord=True)
                        tw = time.perf_counter()
                        t["sliding_window"] += tw - ts
                        probs = result[0].numpy().transpose(1, 2, 0)[margin:margin + ni * stride,
                                                                      margin:margin + nj * stride]
                        r_end = min(raster.shape[0], (i0 + ni) * stride)
                        c_end = min(raster.shape[1], (j0 + nj) * stride)
                        area = (slice(i0 * stride, r_end), slice(j0 * stride, c_end))
                        raster.probs[area] = probs[:r_end - i0 * stride, :c_end - j0 * stride]
                        covered = np.repeat(np.repeat(cells, stride, 0), stride, 1)
                        raster.covered[area] = covered[:r_end - i0 * stride, :c_end - j0 * stride]
                        t["stitching"] += time.perf_counter() - tw
            finally:
                close = getattr(wsi, "close", None)
                if close is not None:
                    close()
        t["total"] = time.perf_counter() - t0
        if ran != len(grid):
            raise ExportError(f"MONAI peer ran {ran} windows, the window grid has {len(grid)}")
        if timings is not None:
            timings.update(t, windows=len(grid))
        return raster


def monai_segmentation(slide_path, model, **kw):
    """The MONAI peer's class-probability raster of ``slide_path`` (:class:`MonaiSlidingWindow`'s
    options; ``tissue`` a precomputed mask)."""
    tissue = kw.pop("tissue", None)
    return MonaiSlidingWindow(slide_path, model, **kw).segment(tissue=tissue)


STAGES = ("tissue", "reading", "sliding_window", "inference", "stitching", "total")


def monai_peer(slide_path, model, *, repeats: int = 3, **kw) -> dict:
    """Time the MONAI peer on ``slide_path``: the session is made once, outside the
    timing (as ours); one warm-up, then ``repeats`` runs.  Result shaped like
    :func:`h2g.export.fast.fast_peer`'s (``windows_per_second`` counts the same windows
    as ours, over everything after tissue detection); ``{"name": "monai", "skipped":
    reason}`` when MONAI is not installed."""
    from h2g.core.measure import mean_sd

    why = monai_available()
    if why:
        return {"name": "monai", "skipped": why}
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    peer = MonaiSlidingWindow(slide_path, model, **kw)
    runs = []
    for _ in range(repeats + 1):
        timings: dict = {}
        peer.segment(timings=timings)
        runs.append(timings)
    runs = runs[1:]
    info = peer.info()
    return {
        "name": "monai",
        **info,
        "windows": runs[-1]["windows"],
        "stride": peer.stride, "blend": peer.blend, "batch_size": peer.batch_size, "chunk": peer.chunk,
        "stages": {s: mean_sd(r[s] for r in runs) for s in STAGES},
        "windows_per_second": mean_sd(r["windows"] / (r["total"] - r["tissue"]) for r in runs),
        "warmup": 1, "repeats": repeats,
        "runs": runs,
    }


def peer_rows(ours: dict, peer: dict) -> list[str]:
    """Markdown table rows comparing our sliding-window runs with the MONAI peer's."""
    def cell(stat):
        return f"{stat['mean']:.2f} ± {stat['sd']:.2f}"

    return [
        "| Pipeline | Version | Device | Windows | Windows/s (after tissue detection) | Total (s) |",
        "|---|---|---|---|---|---|",
        f"| h2g ({ours['engine']}) | {ours['version']} | {ours['device']} | {ours['windows']} | "
        f"{cell(ours['windows_per_second'])} | {cell(ours['stages']['total'])} |",
        f"| {peer['engine']} | {peer['version']} | {peer['device']} | {peer['windows']} | "
        f"{cell(peer['windows_per_second'])} | {cell(peer['stages']['total'])} |",
    ]
