"""INT8 post-training quantisation of exported models, with a measured accuracy guard.

``export/convert.py --int8`` runs this after the f32 conversion (:mod:`h2g.export.conversion`):

- **Calibration** (:func:`calibration_feeds`): inputs read from the run's *training* slides,
  as deployment feeds the model - tissue patches at the patch classifier's view; the
  low-resolution image and the f32 patch classifier's heatmap for a refinement network
  (plus their mirror); the views around tissue windows for a sliding-window model.
  ``n`` samples drawn without replacement from every candidate of every training slide
  with ``numpy.random.default_rng(seed)``: the same seed gives the same calibration set.
- **OpenVINO**: NNCF post-training quantisation (``nncf.quantize``, its default preset)
  of the f32 IR -> ``<stem>_int8.xml/.bin``.  **ONNX**: ONNX Runtime's static QDQ
  quantisation (``quant_pre_process``, then ``quantize_static``: per-channel int8
  weights, uint8 activations, min-max calibration) -> ``<stem>_int8.onnx``.  Both keep
  the model's metadata, with ``extras["quantization"]`` saying how it was made (the
  backends then report precision ``int8+<rest>``).
- **Guard** (:func:`guard`): each folder's models are run as deployment runs them
  (H2G-Net: heatmap + refinement; a patch classifier alone: its heatmap; an image-only
  network; a sliding-window model) over the run's *test* slides, f32 models at f32 and
  int8 models at the engine's default precision, per engine.  It passes when the mean
  tumour Dice (and, for multi-class models, every class's mean IoU) of the int8 models is
  within ``tolerance`` (0.01) of the f32 models'.  Reported: those figures, and the
  absolute difference of the outputs (patch probabilities of the patch classifier over
  tissue cells, pixel probabilities of the final output): max and 99th percentile.  A
  failing group's int8 files are removed (the f32 models stay) and the conversion fails.

NNCF (``pip install "h2g[int8]"``) is needed for OpenVINO; ONNX Runtime's quantiser
comes with onnxruntime (+ the ``onnx`` package of the training stack).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h2g.core.errors import ConfigError, ExportError
from h2g.export.metadata import ModelMetadata, embed_onnx, embed_openvino

log = logging.getLogger("h2g")

INT8_SUFFIX = "_int8"
DEFAULT_SAMPLES = 300
TOLERANCE = 0.01
ENGINES = ("openvino", "onnxruntime")
QUANTISED_ROLES = ("patch_classifier", "refinement", "segmentation")


@dataclass(frozen=True)
class Int8Options:
    """What ``--int8`` was given: the manifest and seed (default: the run's config.json),
    the number of calibration samples, the guard's tolerance, the annotation downsample."""

    manifest: Path | None = None
    seed: int | None = None
    samples: int = DEFAULT_SAMPLES
    tolerance: float = TOLERANCE
    engines: tuple[str, ...] = ENGINES


# --------------------------------------------------------------------------------------
# The run a model belongs to
# --------------------------------------------------------------------------------------
@dataclass
class RunData:
    """The slides a run was trained and tested on (from its manifest) and its settings."""

    manifest_path: Path
    seed: int
    annotation_downsample: float = 4.0
    evaluation_size: int = 512  # patch-wise designs are scored at the refinement size
    train: list = field(default_factory=list)
    test: list = field(default_factory=list)
    classes: object = None


def run_config(model_path: Path) -> dict:
    """The ``config.json`` of the run folder ``model_path`` is in (searched upwards), or {}."""
    for folder in Path(model_path).resolve().parents:
        candidate = folder / "config.json"
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError):
                return {}
    return {}


