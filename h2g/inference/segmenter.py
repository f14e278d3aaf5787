"""The deployed segmenter: a system's networks turned into one object that segments a slide.

Every place that runs a trained system over a slide goes through a :class:`Segmenter`:
``export/segment_slide.py``, ``export/segment_cohort.py`` (Ray and the process pool),
``export/benchmark.py``, the int8 guard (:mod:`h2g.export.quantize`), the BCSS
evaluation of a run, and each system's test-slide evaluation.  A segmenter

- is built from backends (:mod:`h2g.inference.backends`): exported files (ONNX /
  OpenVINO, f32 or int8) through :meth:`Segmenter.from_files` and an
  :class:`EngineOptions`, or in-memory / ``.keras`` models through Keras backends;
- takes its settings as one typed options dataclass (a subclass of :class:`SegmentOptions`
  per system, like TIAToolbox's ``IOSegmentorConfig``): the command-line tools turn
  their arguments into it once, at the edge (:meth:`SegmentOptions.given`), and what is
  not given comes from the models' metadata;
- owns :meth:`~Segmenter.segment` (slide -> :class:`Segmentation`),
  :meth:`~Segmenter.write` (its files: GeoJSON, TIFF, PNG, ``summary.json``), the stages
  and work items the benchmark times (:attr:`~Segmenter.stages`,
  :meth:`~Segmenter.work_alone`), the outputs the int8 guard compares
  (:meth:`~Segmenter.guard_outputs`) and the calibration inputs of each of its roles
  (:meth:`~Segmenter.calibration_feeds`).

Which segmenter serves a set of models is decided by the ``system`` recorded in their
metadata: each system lists its segmenter classes (:class:`h2g.systems.registry.System`),
and :func:`h2g.systems.registry.load_segmenter` picks the one whose :meth:`accepts` takes
the models' roles.  This module holds the base and the sliding-window segmenter every
system with one multi-view segmentation network uses (DMMN, m-UNet, RAZN's baselines);
H2G-Net's and RAZN's live in their systems' packages.  TensorFlow-free.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import numpy as np

from h2g.core.errors import ConfigError, ExportError
from h2g.core.measure import Timed
from h2g.data.views import View
from h2g.inference.backends import Backend, Engine, Hint, Precision, Provider, check_concurrency, make_backend
from h2g.inference.metadata import ModelMetadata
from h2g.inference.raster import Raster
from h2g.inference.sliding import Blend

log = logging.getLogger("h2g")
PALETTE = ((200, 0, 0), (0, 150, 0), (0, 0, 200), (200, 200, 0), (150, 0, 150), (0, 150, 150), (120, 120, 120))


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineOptions:
    """How the networks run: engine, device, precision (None: the engine's choice), inference
    threads (None: every core) and the performance hint of the segmenter's main network
    (the patch classifier, the sliding-window model); its other networks run ``latency``.
    ``sub_batch``: the main network's sub-batch size under the throughput hint (None: the
    engine's default, 1 on CPU; the best size depends on the CPU and the precision:
    ``tools/bench_sub_batch.py`` measures it)."""

    engine: Engine = Engine.OPENVINO
    device: str = "CPU"
    precision: Precision | None = None
    threads: int | None = None
    hint: Hint = Hint.THROUGHPUT
    provider: Provider = Provider.AUTO  # ONNX Runtime on a GPU: TensorRT / CUDA
    sub_batch: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "engine", Engine.parse(self.engine, "engine"))
        object.__setattr__(self, "hint", Hint.parse(self.hint, "hint"))
        object.__setattr__(self, "provider", Provider.parse(self.provider, "provider"))
        if self.engine == Engine.ONNXRUNTIME and str(self.device).upper() == "GPU":
            self.check_gpu()
        if self.precision is not None:
            object.__setattr__(self, "precision", Precision.parse(self.precision, "precision"))
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        check_concurrency(self.hint, self.sub_batch)
        if self.sub_batch is not None and self.hint != Hint.THROUGHPUT:
            raise ConfigError(f"sub_batch {self.sub_batch} applies to the throughput hint; the hint is {self.hint}")

    def check_gpu(self) -> None:
        """ONNX Runtime on a GPU: the provider asked for is installed, else an
        :class:`ExportError` before any model is read (:func:`h2g.inference.backends.gpu_providers`)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("engine onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu "
                              "for GPUs)") from None
        from h2g.inference.backends import gpu_providers

        gpu_providers(ort.get_available_providers(), self.provider)

    def backend(self, model, main: bool = False) -> Backend:
        """A backend for ``model`` (a file; a ``.keras`` file or a Keras model runs on Keras)."""
        engine = self.engine
        if not isinstance(model, (str, Path)) or Path(model).suffix.lower() == ".keras":
            engine = Engine.KERAS
        return make_backend(model, engine=engine, device=self.device, precision=self.precision,
                            threads=self.threads, hint=self.hint if main else Hint.LATENCY,
                            provider=self.provider if engine == Engine.ONNXRUNTIME else None,
                            sub_batch=self.sub_batch if main else None)

    def to_dict(self) -> dict:
        return {k: (None if v is None else (str(v) if not isinstance(v, int) else v))
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SegmentOptions:
    """Settings every segmenter takes.  ``batch_size`` None: the segmenter's default;
    ``readers``: patch / window reader threads; ``keep_ink``: keep green / blue / black
    pixels in the tissue mask (images that are not H&E); ``force``: run at a
    magnification or size the models were not trained at (refused otherwise);
    ``tissue_magnification`` / ``saturation_threshold``: tissue detection
    (:func:`h2g.tiling.tissue.detect_tissue`); ``geojson_origin``: the frame of the
    written GeoJSON's coordinates, ``"level0"`` (level-0 pixels) or ``"bounds"`` (QuPath's
    frame cropped to the slide's OpenSlide bounds: :func:`h2g.io.geojson.origin_offset`)."""

    batch_size: int | None = None
    readers: int = 2
    keep_ink: bool = False
    force: bool = False
    tissue_magnification: float = 1.25
    saturation_threshold: int = 20
    geojson_origin: str = "level0"

    def __post_init__(self):
        from h2g.io.geojson import ORIGINS

        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if int(self.readers) < 1:
            raise ConfigError(f"readers must be >= 1, got {self.readers}")
        if self.geojson_origin not in ORIGINS:
            raise ConfigError(f"GeoJSON origin must be one of {', '.join(ORIGINS)}, got {self.geojson_origin!r}")

    @classmethod
    def given(cls, label: str, **values):
        """The options from a tool's arguments: ``values`` left None take the defaults; a
        value given for an option this system does not have is a :class:`ConfigError`
        naming it (e.g. ``--stride`` for H2G-Net)."""
        names = {f.name for f in dataclasses.fields(cls)}
        foreign = sorted(k for k, v in values.items() if v not in (None, False) and k not in names)
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            raise ConfigError(f"{flags} {'does' if len(foreign) == 1 else 'do'} not apply to {label}")
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Blend) else v) for k, v in dataclasses.asdict(self).items()}


