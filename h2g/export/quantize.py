"""INT8 post-training quantisation of exported models, with a measured accuracy guard.

``export/convert.py --int8`` runs this after the f32 conversion (:mod:`h2g.export.conversion`):

- **Calibration**: inputs read from the run's *training* slides, as deployment feeds each
  network - the segmenter of the models' system says how
  (:meth:`h2g.inference.segmenter.Segmenter.calibration_feeds`): tissue patches at the
  patch classifier's view; the low-resolution image and the f32 patch classifier's
  heatmap for a refinement network (plus their mirror); the views around tissue windows
  for a sliding-window model; RAZN's regions ``x0`` for its policy and coarse networks and
  the quarters of their zoom ``x1`` for its fine network.  ``n`` samples drawn without
  replacement from every candidate of every training slide with
  ``numpy.random.default_rng(seed)``: the same seed gives the same calibration set.
- **OpenVINO**: NNCF post-training quantisation (``nncf.quantize``, its default preset,
  overflow fix on every layer: :data:`OVERFLOW_FIX`, so that the int8 model is right on CPUs
  without VNNI too) of the f32 IR -> ``<stem>_int8.xml/.bin``.  **ONNX**: ONNX Runtime's static QDQ
  quantisation (``quant_pre_process``, then ``quantize_static``: per-channel int8
  weights, uint8 activations, min-max calibration) -> ``<stem>_int8.onnx``.  Both keep
  the model's metadata, with ``extras["quantization"]`` saying how it was made (the
  backends then report precision ``int8+<rest>``).
- **Guard** (:func:`guard`): each folder's models are run by their system's segmenter,
  as deployment runs them (H2G-Net: heatmap + refinement; a patch classifier alone: its
  heatmap; an image-only network; a sliding-window model; RAZN's conditional zoom), over
  the run's *test* slides, f32 models at f32 and int8 models at the engine's default
  precision, per engine.  It passes when the mean tumour Dice (and, for multi-class
  models, every class's IoU over the pooled test pixels) of the int8 models is within
  ``tolerance`` (0.01) of the f32 models'.  Reported: those figures, and the absolute
  difference of the outputs the segmenter names (:meth:`guard_outputs`: the patch
  probabilities over tissue cells or RAZN's zoom probabilities, and the pixel
  probabilities of the final output): max and 99th percentile.  A failing group's int8
  files are removed (the f32 models stay) and the conversion fails.

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
from h2g.inference.metadata import ModelMetadata, embed_onnx, embed_openvino
from h2g.inference.segmenter import EngineOptions

log = logging.getLogger("h2g")

INT8_SUFFIX = "_int8"
#: NNCF's overflow fix for every quantised layer: without VNNI (AVX2 only) a CPU multiplies
#: u8 activations by s8 weights into saturating 16-bit pair sums; 7-bit weights avoid that.
#: Measured on a 2-core AMD EPYC with AVX2 only: with NNCF's default (first layer only) a
#: toy patch classifier's int8 probabilities were 0.14 from f32 on average, with "enable" 0.01.
OVERFLOW_FIXES = ("enable", "first_layer", "disable")
OVERFLOW_FIX = "enable"
DEFAULT_SAMPLES = 300
TOLERANCE = 0.01
ENGINES = ("openvino", "onnxruntime")


@dataclass(frozen=True)
class Int8Options:
    """What ``--int8`` was given: the manifest and seed (default: the run's config.json),
    the number of calibration samples, the guard's tolerance, the annotation downsample."""

    manifest: Path | None = None
    seed: int | None = None
    samples: int = DEFAULT_SAMPLES
    tolerance: float = TOLERANCE
    engines: tuple[str, ...] = ENGINES
    overflow_fix: str = OVERFLOW_FIX


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
    config: dict = field(default_factory=dict)  # the run's config.json


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
                   int(config.get("refine", {}).get("size", 512)), train, test, loaded.classes, config)


# --------------------------------------------------------------------------------------
# Calibration (the inputs come from each system's segmenter)
# --------------------------------------------------------------------------------------
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


