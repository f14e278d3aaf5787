"""The deployment tools' shared command-line options, turned into typed options once, at
the edge.

``export/segment_slide.py``, ``export/segment_cohort.py`` and ``export/benchmark.py``
take the same options (:func:`add_deploy_arguments`): the models, how they run
(:class:`h2g.inference.segmenter.EngineOptions`), how slides are opened
(:class:`SlideOptions`) and the segmentation settings.  :func:`deployment` turns the
parsed arguments into a :class:`Deployment` - plain typed values that pickle to a Ray or
process-pool worker - and :meth:`Deployment.segmenter` builds the segmenter the models'
metadata names (:func:`h2g.systems.registry.load_segmenter`), whose typed options
refuse a setting that does not apply to the system.  No argparse object goes further.
Runs without TensorFlow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from h2g.core.errors import ConfigError
from h2g.inference.segmenter import EngineOptions

#: The segmentation settings a tool passes on by name (None = not given: the models'
#: metadata or the system's default decides).
SEGMENT_SETTINGS = ("magnification", "patch_size", "heatmap_stride", "size", "batch_size", "readers", "stride",
                    "keep", "blend", "keep_ink", "force", "threshold", "raster_downsample", "geojson_origin")


@dataclass(frozen=True)
class SlideOptions:
    """How slides are opened: ``mpp`` is a fallback for slides whose file states no scale
    (never an override: a slide's own scale wins), ``force_mpp`` overrides every slide's
    scale, ``reader`` how regions are read (:class:`h2g.io.slide.Reader`)."""

    mpp: float | None = None
    force_mpp: float | None = None
    reader: str = "tiles"

    def __post_init__(self):
        for name in ("mpp", "force_mpp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        from h2g.io.slide import Reader

        object.__setattr__(self, "reader", Reader.parse(self.reader, "reader"))

    def open(self, path, mpp: float | None = None):
        """The slide at ``path``; ``mpp`` (a manifest's, which overrides the file's scale)
        wins over ``force_mpp``, which wins over the file; ``self.mpp`` only fills in."""
        from h2g.io.slide import Slide

        override = mpp if mpp is not None else self.force_mpp
        return Slide(path, mpp=override, reader=self.reader, default_mpp=self.mpp)


@dataclass(frozen=True)
class Deployment:
    """Everything a tool was told about its models, resolved at the edge: the model
    files (a list, roles from their metadata, or ``{role: path}``), the engine, the slide
    options and the segmentation settings given (by name)."""

    models: tuple | dict
    engine: EngineOptions = field(default_factory=EngineOptions)
    slides: SlideOptions = field(default_factory=SlideOptions)
    settings: dict = field(default_factory=dict)

    def segmenter(self):
        """The segmenter the models' metadata names, with these settings."""
        from h2g.systems.registry import load_segmenter

        return load_segmenter(self.models, self.engine, self.settings)

    def with_models(self, models) -> "Deployment":
        return Deployment(models, self.engine, self.slides, dict(self.settings))

    def files(self) -> list[Path]:
        """The model files (an OpenVINO ``.xml`` without its ``.bin``)."""
        models = self.models.values() if isinstance(self.models, dict) else self.models
        return [Path(m) for m in models]


def add_deploy_arguments(parser, *, models: bool = True) -> None:
    """The options of the deployment tools (see the module doc); ``models``: also
    ``--patch-model`` / ``--refine-model`` (H2G-Net's models by role, for files without
    metadata)."""
    from h2g.inference.backends import DEVICES, HINTS, PRECISIONS, PROVIDERS
    from h2g.inference.sliding import BLENDS
    from h2g.io.slide import READERS

    if models:
        parser.add_argument("--patch-model", type=Path, default=None, help="H2G-Net patch classifier (.onnx or .xml)")
        parser.add_argument("--refine-model", type=Path, default=None, help="H2G-Net refinement network (.onnx or .xml)")
    parser.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    parser.add_argument("--device", choices=DEVICES, default="CPU")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="ONNX Runtime on --device GPU: the execution provider (auto: TensorRT where it takes "
                             "the model, CUDA for the rest; tensorrt; cuda); a missing one is an error, never a "
                             "silent fallback to the CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="OpenVINO inference precision (default: the engine's choice, bf16 on CPUs that have it; "
                             "always recorded)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument("--patch-hint", choices=HINTS, default="throughput",
                        help="performance hint of the main network (the patch classifier, a sliding-window model; "
                             "default throughput: sub-batches on concurrent streams, which lose less to the readers "
                             "sharing the cores); the others always run latency")
    parser.add_argument("--patch-sub-batch", type=int, default=None, metavar="N",
                        help="throughput hint: the main network's sub-batch size, run concurrently on the streams "
                             "(default: the engine's, 1 on CPU; the fastest size depends on the CPU and precision: "
                             "tools/bench_sub_batch.py measures it)")
    parser.add_argument("--mpp", type=float, default=None,
                        help="microns per pixel for slides whose file states no scale (a fallback: a slide's own "
                             "scale is kept)")
    parser.add_argument("--force-mpp", type=float, default=None,
                        help="microns per pixel for every slide, overriding the files' own scale")
    parser.add_argument("--reader", choices=READERS, default="tiles",
                        help="how patches are read: tiles (default) cuts them from decoded TIFF / SVS tiles on a "
                             "level's pixel grid (OpenSlide's pixels, faster), else OpenSlide; reduced also decodes "
                             "JPEG tiles at 1/2-1/8 scale for a magnification without its own level (pixels "
                             "differ slightly from training's OpenSlide + area resize); openslide: OpenSlide only")
    parser.add_argument("--magnification", type=float, default=None,
                        help="patch / window magnification (default: the model's metadata; another value needs --force)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="patch / window size (default: the model's metadata; another value needs --force)")
    parser.add_argument("--force", action="store_true",
                        help="run at a magnification or patch size the model was not trained at")
    parser.add_argument("--heatmap-stride", type=int, default=None,
                        help="H2G-Net: px between patch centres (default: the refinement model's metadata, "
                             "else the patch size: non-overlapping patches)")
    parser.add_argument("--size", type=int, default=None,
                        help="H2G-Net: refinement resolution (default: the refinement model's input size, else 1024)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="H2G-Net: tumour probability threshold of the mask (default 0.5); RAZN: the policy's "
                             "zoom threshold (default: its metadata's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="patches / windows / regions per inference batch (default: the system's: 32 H2G-Net, "
                             "8 others)")
    parser.add_argument("--readers", type=int, default=None, help="patch / window reader threads (default 2)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding window: stride in target-view pixels (default: the model's, else its view size)")
    parser.add_argument("--keep", type=int, default=None,
                        help="sliding window, blend centre: central pixels kept per window (default: the stride)")
    parser.add_argument("--blend", choices=BLENDS, default=None,
                        help="sliding window: how overlapping predictions combine (default centre)")
    parser.add_argument("--raster-downsample", type=int, default=None,
                        help="sliding window / RAZN: the class raster N times coarser than the model's output "
                             "(default 1; a slide-wide raster that would not fit in memory is refused with the N "
                             "that fits)")
    parser.add_argument("--keep-ink", action="store_true",
                        help="keep green / blue / black pixels in the tissue mask (by default they are dropped as "
                             "pen ink; use this for images that are not H&E)")
    parser.add_argument("--geojson-origin", choices=("level0", "bounds"), default=None,
                        help="the written GeoJSON's coordinates: level-0 pixels (default) or QuPath's frame cropped "
                             "to the slide's OpenSlide bounds (MRXS and other formats with openslide.bounds-x/y)")


#: Accepted ranges of the size options (checked before any model loads: --size 100000
#: would need a 120 GB float image, --size 0 cannot be resized to).  The refinement size's
#: range is the one H2G-Net's segmenter accepts (:data:`h2g.inference.lowres.MAX_SIZE`).
RANGES = {"size": (16, 8192), "patch_size": (8, 2048), "batch_size": (1, 1024), "readers": (1, 64),
          "stride": (1, 8192), "keep": (1, 8192)}


def check_ranges(args) -> None:
    """:class:`ConfigError` (one line naming the option and its range) for a given size
    option of :data:`RANGES` outside it."""
    for name, (low, high) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"--{name.replace('_', '-')} {value:g}: must be from {low} to {high}")


def deployment(args, models=()) -> Deployment:
    """The :class:`Deployment` of parsed :func:`add_deploy_arguments` options and the
    model files given as arguments (or ``--patch-model`` / ``--refine-model``)."""
    check_ranges(args)
    models = [Path(m) for m in models]
    by_role = {role: p for role, p in (("patch_classifier", getattr(args, "patch_model", None)),
                                       ("refinement", getattr(args, "refine_model", None))) if p is not None}
    if by_role:
        if models:
            raise ConfigError("give the models either as arguments or with --patch-model / --refine-model")
        if len(by_role) != 2:
            raise ConfigError("H2G-Net needs both --patch-model and --refine-model")
        chosen: tuple | dict = by_role
    elif models:
        chosen = tuple(models)
    else:
        raise ConfigError("no model given (MODEL... or --patch-model / --refine-model)")
    for path in (chosen.values() if isinstance(chosen, dict) else chosen):
        if not Path(path).is_file():
            raise ConfigError(f"{path}: model file not found")
    engine = EngineOptions(engine=args.engine, device=args.device, precision=args.precision, threads=args.threads,
                           hint=args.patch_hint, provider=args.provider, sub_batch=args.patch_sub_batch)
    slides = SlideOptions(mpp=args.mpp, force_mpp=args.force_mpp, reader=args.reader)
    settings = {k: getattr(args, k, None) for k in SEGMENT_SETTINGS}
    return Deployment(chosen, engine, slides, settings)