def run_data(model_path: Path, options: Int8Options) -> RunData:
    """The manifest, seed and slides for calibrating and guarding ``model_path``'s models;
    :class:`ConfigError` when no manifest is given or recorded, or it lacks the slides."""
    from h2g.io.manifest import load_manifest

    config = run_config(model_path)
    manifest = options.manifest or (Path(config["manifest"]) if config.get("manifest") else None)
    if manifest is None:
        raise ConfigError(f"{model_path}: --int8 needs the run's manifest (its training slides calibrate, its "
                          "test slides guard the accuracy) and no config.json above the model names one: "
                          "give --manifest")
    loaded = load_manifest(manifest)
    train, test = loaded.split("train"), [r for r in loaded.split("test") if r.annotation_path is not None]
    if not train:
        raise ConfigError(f"{manifest}: no training slide to calibrate the int8 models on")
    if not test:
        raise ConfigError(f"{manifest}: no annotated test slide to check the int8 models' accuracy on")
    seed = options.seed if options.seed is not None else int(config.get("seed", 0))
    return RunData(Path(manifest), seed, float(config.get("patches", {}).get("annotation_downsample", 4.0)),
                   int(config.get("refine", {}).get("size", 512)), train, test, loaded.classes)


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------
def _pick(candidates: list, n: int, seed: int) -> list:
    """``n`` of ``candidates`` without replacement (all when fewer), in their order."""
    if len(candidates) <= n:
        return candidates
    keep = np.sort(np.random.default_rng(seed).choice(len(candidates), size=n, replace=False))
    return [candidates[i] for i in keep]


def _read_picks(records, picks: list, read) -> list:
    """``read(slide, place)`` of every ``(slide index, place)`` pick, in order, each
    slide opened once (picks come sorted by slide)."""
    from h2g.io.slide import open_slide

    out = []
    for k in sorted({k for k, _ in picks}):
        with open_slide(records[k].slide_path, mpp=records[k].mpp) as slide:
            out += [read(slide, place) for j, place in picks if j == k]
    return out


def _patch_feeds(records, view, n: int, seed: int) -> list[dict]:
    from h2g.io.slide import open_slide
    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import detect_tissue

    candidates = []
    for k, record in enumerate(records):
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            grid = build_patch_grid(slide, tissue=detect_tissue(slide), magnification=view.magnification,
                                    patch_size=view.size)
            candidates += [(k, tuple(int(v) for v in c)) for c in grid.coords]
    return _read_picks(records, _pick(candidates, n, seed), lambda slide, coord: {
        "image": slide.read_region(coord, (view.size, view.size), view.magnification)[None]})


def _window_feeds(records, views, n: int, seed: int) -> list[dict]:
    from h2g.data.views import read_views
    from h2g.io.slide import open_slide
    from h2g.tiling.windows import window_grid

    target = views[0]
    candidates = []
    for k, record in enumerate(records):
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            grid = window_grid(slide, magnification=target.magnification, size=target.size)
            candidates += [(k, tuple(float(v) for v in c)) for c in grid.centres]
    def read(slide, centre):
        views_read = read_views(slide, centre, views)
        return {v.name: views_read[v.name][None] for v in views}

    return _read_picks(records, _pick(candidates, n, seed), read)


def _refinement_feeds(records, size: int, heatmap_backend, patch_view, heatmap_stride=None) -> list[dict]:
    from h2g.inference.heatmap import slide_heatmap
    from h2g.inference.lowres import refinement_inputs
    from h2g.io.slide import open_slide

    feeds = []
    for record in records:
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            heatmap = None
            if heatmap_backend is not None:
                heatmap = slide_heatmap(slide, heatmap_backend, magnification=patch_view.magnification,
                                        patch_size=patch_view.size, stride=heatmap_stride, progress=False)
            image, heat = refinement_inputs(slide, heatmap, size=size)
        for flip in (False, True):
            im, ht = (image[:, ::-1], heat[:, ::-1]) if flip else (image, heat)
            feed = {"image": np.ascontiguousarray(im[None], np.float32)}
            if heatmap_backend is not None:
                feed["heatmap"] = np.ascontiguousarray(ht[None], np.float32)
            feeds.append(feed)
    return feeds