def resolve(given, from_model, default, what: str, source: str, force: bool = False):
    """An option that the model's metadata also states: ``given`` (the user's) wins when it
    agrees, or with ``force`` (a warning); disagreeing without ``force`` is a
    :class:`ConfigError` (a model run at a scale it was not trained at gives wrong
    numbers, not an error); not given: the metadata's, else ``default``."""
    if given is None:
        return from_model if from_model is not None else default
    if from_model is not None and float(given) != float(from_model):
        if not force:
            raise ConfigError(f"{source}: {what} {given:g} differs from the {from_model:g} the model was trained "
                              f"at (its metadata); give --force to run it anyway")
        log.warning("%s: %s %g overrides the model's %g from its metadata (--force)", source, what, given,
                    from_model)
    return given


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """What a segmenter made of a slide: ``count`` work items (patches, windows, regions),
    per-stage ``timings`` (seconds), ``no_tissue`` (nothing was over tissue: empty
    outputs) and the slide's ``tissue`` fraction.  Subclasses add the prediction:
    ``prob`` (a tumour probability map over the slide's extent) or ``raster`` (class
    probabilities, :class:`~h2g.inference.raster.Raster`)."""

    count: int = 0
    timings: dict = field(default_factory=dict)
    no_tissue: bool = False
    tissue: float = 0.0
    prob: np.ndarray | None = None
    raster: Raster | None = None


@dataclass
class RasterSegmentation(Segmentation):
    """A class-probability raster and the metadata it was made with (views as run)."""

    metadata: ModelMetadata | None = None
    zoom: object | None = None  # h2g.inference.zoom.ZoomStats of RAZN's conditional zoom