def quantize_openvino(xml_path: Path, feeds: list[dict], metadata: ModelMetadata, seed: int,
                      overflow_fix: str = OVERFLOW_FIX) -> Path:
    """NNCF post-training quantisation of an f32 IR -> ``<stem>_int8.xml``.  ``overflow_fix``
    (NNCF's option, :data:`OVERFLOW_FIX` by default) keeps int8 products from saturating on
    CPUs without VNNI (see the module doc)."""
    try:
        import nncf
    except ImportError:
        raise ExportError("OpenVINO int8 needs NNCF: pip install \"h2g[int8]\" (or pass --int8-engines onnxruntime)") from None
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(str(xml_path))
    dataset = nncf.Dataset(feeds, as_model_input)
    try:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix(overflow_fix))
        quantised = nncf.quantize(model, dataset, subset_size=len(feeds), advanced_parameters=advanced)
    except Exception as exc:  # NNCF raises many types
        raise ExportError(f"{xml_path}: NNCF cannot quantise the model: {exc}") from None
    embed_openvino(quantised, _tagged(metadata, f"NNCF {nncf.__version__} post-training quantisation "
                                                f"(overflow fix {overflow_fix})", len(feeds), seed))
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


def quantize_onnx(onnx_path: Path, feeds: list[dict], metadata: ModelMetadata, seed: int,
                  overflow_fix: str = OVERFLOW_FIX) -> Path:
    """ONNX Runtime static QDQ quantisation of an f32 ONNX file -> ``<stem>_int8.onnx``.
    ``overflow_fix`` other than ``disable`` quantises the weights to 7 bits (ONNX Runtime's
    ``reduce_range``), the same cure as NNCF's for CPUs without VNNI (:data:`OVERFLOW_FIX`)."""
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
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            reduce_range=overflow_fix != "disable")
            # (its calibration keeps only each sample's per-tensor min / max; its option
            # CalibMaxIntermediateOutputs would discard them in ONNX Runtime 1.31)
        except Exception as exc:  # onnxruntime's quantiser raises many types
            raise ExportError(f"{onnx_path}: ONNX Runtime cannot quantise the model: {exc}") from None
        os.replace(Path(work) / "int8.onnx", target)
    embed_onnx(target, _tagged(metadata, f"ONNX Runtime {onnxruntime.__version__} static QDQ quantisation "
                                         f"(per-channel int8 weights{', 7-bit' if overflow_fix != 'disable' else ''}, "
                                         "uint8 activations, min-max)", len(feeds), seed))
    return target


# --------------------------------------------------------------------------------------
# The guard: the test slides, as deployment segments them
# --------------------------------------------------------------------------------------
@dataclass
class Group:
    """The deployable models of one folder: the conversion report's entries by role and
    the segmenter class their system deploys them with."""

    folder: Path
    entries: dict  # role -> conversion report entry
    segmenter: type  # h2g.inference.segmenter.Segmenter subclass

    def path(self, role: str, engine: str, int8: bool = False) -> Path:
        entry = self.entries[role]
        path = Path(entry["openvino" if engine == "openvino" else "onnx"])
        return int8_path(path) if int8 else path

    def models(self, engine: str, int8: bool = False) -> dict[str, Path]:
        return {role: self.path(role, engine, int8) for role in self.entries}

    def metadata(self, role: str) -> ModelMetadata:
        return ModelMetadata.from_dict(self.entries[role]["metadata"])


def groups(entries: list[dict]) -> list[Group]:
    """The conversion report's deployable entries, grouped by folder: in each folder the
    models of a role some segmenter of their system takes (a cluster model is not
    deployed), with the segmenter class that takes them all."""
    from h2g.systems.registry import segmenter_class, segmenters_of, systems

    found: dict[Path, dict] = {}
    for entry in entries:
        meta = ModelMetadata.from_dict(entry["metadata"])
        if meta.system not in systems():
            continue
        roles = {r for cls in segmenters_of(meta.system) for r in cls.roles}
        if meta.role in roles:
            found.setdefault(Path(entry["onnx"]).parent, {})[meta.role] = entry
    out = []
    for folder, by_role in sorted(found.items()):
        metas = {role: ModelMetadata.from_dict(e["metadata"]) for role, e in by_role.items()}
        out.append(Group(folder, by_role, segmenter_class(metas, described=str(folder))))
    return out


def _diff_stats(diffs: list[np.ndarray]) -> dict | None:
    if not diffs:
        return None
    values = np.concatenate([d.ravel() for d in diffs])
    if not values.size:
        return None
    return {"max": float(values.max()), "p99": float(np.percentile(values, 99)), "n": int(values.size)}


def group_segmenter(group: Group, engine: str, int8: bool, data: RunData):
    """``group``'s models on ``engine`` as its segmenter, compiled once for every slide:
    f32 models at f32; int8 models as deployment runs them (the engine's default
    precision for the layers left in floating point); the run's settings."""
    options = EngineOptions(engine=engine, device="CPU", precision=None if int8 else "f32", hint="latency")
    cls = group.segmenter
    return cls.from_files(group.models(engine, int8), options, cls.options_for_run(data.config))