def calibration_feeds(metadata: ModelMetadata, input_names, data: RunData, n: int, *,
                      size: int | None = None, heatmap_backend=None, patch_view=None) -> tuple[list[dict], str]:
    """Calibration inputs for one model (see the module doc) and a description of them.
    Patches and views are uint8 (scaled by :func:`as_model_input`); refinement inputs are
    float32 already."""
    if metadata.role == "refinement":
        feeds = _refinement_feeds(data.train, size, heatmap_backend if "heatmap" in input_names else None,
                                  patch_view, metadata.extras.get("heatmap_stride"))
        return feeds, (f"low-resolution images {size} px of {len(data.train)} training slides"
                       + (" + the f32 patch classifier's heatmaps" if "heatmap" in input_names else "")
                       + ", and their mirrors")
    if not metadata.views:
        raise ExportError(f"{metadata.system} {metadata.role}: no views in the metadata, so the calibration "
                          "inputs are unknown")
    if metadata.role == "segmentation" and len(input_names) >= 1 and metadata.output == "pixel_probs":
        views = metadata.views
        feeds = _window_feeds(data.train, views, n, data.seed)
        if list(input_names) == ["image"]:
            feeds = [{"image": f[views[0].name]} for f in feeds]
        return feeds, (f"{len(feeds)} windows ({', '.join(f'{v.name} {v.size}px at {v.magnification:g}x' for v in views)})"
                       f" over the tissue of {len(data.train)} training slides, seed {data.seed}")
    view = metadata.views[0]
    feeds = _patch_feeds(data.train, view, n, data.seed)
    return feeds, (f"{len(feeds)} tissue patches {view.size}px at {view.magnification:g}x of "
                   f"{len(data.train)} training slides, seed {data.seed}")


def as_model_input(feed: dict) -> dict:
    """A calibration feed as the model takes it: uint8 images to float32 in [0, 1]."""
    return {k: (v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v) for k, v in feed.items()}


# --------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------
def int8_path(path: Path) -> Path:
    """``<stem>_int8<suffix>`` beside ``path``."""
    path = Path(path)
    return path.with_name(path.stem + INT8_SUFFIX + path.suffix)


def _tagged(metadata: ModelMetadata, how: str, samples: int, seed: int) -> ModelMetadata:
    return metadata.replace(extras={**metadata.extras, "quantization": {
        "precision": "int8", "method": how, "calibration_samples": samples, "seed": seed}})


def quantize_openvino(xml_path: Path, feeds: list[dict], metadata: ModelMetadata, seed: int) -> Path:
    """NNCF post-training quantisation of an f32 IR -> ``<stem>_int8.xml``."""
    try:
        import nncf
    except ImportError:
        raise ExportError("OpenVINO int8 needs NNCF: pip install \"h2g[int8]\" (or pass --int8-engines onnxruntime)") from None
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(str(xml_path))
    dataset = nncf.Dataset(feeds, as_model_input)
    try:
        quantised = nncf.quantize(model, dataset, subset_size=len(feeds))
    except Exception as exc:  # NNCF raises many types
        raise ExportError(f"{xml_path}: NNCF cannot quantise the model: {exc}") from None
    embed_openvino(quantised, _tagged(metadata, f"NNCF {nncf.__version__} post-training quantisation",
                                      len(feeds), seed))
    target = int8_path(xml_path)
    ov.save_model(quantised, str(target), compress_to_fp16=False)
    return target


class _Reader:
    """ONNX Runtime's calibration data reader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        feed = next(self._feeds, None)
        return None if feed is None else as_model_input(feed)


def quantize_onnx(onnx_path: Path, feeds: list[dict], metadata: ModelMetadata, seed: int) -> Path:
    """ONNX Runtime static QDQ quantisation of an f32 ONNX file -> ``<stem>_int8.onnx``."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = int8_path(onnx_path)
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(Path(work) / "int8.onnx"), _Reader(feeds),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            # (its calibration keeps only each sample's per-tensor min / max; its option
            # CalibMaxIntermediateOutputs would discard them in ONNX Runtime 1.31)
        except Exception as exc:  # onnxruntime's quantiser raises many types
            raise ExportError(f"{onnx_path}: ONNX Runtime cannot quantise the model: {exc}") from None
        os.replace(Path(work) / "int8.onnx", target)
    embed_onnx(target, _tagged(metadata, f"ONNX Runtime {onnxruntime.__version__} static QDQ quantisation "
                                         "(per-channel int8 weights, uint8 activations, min-max)", len(feeds), seed))
    return target