# --------------------------------------------------------------------------------------
# The base
# --------------------------------------------------------------------------------------
class Segmenter(ABC):
    """A system's deployed networks (see the module doc).  Subclasses set the class
    attributes and implement :meth:`segment`, :meth:`write` and :meth:`describe`."""

    #: what the segmenter is called in messages and reports
    label: ClassVar[str] = "segmenter"
    #: the model roles it takes (metadata ``role``), in order; ``required`` of them at least
    roles: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[tuple[str, ...]] = ()
    #: the role whose backend runs with the throughput hint
    main_role: ClassVar[str] = ""
    Options: ClassVar[type] = SegmentOptions
    default_batch: ClassVar[int] = 8
    #: what ``Segmentation.count`` counts, and the benchmark's stages
    unit: ClassVar[str] = "windows"
    stages: ClassVar[tuple[str, ...]] = ()
    stage_labels: ClassVar[dict] = {}
    #: the overlapped reading + inference stage (its items/s are the benchmark's rate)
    pipeline_stage: ClassVar[str] = "total"
    #: the headline columns of the benchmark table before "Total": (stage, title) pairs
    headline: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, backends: Mapping[str, Backend], options=None,
                 metadata: Mapping[str, ModelMetadata | None] | None = None):
        unknown = sorted(set(backends) - set(self.roles))
        missing = [r for r in self.required if r not in backends]
        if unknown or missing or not backends:
            raise ExportError(f"{self.label} takes the roles {', '.join(self.roles)} "
                              f"({', '.join(self.required) or 'any'} required), got {', '.join(backends) or 'none'}")
        self.backends = dict(backends)
        meta = dict(metadata or {})
        self.metadata = {role: meta.get(role) or b.metadata for role, b in self.backends.items()}
        options = options if options is not None else self.Options()
        if not isinstance(options, self.Options):
            raise ConfigError(f"{self.label} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    # ------------------------------------------------------------------ building
    @classmethod
    def accepts(cls, metas: Mapping[str, ModelMetadata]) -> bool:
        """Whether models with these metadata (by role) are this segmenter's."""
        return set(metas) <= set(cls.roles) and set(cls.required) <= set(metas)

    @classmethod
    def options_for_run(cls, config: Mapping) -> SegmentOptions:
        """The options a training run's ``config.json`` implies (default: the defaults;
        the models' metadata carries the rest)."""
        return cls.Options()

    @classmethod
    def from_files(cls, models: Mapping[str, Path], engine: EngineOptions | None = None, options=None):
        """The segmenter of exported (or ``.keras``) model files given by role."""
        engine = engine or EngineOptions()
        backends = {role: engine.backend(path, main=(role == cls.main_role)) for role, path in models.items()}
        return cls(backends, options)

    # ------------------------------------------------------------------ segmenting
    @property
    def batch_size(self) -> int:
        return int(self.options.batch_size or self.default_batch)

    def tissue_mask(self, slide):
        """The slide's tissue mask with the options' detection settings."""
        from h2g.tiling.tissue import detect_tissue

        o = self.options
        return detect_tissue(slide, magnification=o.tissue_magnification, saturation_threshold=o.saturation_threshold,
                             drop_ink=not o.keep_ink)

    @abstractmethod
    def segment(self, slide, *, tissue=None, progress: bool = False) -> Segmentation:
        """Segment ``slide`` (an :class:`h2g.io.slide.Slide`); ``tissue`` default: detected."""

    @abstractmethod
    def write(self, seg: Segmentation, slide, out_dir, extra: dict | None = None) -> dict[str, Path]:
        """Write ``seg``'s files into ``out_dir`` (each atomically); ``{name: path}`` with
        ``summary`` last-written."""

    @abstractmethod
    def describe(self, seg: Segmentation) -> str:
        """One console line about ``seg`` (count, what was found, time, engine)."""

    def tumour_mm2(self, seg: Segmentation, slide) -> float | None:
        """Tumour area of ``seg`` in mm^2 (None without a tumour class or an mpp)."""
        return None

    # ------------------------------------------------------------------ reporting
    @property
    def main(self) -> Backend:
        return self.backends.get(self.main_role) or next(iter(self.backends.values()))

    def info(self) -> dict:
        """Each role's backend: engine, version, device, threads, precision, ..."""
        return {role: b.info() for role, b in self.backends.items()}

    def engine_line(self) -> str:
        b = self.main
        return f"{b.name} {b.device} {b.info()['precision']}"

    def settings(self) -> dict:
        """What changes this segmenter's outputs (recorded in a cohort's ``cohort.json``)."""
        return {"segmenter": type(self).__name__, "options": self.options.to_dict()}

    # ------------------------------------------------------------------ benchmark hooks
    def work_alone(self, slide, seg: Segmentation) -> tuple[Timed, Timed] | None:
        """The reading and the inference of ``seg``'s work items timed apart (read-only:
        every item read, no inference; inference-only: as many items from memory), for the
        benchmark's ceiling; None when the segmenter has no such split."""
        return None

    def derived_timings(self, timings: dict) -> dict:
        """Stages computed from the measured ones (e.g. H2G-Net's patch-wise total)."""
        return {}

    def setup(self, seg: Segmentation) -> dict:
        """What the benchmark reports of the geometry a run used."""
        return {}

    # ------------------------------------------------------------------ int8 guard hooks
    def guard_outputs(self, seg: Segmentation) -> dict:
        """What the int8 guard compares between f32 and int8 (``pixel``: the final
        probabilities; ``patch``: intermediate ones over work items, optional)."""
        if seg.raster is not None:
            return {"pixel": seg.raster.probs}
        return {"pixel": seg.prob}

    @classmethod
    def calibration_feeds(cls, role: str, metadata: ModelMetadata, inputs: Mapping[str, Sequence], records, n: int,
                          seed: int, *, models: Mapping[str, Path] | None = None) -> tuple[list[dict], str]:
        """Calibration inputs of the ``role`` network (its ``inputs``: name -> shape) for
        int8 quantisation, read from ``records`` (training slides) as deployment feeds it:
        up to ``n`` samples drawn with ``seed``; ``models`` are the group's f32 model files
        by role (a network fed by another's output, e.g. H2G-Net's refinement, calibrates
        on that output).  Patches and views are uint8 (scaled to [0, 1] when fed)."""
        raise ExportError(f"{cls.label}: no int8 calibration for the {role} network")


# --------------------------------------------------------------------------------------
# Calibration helpers shared by the segmenters
# --------------------------------------------------------------------------------------
def pick(candidates: list, n: int, seed: int) -> list:
    """``n`` of ``candidates`` without replacement (all when fewer), in their order."""
    if len(candidates) <= n:
        return candidates
    keep = np.sort(np.random.default_rng(seed).choice(len(candidates), size=n, replace=False))
    return [candidates[i] for i in keep]


def read_picks(records, picks: list, read) -> list:
    """``read(slide, place)`` of every ``(slide index, place)`` pick, in order, each
    slide opened once (picks come sorted by slide)."""
    from h2g.io.slide import open_slide

    out = []
    for k in sorted({k for k, _ in picks}):
        with open_slide(records[k].slide_path, mpp=records[k].mpp) as slide:
            out += [read(slide, place) for j, place in picks if j == k]
    return out


def window_candidates(records, view: View, stride: int | None = None) -> list:
    """``(slide index, window centre)`` of every tissue window of ``view`` on ``records``."""
    from h2g.io.slide import open_slide
    from h2g.tiling.windows import window_grid

    candidates = []
    for k, record in enumerate(records):
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            grid = window_grid(slide, magnification=view.magnification, size=view.size, stride=stride or view.size)
            candidates += [(k, tuple(float(v) for v in c)) for c in grid.centres]
    return candidates


def inference_only_seconds(backend: Backend, batch, n_items: int, batch_size: int) -> Timed:
    """Wall and CPU seconds to predict ``n_items`` items in batches of ``batch_size`` from
    memory (``batch``, an array or ``{input name: array}`` of ``batch_size`` samples,
    repeated; the last batch partial as in the pipeline)."""
    full, rest = divmod(n_items, batch_size)
    with Timed() as timed:
        for _ in range(full):
            backend.predict(batch)
        if rest:
            backend.predict({k: v[:rest] for k, v in batch.items()} if isinstance(batch, dict) else batch[:rest])
    return timed


# --------------------------------------------------------------------------------------
# Raster outputs (sliding window, RAZN)
# --------------------------------------------------------------------------------------
def classes_of(metadata: ModelMetadata | None, n: int) -> list[dict]:
    """The metadata's classes, or ``class<i>`` names in a default palette; :class:`ExportError`
    when their number is not the model's output channels."""
    if metadata is not None and metadata.classes:
        if len(metadata.classes) != n:
            raise ExportError(f"the model outputs {n} classes but its metadata names "
                              f"{len(metadata.classes)}: {metadata.class_names}")
        return [dict(c) for c in metadata.classes]
    return [{"name": f"class{i}", "colour": list(PALETTE[i % len(PALETTE)])} for i in range(n)]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def slide_mpp(slide) -> float | None:
    """The slide's microns per pixel, None when it has no scale."""
    from h2g.core.errors import SlideError

    try:
        return slide.mpp
    except SlideError:
        return None


def raster_tumour_mm2(raster: Raster, class_names, mpp: float | None) -> float | None:
    """Area in mm^2 of the raster pixels whose arg-max is the tumour class (None: no class
    is named like tumour, or no mpp)."""
    from h2g.io.classes import tumour_index_of

    index = tumour_index_of(class_names)
    if index is None or not mpp:
        return None
    pixel_um2 = (raster.downsample * mpp) ** 2
    return float(np.count_nonzero(raster.class_mask(index))) * pixel_um2 / 1e6


def write_raster_outputs(seg: RasterSegmentation, slide, out_dir, extra: dict | None = None,
                         geojson_origin: str = "level0") -> dict[str, Path]:
    """Write a raster segmentation into ``out_dir`` (each file atomically):

    - ``probabilities.npy``: the raster ``(H, W, C)`` float32;
    - ``labels.tiff`` / ``labels.png``: the label image, uint8, 0 = not segmented (no
      tissue), ``i + 1`` = class ``i`` (the mapping is in ``summary.json``); the TIFF is
      pyramidal at the raster's resolution, so it overlays the slide;
    - ``probability_<class>.tiff``: each class's probability (grey level x 255), likewise;
    - ``overlay.png``: the label map in the classes' colours over the slide's thumbnail;
    - ``classes.geojson``: one QuPath annotation per class present (level-0 pixels, or
      QuPath's cropped frame with ``geojson_origin="bounds"``);
    - ``summary.json``: raster geometry, classes, class fractions, windows, timings."""
    import json

    from h2g.core.atomic import save_npy, write_json, write_text
    from h2g.io.geojson import class_geojson, origin_offset
    from h2g.io.overlay import write_label_overlay, write_map_tiff, write_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raster = seg.raster
    classes = classes_of(seg.metadata, raster.classes)
    labels = raster.label_map(fill=-1)
    image = (labels + 1).astype(np.uint8)
    mpp = slide_mpp(slide)
    paths = {"probabilities": out / "probabilities.npy", "labels_tiff": out / "labels.tiff",
             "labels_png": out / "labels.png", "overlay_png": out / "overlay.png",
             "geojson": out / "classes.geojson", "summary": out / "summary.json"}
    save_npy(paths["probabilities"], raster.probs)
    write_map_tiff(paths["labels_tiff"], image, mpp or 1.0, raster.downsample)
    write_png(paths["labels_png"], image)
    for i, cls in enumerate(classes):
        paths[f"probability_{_slug(cls['name'])}"] = write_map_tiff(
            out / f"probability_{_slug(cls['name'])}.tiff", raster.probs[..., i], mpp or 1.0, raster.downsample)
    write_label_overlay(paths["overlay_png"], slide, labels, [c["colour"] for c in classes])
    write_text(paths["geojson"], json.dumps(class_geojson(labels, raster.covered_extent, classes,
                                                          offset=origin_offset(slide, geojson_origin))))
    covered = int(raster.covered.sum())
    meta = seg.metadata
    summary = {
        "slide": str(slide.path),
        "dimensions": list(slide.dimensions),
        "system": meta.system if meta else None,
        "design": meta.design if meta else None,
        "raster": {"shape": list(raster.shape), "downsample": raster.downsample, "extent": list(raster.extent),
                   "mpp": None if mpp is None else mpp * raster.downsample},
        "views": [v.to_dict() for v in meta.views] if meta else [],
        "classes": [{**c, "label": i + 1} for i, c in enumerate(classes)],
        "label_values": {"0": "not segmented", **{str(i + 1): c["name"] for i, c in enumerate(classes)}},
        "class_fractions": {c["name"]: (float((labels == i).sum()) / covered if covered else 0.0)
                            for i, c in enumerate(classes)},
        "windows": seg.count,
        "no_tissue": seg.no_tissue,
        "tissue": seg.tissue,
        "timings": seg.timings,
        **(extra or {}),
        "files": {k: str(v) for k, v in paths.items()},
    }
    write_json(paths["summary"], summary)
    return paths


class RasterSegmenter(Segmenter):
    """What the segmenters whose result is a class-probability raster share: writing it,
    its tumour area and its console line."""

    def class_names(self, seg: RasterSegmentation) -> list[str]:
        return [c["name"] for c in classes_of(seg.metadata, seg.raster.classes)]

    def write(self, seg, slide, out_dir, extra=None):
        return write_raster_outputs(seg, slide, out_dir, extra={"backends": self.info(), **(extra or {})},
                                    geojson_origin=self.options.geojson_origin)

    def tumour_mm2(self, seg, slide):
        return raster_tumour_mm2(seg.raster, self.class_names(seg), slide_mpp(slide))

    def describe(self, seg):
        r = seg.raster
        return (f"{seg.count} {self.unit}, raster {r.shape[1]}x{r.shape[0]} at downsample {r.downsample:g}, "
                f"{seg.timings.get('total', 0.0):.2f} s ({self.engine_line()})")


# --------------------------------------------------------------------------------------
# The sliding window (DMMN, m-UNet, RAZN's baselines, any one-network system with views)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowOptions(SegmentOptions):
    """Sliding-window settings: ``stride`` / ``keep`` in target-view pixels (default: the
    stride the model was evaluated with, from its metadata, else the view's size; keep =
    stride), ``blend``; ``magnification`` / ``patch_size`` of the target view (default:
    the metadata's; another value needs ``force``); ``raster_downsample``: the class
    raster that many times coarser than the model's output (a slide-wide raster at 20x
    outgrows memory: :func:`h2g.inference.sliding.raster_stitcher` says so and how much)."""

    stride: int | None = None
    keep: int | None = None
    blend: Blend = Blend.CENTRE
    magnification: float | None = None
    patch_size: int | None = None
    raster_downsample: int = 1

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "blend", Blend.parse(self.blend, "blend"))
        for name in ("stride", "keep", "patch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {value}")