def _truth(seg, record, slide, data: RunData):
    """What a slide's segmentation is scored against (read once for f32 and int8): the
    label map for a class raster, else the tumour mask at the probability map's size."""
    if seg.raster is not None:
        from h2g.io.annotation import load_annotation

        return load_annotation(record.annotation_path, slide, downsample=data.annotation_downsample,
                               classes=data.classes, required=True)
    from h2g.inference.lowres import target_mask

    return target_mask(record.annotation_path, slide, seg.prob.shape[0], data.annotation_downsample, required=True)


def _scores(seg, truth) -> dict:
    from h2g.evaluation import metrics

    if seg.raster is not None:
        from h2g.inference.segmenter import classes_of
        from h2g.io.classes import tumour_index_of

        names = [c["name"] for c in classes_of(seg.metadata, seg.raster.classes)]
        pred, labels = metrics.raster_labels(seg.raster, truth, names)
        confusion = metrics.confusion_matrix(pred, labels, len(names))
        tumour = tumour_index_of(names)
        dice = metrics.tumour_scores(confusion, tumour)["dice"] if tumour is not None else None
        return {"dice": dice, "confusion": confusion, "names": names}
    return {"dice": metrics.segmentation_metrics(metrics.binarise(seg.prob), truth)["dice"]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else None


def guard(group: Group, engine: str, data: RunData, tolerance: float = TOLERANCE, progress: bool = True) -> dict:
    """f32 against int8 on ``engine`` over the run's test slides (see the module doc)."""
    from tqdm.auto import tqdm

    from h2g.io.slide import open_slide

    f32_segmenter, int8_segmenter = group_segmenter(group, engine, False, data), group_segmenter(group, engine, True, data)
    per_slide, diffs = [], {}
    classes = False
    for record in tqdm(data.test, desc=f"int8 guard ({engine})", unit="slide", disable=not progress):
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            f32, int8 = f32_segmenter.segment(slide), int8_segmenter.segment(slide)
            truth = _truth(f32, record, slide, data)
            row = {"slide_id": record.slide_id, "f32": _scores(f32, truth), "int8": _scores(int8, truth)}
        classes = f32.raster is not None
        a, b = f32_segmenter.guard_outputs(f32), int8_segmenter.guard_outputs(int8)
        for key in a:
            x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
            cells = (x != 0) | (y != 0) if key == "patch" else np.ones(x.shape, bool)  # patch: cells with a patch
            diffs.setdefault(key, []).append(np.abs(x[cells] - y[cells]))
        per_slide.append(row)
    result = {"engine": engine, "slides": len(per_slide), "tolerance": tolerance}
    checks = []
    for variant in ("f32", "int8"):
        result[f"dice_{variant}"] = _mean(r[variant]["dice"] for r in per_slide)
    if result["dice_f32"] is not None:
        checks.append(("tumour Dice", result["dice_f32"], result["dice_int8"]))
    if classes and per_slide:  # per-class IoU over the pooled test pixels
        from h2g.evaluation.metrics import ClassScores

        names = per_slide[0]["f32"]["names"]
        for variant in ("f32", "int8"):
            pooled = ClassScores.from_confusion(sum(r[variant]["confusion"] for r in per_slide), names)
            result[f"iou_{variant}"] = {n: float(v) for n, v, here in zip(names, pooled.iou, pooled.present) if here}
        checks += [(f"{n} IoU", v, result["iou_int8"].get(n)) for n, v in result["iou_f32"].items()]
        for row in per_slide:
            for variant in ("f32", "int8"):
                row[variant] = {"dice": row[variant]["dice"]}
    result["patch_prob_diff"] = _diff_stats(diffs.get("patch", []))
    result["pixel_prob_diff"] = _diff_stats(diffs.get("pixel", []))
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
        f32_models = group.models("openvino") if "openvino" in options.engines else group.models("onnxruntime")
        for role in [r for r in group.segmenter.roles if r in group.entries]:
            entry = group.entries[role]
            metadata = group.metadata(role)
            feeds, described = group.segmenter.calibration_feeds(role, metadata, entry["inputs"], data.train,
                                                                 options.samples, data.seed, models=f32_models)
            calibration[role] = described
            for engine in options.engines:
                if engine == "openvino":
                    made[engine].append(quantize_openvino(group.path(role, engine), feeds, metadata, data.seed,
                                                          options.overflow_fix))
                else:
                    made[engine].append(quantize_onnx(group.path(role, engine), feeds, metadata, data.seed,
                                                      options.overflow_fix))
        for engine in options.engines:
            result = guard(group, engine, data, options.tolerance, progress=progress)
            result.update(folder=str(group.folder), segmenter=group.segmenter.label, manifest=str(data.manifest_path),
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