# --------------------------------------------------------------------------------------
# The guard: the test slides, as deployment segments them
# --------------------------------------------------------------------------------------
@dataclass
class Group:
    """The deployable models of one folder (f32 files per engine, report entries)."""

    folder: Path
    entries: dict  # role -> conversion report entry

    def path(self, role: str, engine: str, int8: bool = False) -> Path:
        entry = self.entries[role]
        path = Path(entry["openvino" if engine == "openvino" else "onnx"])
        return int8_path(path) if int8 else path

    @property
    def kind(self) -> str:
        roles = set(self.entries)
        if "segmentation" in roles:
            return "sliding"
        if roles == {"patch_classifier", "refinement"}:
            return "h2g"
        return "patch" if "patch_classifier" in roles else "lowres"


def groups(entries: list[dict]) -> list[Group]:
    """The conversion report's deployable entries, grouped by folder."""
    found: dict[Path, dict] = {}
    for entry in entries:
        role = entry["metadata"].get("role")
        if role in QUANTISED_ROLES:
            found.setdefault(Path(entry["onnx"]).parent, {})[role] = entry
    return [Group(folder, roles) for folder, roles in sorted(found.items())]


def _backend(path: Path, engine: str, int8: bool):
    from h2g.inference.backends import make_backend

    # f32 models at f32; int8 models as deployment runs them (OpenVINO's default precision
    # for the layers left in floating point)
    return make_backend(path, engine=engine, device="CPU", precision=None if int8 else "f32")


def _diff_stats(diffs: list[np.ndarray]) -> dict | None:
    if not diffs:
        return None
    values = np.concatenate([d.ravel() for d in diffs])
    if not values.size:
        return None
    return {"max": float(values.max()), "p99": float(np.percentile(values, 99)), "n": int(values.size)}


def _backends(group: Group, engine: str, int8: bool) -> dict:
    """The group's models on ``engine`` (int8 or f32), compiled once for every slide."""
    return {role: _backend(group.path(role, engine, int8), engine, int8) for role in group.entries}


def _heatmap_stride(group: Group, role: str) -> int | None:
    """The heatmap stride the ``role`` model of ``group`` was trained with (its
    metadata's ``heatmap_stride``; None: the paper's non-overlapping patches)."""
    return ModelMetadata.from_dict(group.entries[role]["metadata"]).extras.get("heatmap_stride")


def _predict(group: Group, backends: dict, slide, data: RunData) -> dict:
    """One slide through ``group``'s models on ``engine``: probabilities to compare
    (``patch``: tissue-cell patch probabilities; ``pixel``: the final output) and the
    binary tumour prediction / label map to score."""
    from h2g.export.deploy import segment, segment_windows
    from h2g.inference.heatmap import slide_heatmap
    from h2g.inference.lowres import refine, refinement_inputs

    kind = group.kind
    if kind == "sliding":
        seg = segment_windows(slide, backends["segmentation"], progress=False)
        return {"pixel": seg.raster.probs, "raster": seg.raster, "metadata": seg.metadata}
    out = {}
    patch_backend, refine_backend = backends.get("patch_classifier"), backends.get("refinement")
    if patch_backend is not None:
        view = ModelMetadata.from_dict(group.entries["patch_classifier"]["metadata"]).views[0]
    if kind == "h2g":
        stride = _heatmap_stride(group, "refinement")
        seg = segment(slide, patch_backend, refine_backend, size=refine_backend.image_size or data.evaluation_size,
                      magnification=view.magnification, patch_size=view.size, heatmap_stride=stride,
                      progress=False)
        out.update(patch=seg.heatmap.probs, pixel=seg.prob, size=seg.prob.shape[0])
    elif kind == "patch":
        stride = _heatmap_stride(group, "patch_classifier")
        heatmap = slide_heatmap(slide, patch_backend, magnification=view.magnification, patch_size=view.size,
                                stride=stride, progress=False)
        _, heat = refinement_inputs(slide, heatmap, size=data.evaluation_size)
        out.update(patch=heatmap.probs, pixel=heat[..., 0], size=data.evaluation_size)
    else:  # an image-only low-resolution network
        size = refine_backend.image_size or data.evaluation_size
        image, _ = refinement_inputs(slide, None, size=size)
        out.update(pixel=refine(refine_backend, image), size=size)
    return out