def override_views(metadata: ModelMetadata, magnification: float | None, patch_size: int | None, source: str,
                   force: bool = False) -> ModelMetadata:
    """The metadata with its target view's magnification / size replaced by the
    arguments (:func:`resolve`: a disagreement needs ``force``); the other views keep
    their ratios to it."""
    target = metadata.view()
    mag = resolve(magnification, target.magnification, None, "magnification", source, force)
    size = int(resolve(patch_size, target.size, None, "patch size", source, force))
    if mag == target.magnification and size == target.size:
        return metadata
    zoom, grow = mag / target.magnification, size / target.size
    views = tuple(View(v.name, v.magnification * zoom, max(1, round(v.size * grow)), v.padding)
                  for v in metadata.views)
    return metadata.replace(views=views)


class SlidingSegmenter(RasterSegmenter):
    """One segmentation network fed co-centred views, slid over the tissue
    (:func:`h2g.inference.sliding.sliding_segmentation`)."""

    label = "sliding-window segmentation"
    roles = required = ("segmentation",)
    main_role = "segmentation"
    Options = WindowOptions
    default_batch = 8
    unit = "windows"
    stages = ("tissue", "reading", "inference", "waiting", "stitching", "window_pipeline", "total")
    stage_labels = {
        "tissue": "tissue detection (+ model probe, window grid)",
        "reading": "window reading, every view (busy s, summed over readers)",
        "inference": "inference (busy s)",
        "waiting": "inference waiting for the readers",
        "stitching": "stitching and blending",
        "window_pipeline": "window reading + inference (wall, overlapped; stitches each batch)",
        "total": "total",
    }
    pipeline_stage = "window_pipeline"
    headline = ()

    def __init__(self, backends, options=None, metadata=None):
        super().__init__(backends, options, metadata)
        backend = self.backends["segmentation"]
        meta = self.metadata["segmentation"]
        if meta is None or not meta.views:
            raise ExportError(f"{backend.source}: no views in the model's metadata, so the windows to read are "
                              "unknown (export it with export/convert.py and a <model>.meta.json sidecar)")
        o = self.options
        self.run_metadata = override_views(meta, o.magnification, o.patch_size, backend.source, o.force)
        self.target = self.run_metadata.view()
        scale = self.target.size / meta.view().size
        trained = meta.extras.get("stride")
        self.stride = o.stride or (int(round(trained * scale)) if trained else None)

    @classmethod
    def accepts(cls, metas):
        return (len(metas) == 1 and "segmentation" in metas and metas["segmentation"] is not None
                and bool(metas["segmentation"].views) and metas["segmentation"].output == "pixel_probs")

    def segment(self, slide, *, tissue=None, progress=False):
        from h2g.inference.sliding import sliding_segmentation

        o = self.options
        timings: dict = {}
        t0 = time.perf_counter()
        if tissue is None:
            tissue = self.tissue_mask(slide)
        detection = time.perf_counter() - t0
        raster = sliding_segmentation(slide, self.main, self.run_metadata.views, target=self.target.name,
                                      stride=self.stride, keep=o.keep, blend=o.blend, tissue=tissue,
                                      batch_size=self.batch_size, readers=o.readers, progress=progress,
                                      timings=timings, raster_downsample=o.raster_downsample)
        timings["tissue"] += detection
        timings["total"] = time.perf_counter() - t0
        no_tissue = timings["windows"] == 0
        if no_tissue:
            log.warning("%s: no tissue found (no window over tissue); writing empty outputs", slide.path)
        return RasterSegmentation(count=timings["windows"], timings=timings, no_tissue=no_tissue,
                                  tissue=0.0 if no_tissue else tissue.fraction, raster=raster,
                                  metadata=self.run_metadata)

    def settings(self):
        return {**super().settings(), "views": [v.to_dict() for v in self.run_metadata.views],
                "target": self.target.name, "stride": self.stride}

    def windows(self, slide):
        """The window plan of ``slide`` (:func:`h2g.inference.sliding.plan_windows`)."""
        from h2g.inference.sliding import plan_windows

        o = self.options
        return plan_windows(slide, self.main, self.run_metadata.views, self.target, stride=self.stride, keep=o.keep,
                            blend=o.blend, tissue=self.tissue_mask(slide))

    def work_alone(self, slide, seg):
        from h2g.data.readers import ReadAhead
        from h2g.inference.sliding import feed_for, read_window_batch

        grid = self.windows(slide).grid
        if len(grid) != seg.count:
            raise ExportError(f"{self.main.source}: the benchmark's window grid has {len(grid)} windows, the "
                              f"pipeline ran {seg.count}")
        views, size, readers = self.run_metadata.views, self.batch_size, self.options.readers
        with Timed() as read_only, ReadAhead(
                lambda start: read_window_batch(slide, grid.centres[start:start + size], views),
                range(0, len(grid), size), readers=readers, depth=2 * readers) as batches:
            for _ in batches:
                pass
        inference_only = Timed()
        if len(grid):
            feed = feed_for(self.main, read_window_batch(slide, grid.centres[:size], views))
            inference_only = inference_only_seconds(self.main, feed, len(grid), size)
        return read_only, inference_only

    def setup(self, seg):
        meta, target = seg.metadata, self.target
        stride = self.stride or target.size
        o = self.options
        return {"views": [v.to_dict() for v in meta.views], "target_view": target.name,
                "classes": meta.class_names or [f"class{i}" for i in range(seg.raster.classes)],
                "stride": stride, "keep": (o.keep or stride) if o.blend == Blend.CENTRE else None,
                "blend": str(o.blend),
                "raster": {"shape": list(seg.raster.shape), "downsample": seg.raster.downsample}}

    @classmethod
    def calibration_feeds(cls, role, metadata, inputs, records, n, seed, *, models=None):
        from h2g.data.views import read_views

        views = metadata.views
        candidates = window_candidates(records, metadata.view())

        def read(slide, centre):
            views_read = read_views(slide, centre, views)
            return {v.name: views_read[v.name][None] for v in views}

        feeds = read_picks(records, pick(candidates, n, seed), read)
        if list(inputs) == ["image"]:
            feeds = [{"image": f[views[0].name]} for f in feeds]
        described = ", ".join(f"{v.name} {v.size}px at {v.magnification:g}x" for v in views)
        return feeds, f"{len(feeds)} windows ({described}) over the tissue of {len(records)} training slides, seed {seed}"