def _truth(group: Group, prediction: dict, record, slide, data: RunData):
    """What a slide's predictions are scored against (read once for f32 and int8): the
    label map for a sliding-window model, else the tumour mask at the output's size."""
    if group.kind == "sliding":
        from h2g.io.annotation import load_annotation

        return load_annotation(record.annotation_path, slide, downsample=data.annotation_downsample,
                               classes=data.classes)
    from h2g.inference.lowres import target_mask

    return target_mask(record.annotation_path, slide, prediction["size"], data.annotation_downsample)


def _scores(group: Group, prediction: dict, truth) -> dict:
    from h2g.evaluation import metrics

    if group.kind == "sliding":
        from h2g.io.classes import tumour_index_of

        names = prediction["metadata"].class_names or [str(i) for i in range(prediction["raster"].classes)]
        pred, labels = metrics.raster_labels(prediction["raster"], truth, names)
        confusion = metrics.confusion_matrix(pred, labels, len(names))
        tumour = tumour_index_of(names)
        dice = metrics.tumour_scores(confusion, tumour)["dice"] if tumour is not None else None
        return {"dice": dice, "confusion": confusion, "names": names}
    return {"dice": metrics.segmentation_metrics(metrics.binarise(prediction["pixel"]), truth)["dice"]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else None


def guard(group: Group, engine: str, data: RunData, tolerance: float = TOLERANCE, progress: bool = True) -> dict:
    """f32 against int8 on ``engine`` over the run's test slides (see the module doc)."""
    from tqdm.auto import tqdm

    from h2g.io.slide import open_slide

    f32_backends, int8_backends = _backends(group, engine, False), _backends(group, engine, True)
    per_slide, patch_diffs, pixel_diffs = [], [], []
    for record in tqdm(data.test, desc=f"int8 guard ({engine})", unit="slide", disable=not progress):
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            f32 = _predict(group, f32_backends, slide, data)
            int8 = _predict(group, int8_backends, slide, data)
            truth = _truth(group, f32, record, slide, data)
            row = {"slide_id": record.slide_id, "f32": _scores(group, f32, truth),
                   "int8": _scores(group, int8, truth)}
        if "patch" in f32:
            cells = (f32["patch"] != 0) | (int8["patch"] != 0)  # cells with a patch (0 off tissue)
            patch_diffs.append(np.abs(f32["patch"][cells] - int8["patch"][cells]))
        pixel_diffs.append(np.abs(f32["pixel"].astype(np.float64) - int8["pixel"]))
        per_slide.append(row)
    result = {"engine": engine, "slides": len(per_slide), "tolerance": tolerance}
    checks = []
    for variant in ("f32", "int8"):
        result[f"dice_{variant}"] = _mean(r[variant]["dice"] for r in per_slide)
    if result["dice_f32"] is not None:
        checks.append(("tumour Dice", result["dice_f32"], result["dice_int8"]))
    if group.kind == "sliding" and per_slide:  # per-class IoU over the pooled test pixels
        from h2g.evaluation.metrics import ClassScores

        names = per_slide[0]["f32"]["names"]
        for variant in ("f32", "int8"):
            pooled = ClassScores.from_confusion(sum(r[variant]["confusion"] for r in per_slide), names)
            result[f"iou_{variant}"] = {n: float(v) for n, v, here in zip(names, pooled.iou, pooled.present) if here}
        checks += [(f"{n} IoU", v, result["iou_int8"].get(n)) for n, v in result["iou_f32"].items()]
        for row in per_slide:
            for variant in ("f32", "int8"):
                row[variant] = {"dice": row[variant]["dice"]}
    result["patch_prob_diff"] = _diff_stats(patch_diffs)
    result["pixel_prob_diff"] = _diff_stats(pixel_diffs)
    failures = [f"{what} {a:.4f} (f32) vs {b if b is None else round(b, 4)} (int8)" for what, a, b in checks
                if b is None or abs(a - b) > tolerance]
    result["passed"] = not failures
    result["failures"] = failures
    result["per_slide"] = per_slide
    return result


# --------------------------------------------------------------------------------------
# The whole --int8 step
# --------------------------------------------------------------------------------------
def quantize_entries(entries: list[dict], options: Int8Options, progress: bool = True) -> list[dict]:
    """Quantise every deployable model of the conversion ``entries`` on each engine of
    ``options.engines``, calibrate on the run's training slides, guard on its test slides;
    returns one report entry per folder and engine.  A group that fails the guard has its
    int8 files removed; :func:`check_guards` then raises."""
    bad = set(options.engines) - set(ENGINES)
    if bad or not options.engines:
        raise ConfigError(f"int8 engines must be among {', '.join(ENGINES)}, got {', '.join(options.engines)}")
    if options.samples < 1:
        raise ConfigError(f"--calibration-samples must be >= 1, got {options.samples}")
    report = []
    for group in groups(entries):
        first = next(iter(group.entries.values()))
        data = run_data(Path(first["keras"]), options)
        made: dict[str, list[Path]] = {e: [] for e in options.engines}
        calibration = {}
        order = [r for r in ("patch_classifier", "refinement", "segmentation") if r in group.entries]
        for role in order:
            entry = group.entries[role]
            metadata = ModelMetadata.from_dict(entry["metadata"])
            names = list(entry["inputs"])
            heat_backend = patch_view = None
            size = entry["inputs"]["image"][1] if role == "refinement" else None
            if role == "refinement" and "heatmap" in names:
                if "patch_classifier" not in group.entries:
                    raise ExportError(f"{entry['keras']}: a refinement network needs its patch classifier in the "
                                      "same folder to calibrate on real heatmaps")
                heat_backend = _backend(group.path("patch_classifier", "openvino"), "openvino", False)
                patch_view = ModelMetadata.from_dict(group.entries["patch_classifier"]["metadata"]).views[0]
            feeds, described = calibration_feeds(metadata, names, data, options.samples, size=size,
                                                 heatmap_backend=heat_backend, patch_view=patch_view)
            calibration[role] = described
            for engine in options.engines:
                if engine == "openvino":
                    made[engine].append(quantize_openvino(group.path(role, engine), feeds, metadata, data.seed))
                else:
                    made[engine].append(quantize_onnx(group.path(role, engine), feeds, metadata, data.seed))
        for engine in options.engines:
            result = guard(group, engine, data, options.tolerance, progress=progress)
            result.update(folder=str(group.folder), kind=group.kind, manifest=str(data.manifest_path),
                          calibration=calibration, models=[str(p) for p in made[engine]])
            if not result["passed"]:
                for path in made[engine]:
                    for file in (path, path.with_suffix(".bin")):
                        file.unlink(missing_ok=True)
                result["models"] = []
                result["removed"] = [str(p) for p in made[engine]]
            report.append(result)
    return report


def check_guards(report: list[dict], report_path: Path) -> None:
    """:class:`ExportError` naming every folder / engine whose int8 models failed the guard."""
    failed = [r for r in report if not r["passed"]]
    if failed:
        lines = "; ".join(f"{r['folder']} ({r['engine']}): {', '.join(r['failures'])}" for r in failed)
        raise ExportError(f"int8 accuracy guard failed (|int8 - f32| > {failed[0]['tolerance']:g}): {lines}; "
                          f"their int8 files were removed and the f32 models kept; see {report_path}")


def summary_lines(report: list[dict]) -> list[str]:
    """One line per folder and engine for the console."""
    lines = []
    for r in report:
        dice = (f"tumour Dice f32 {r['dice_f32']:.4f} int8 {r['dice_int8']:.4f}"
                if r["dice_f32"] is not None and r["dice_int8"] is not None else "no tumour Dice")
        diffs = ", ".join(f"{k.split('_')[0]} prob |diff| max {v['max']:.4f} p99 {v['p99']:.4f}"
                          for k, v in (("patch_prob_diff", r["patch_prob_diff"]), ("pixel_prob_diff", r["pixel_prob_diff"]))
                          if v)
        lines.append(f"int8 {r['engine']} {r['folder']}: {dice} over {r['slides']} test slides; {diffs}; "
                     + ("guard passed" if r["passed"] else "guard FAILED: " + "; ".join(r["failures"])))
    return lines
