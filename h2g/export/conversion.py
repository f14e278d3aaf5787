"""Keras -> ONNX (tf2onnx) and OpenVINO IR, with a parity check at conversion time.

Every model of the package converts the same way (:func:`convert_model`):

- ONNX: a ``tf.function`` over the model with named inputs - ``image`` for a one-input
  model, else the model's own input names (H2G-Net's refinement network: ``image`` and
  ``heatmap``; a multi-view model: its views' names) - dynamic batch, at a stated opset;
  the output is ``probs`` (class probabilities) or ``clusters`` (cluster ids of the
  cluster model).
- Metadata (:mod:`h2g.inference.metadata`): the model's ``<model>.meta.json`` sidecar, or
  for a ``.keras`` without one H2G-Net's (inferred from its kind and said so in the
  report), embedded in the ONNX file (``metadata_props["h2g"]``) and the IR (rt_info), so
  that deployment needs no other arguments.
- OpenVINO IR: ``openvino.convert_model`` of the ONNX file, saved FP32
  (``compress_to_fp16=False``); with ``fp16=True`` an FP16-compressed ``*_fp16.xml`` too.
- Parity on real-looking inputs (patches read from a slide's tissue for patch models at
  their view's magnification; the slide's low-resolution image plus a smooth heatmap for
  refinement networks; the views of windows over the tissue for multi-view models; smooth
  random inputs of the right shapes when nothing says what to read): the max
  absolute difference to Keras of ONNX Runtime and of OpenVINO at
  ``INFERENCE_PRECISION_HINT=f32`` must be <= :data:`TOLERANCE` (cluster ids must match
  exactly); OpenVINO's default precision (bf16 on CPUs that have it) and the FP16 IR are
  measured and reported, not enforced.

:func:`convert` runs this over run folders / model paths and writes a JSON report; a
failed parity check raises :class:`ExportError` after the report is written.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2g.core.atomic import write_text
from h2g.core.choices import Choice
from h2g.core.errors import ExportError
from h2g.inference.metadata import (
    ModelMetadata,
    check_inputs,
    embed_onnx,
    embed_openvino,
    h2g_patch_metadata,
    h2g_refinement_metadata,
    read_sidecar,
)
from h2g.inference.backends import (
    INPUT_NAMES,
    KerasBackend,
    OnnxRuntimeBackend,
    OpenVINOBackend,
    call_keras,
    keras_inputs,
    load_keras_model,
)
from h2g.inference.lowres import refinement_inputs

DEFAULT_OPSET = 17
TOLERANCE = 1e-4
REPORT_NAME = "conversion_report.json"
PARITY_PATCHES = 8
PARITY_MAGNIFICATION = 10.0


def default_parity_slide() -> Path:
    """The slide parity is checked on when none is given: the first slide of the
    embedded cohort (generated on first use)."""
    from h2g.data.embedded import ensure_cohort
    from h2g.io.manifest import DEFAULT_MANIFEST, load_manifest

    return load_manifest(ensure_cohort(DEFAULT_MANIFEST)).records[0].slide_path


def find_models(paths) -> list[Path]:
    """The ``.keras`` files among ``paths``: files as given, folders searched recursively
    (sorted).  :class:`ExportError` for a missing path or when nothing is found."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(p.rglob("*.keras"))
        elif p.is_file() and p.suffix == ".keras":
            found.append(p)
        elif p.exists():
            raise ExportError(f"{p}: not a .keras model file or a folder")
        else:
            raise ExportError(f"{p}: no such file or folder")
    if not found:
        raise ExportError(f"no .keras models found in {', '.join(map(str, paths))}")
    return found


# --------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------
class ModelKind(Choice):
    """What a Keras model is, from its inputs and output (:func:`signature`)."""

    CLASSIFIER = "classifier"
    CLUSTER = "cluster"
    REFINEMENT = "refinement"
    SEGMENTATION = "segmentation"


@dataclass
class Signature:
    """How a Keras model is called and what its exported graph looks like."""

    names: tuple[str, ...]  # exported input names, in order
    shapes: tuple[tuple, ...]  # per input, batch dimension None
    structure: str  # "single" | "list" | "dict"
    keras_order: tuple[str, ...]  # input names in the model's own list order
    kind: "ModelKind"
    output: str  # "probs" | "clusters"


def signature(model, path, metadata: ModelMetadata | None = None) -> Signature:
    """Inputs, kind and output name of ``model``.  A one-input model's input is exported
    as ``image`` whatever its Keras name; several inputs keep their Keras names (dict keys
    or input layer names).  :class:`ExportError` when a multi-input model's names are
    neither H2G-Net's (``image`` + ``heatmap``) nor the views of its ``metadata``."""
    structure, keras_order = keras_inputs(model)
    tensors = dict(model.input) if structure == "dict" else dict(zip(keras_order, model.inputs))
    if len(keras_order) == 1:  # the image, whatever its Keras name
        names, shapes = ("image",), (tuple(tensors[keras_order[0]].shape),)
    else:
        h2g_names = set(keras_order) == set(INPUT_NAMES)
        if not h2g_names and (metadata is None or not metadata.views):
            raise ExportError(f"{path}: wrong input names {list(keras_order)}; a two-input H2G-Net model "
                              "must name its inputs 'image' and 'heatmap', and any other multi-input model "
                              "needs a <model>.meta.json sidecar whose views name its inputs")
        if metadata is not None and not h2g_names:
            check_inputs(metadata, keras_order, str(path))
        names = INPUT_NAMES if h2g_names else tuple(keras_order)
        shapes = tuple(tuple(tensors[n].shape) for n in names)
    shapes = tuple((None,) + tuple(s[1:]) for s in shapes)
    out = model.outputs[0]
    integer = "int" in str(out.dtype)
    if set(names) == set(INPUT_NAMES):
        kind = ModelKind.REFINEMENT
    elif integer:
        kind = ModelKind.CLUSTER
    elif len(out.shape) == 4:
        kind = ModelKind.SEGMENTATION
    else:
        kind = ModelKind.CLASSIFIER
    return Signature(names, shapes, structure, keras_order, kind, "clusters" if integer else "probs")


def inferred_metadata(sig: Signature) -> ModelMetadata:
    """H2G-Net's metadata for a model saved without a sidecar, from its kind: patch
    classifier / cluster model -> one ``image`` view at 10x of the input's size;
    refinement network or low-resolution U-Net (a one-input segmentation model) -> the
    whole slide at the input size."""
    side = sig.shapes[0][1]
    if sig.kind in (ModelKind.CLASSIFIER, ModelKind.CLUSTER):
        return h2g_patch_metadata(side or 256, PARITY_MAGNIFICATION,
                                  role="cluster" if sig.kind == ModelKind.CLUSTER else "patch_classifier")
    return h2g_refinement_metadata(side, heatmap="heatmap" in sig.names)


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------
def to_onnx(model, sig: Signature, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` as ONNX at ``path`` with named inputs and a dynamic batch."""
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    specs = [tf.TensorSpec(shape, tf.float32, name=name) for name, shape in zip(sig.names, sig.shapes)]

    @tf.function(input_signature=specs)
    def serve(*args):
        return {sig.output: call_keras(model, sig.structure, sig.keras_order, dict(zip(sig.names, args)))}

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tf2onnx.convert.from_function(serve, input_signature=specs, opset=opset, output_path=str(path))
    except Exception as exc:  # tf2onnx raises many types on unsupported graphs
        raise ExportError(f"{path}: tf2onnx cannot convert the model at opset {opset}: {exc}") from None
    return path


def to_openvino(onnx_path: Path, xml_path: Path, fp16: bool = False,
                metadata: ModelMetadata | None = None) -> Path:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin``), FP32 unless ``fp16``;
    ``metadata`` goes into the IR's rt_info."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
        if metadata is not None:
            embed_openvino(model, metadata)
        ov.save_model(model, str(xml_path), compress_to_fp16=fp16)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses
        raise ExportError(f"{onnx_path}: OpenVINO cannot convert the model: {exc}") from None
    return xml_path


# --------------------------------------------------------------------------------------
# Parity inputs
# --------------------------------------------------------------------------------------
def parity_patches(slide, size: int, n: int = PARITY_PATCHES,
                   magnification: float = PARITY_MAGNIFICATION) -> np.ndarray:
    """``n`` tissue patches ``(n, size, size, 3)`` float32 in [0, 1] at ``magnification``,
    evenly spaced over the slide's tissue grid (all of them when it has fewer)."""
    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import detect_tissue

    grid = build_patch_grid(slide, tissue=detect_tissue(slide), magnification=magnification, patch_size=size)
    if not len(grid.coords):
        raise ExportError(f"{slide.path}: no tissue patches to check parity on")
    picks = np.unique(np.linspace(0, len(grid.coords) - 1, n).round().astype(int))
    return np.stack([slide.read_region(tuple(grid.coords[i]), (size, size), magnification)
                     for i in picks]).astype(np.float32) / 255.0


def smooth_heatmap(image: np.ndarray) -> np.ndarray:
    """A smooth heatmap ``(S, S, 1)`` in [0, 1] following the image's stained areas
    (darkness blurred with a Gaussian of sigma S / 16, scaled to [0, 1])."""
    from scipy import ndimage

    dark = ndimage.gaussian_filter(1.0 - image.mean(axis=-1), sigma=image.shape[0] / 16)
    span = float(dark.max() - dark.min())
    heat = (dark - dark.min()) / span if span > 0 else np.zeros_like(dark)
    return heat.astype(np.float32)[..., None]


def smooth_random(shape: tuple, seed: int = 0) -> np.ndarray:
    """A smooth random input ``shape`` (batch first) in [0, 1]: uniform noise blurred over
    a sixteenth of the spatial size and stretched to [0, 1] (non-degenerate, image-like)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.random(shape)
    sigma = [0] + [max(1.0, n / 16) for n in shape[1:-1]] + [0] if len(shape) == 4 else 0
    smooth = ndimage.gaussian_filter(noise, sigma=sigma)
    low, high = smooth.min(), smooth.max()
    return ((smooth - low) / (high - low) if high > low else smooth).astype(np.float32)


def parity_views(slide, views, n: int = 4) -> np.ndarray:
    """Level-0 centres of ``n`` windows over ``slide``'s tissue for views ``views`` (the
    first view's size at its magnification), evenly spaced over the tissue windows."""
    from h2g.tiling.windows import window_grid

    grid = window_grid(slide, magnification=views[0].magnification, size=views[0].size)
    if not len(grid):
        raise ExportError(f"{slide.path}: no tissue windows to check parity on")
    picks = np.unique(np.linspace(0, len(grid) - 1, n).round().astype(int))
    return grid.centres[picks]


def parity_inputs(sig: Signature, slide, metadata: ModelMetadata | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Real-looking inputs for ``sig``'s model from ``slide`` and a description of them.
    Patch models: tissue patches at their view's magnification (10x without metadata).
    Refinement / one-input segmentation nets get the low-resolution image and a smooth
    heatmap, and their horizontal mirror (batch of 2, exercising the dynamic batch).
    Multi-view models: their views around tissue windows (``metadata.views``), else
    smooth random inputs of the right shapes."""
    from h2g.data.views import read_views

    height, width = sig.shapes[0][1:3]
    views = metadata.views if metadata is not None else ()
    if len(sig.names) > 1 and set(sig.names) != set(INPUT_NAMES):
        if views and {v.name for v in views} == set(sig.names):
            centres = parity_views(slide, views)
            reads = [read_views(slide, tuple(c), views) for c in centres]
            feed = {v.name: np.stack([r[v.name] for r in reads]).astype(np.float32) / 255.0 for v in views}
            return feed, (f"views {', '.join(f'{v.name} {v.size}px at {v.magnification:g}x' for v in views)} "
                          f"around {len(centres)} tissue windows of {slide.path}")
        feed = {n: smooth_random((2,) + tuple(d or 64 for d in shape[1:]), seed=i)
                for i, (n, shape) in enumerate(zip(sig.names, sig.shapes))}
        return feed, "smooth random inputs " + ", ".join(f"{n} {list(v.shape)}" for n, v in feed.items())
    if sig.kind in (ModelKind.CLASSIFIER, ModelKind.CLUSTER):
        size = height or 256
        if width not in (None, size):
            raise ExportError(f"parity check supports square patch inputs, got {height}x{width}")
        magnification = views[0].magnification if views else PARITY_MAGNIFICATION
        batch = parity_patches(slide, size, magnification=magnification)
        described = f"{len(batch)} tissue patches {size}x{size} at {magnification:g}x from {slide.path}"
        return {"image": batch}, described
    if views and sig.kind == ModelKind.SEGMENTATION:  # a one-view segmentation model
        centres = parity_views(slide, views[:1])
        batch = np.stack([read_views(slide, tuple(c), views[:1])[views[0].name] for c in centres])
        return ({"image": batch.astype(np.float32) / 255.0},
                f"view {views[0].name} {views[0].size}px at {views[0].magnification:g}x around "
                f"{len(centres)} tissue windows of {slide.path}")
    size = height or 1024
    image, _ = refinement_inputs(slide, None, size=size)
    heat = smooth_heatmap(image)
    feed = {"image": np.stack([image, image[:, ::-1]])}
    if "heatmap" in sig.names:
        feed["heatmap"] = np.stack([heat, heat[:, ::-1]])
    return feed, f"low-resolution image {size}x{size} of {slide.path} + smooth heatmap, and their mirror"


# --------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------
def _difference(reference: np.ndarray, other: np.ndarray, integer: bool) -> dict:
    if reference.shape != other.shape:
        return {"shape": list(other.shape), "max_abs_diff": None, "mismatches": None}
    if integer:
        return {"mismatches": int((reference != other).sum())}
    return {"max_abs_diff": float(np.abs(reference.astype(np.float64) - other).max())}


def _passes(diff: dict, integer: bool, tolerance: float) -> bool:
    if integer:
        return diff.get("mismatches") == 0
    value = diff.get("max_abs_diff")
    return value is not None and value <= tolerance


def check_parity(model, sig: Signature, onnx_path: Path, xml_path: Path, feed: dict,
                 fp16_path: Path | None = None, tolerance: float = TOLERANCE) -> dict:
    """Differences of every engine's output to Keras on ``feed``; ``passed`` is True
    when ONNX Runtime and OpenVINO f32 are within ``tolerance`` (ids: identical)."""
    integer = sig.kind == ModelKind.CLUSTER
    reference = KerasBackend(model).predict(feed)
    low, high = float(reference.min()), float(reference.max())
    # a randomly initialised net gives ~0.5 everywhere: parity then proves little
    result: dict = {"tolerance": tolerance, "keras_output_range": [low, high], "constant_output": high - low < 1e-3}
    runs = {
        "onnxruntime": OnnxRuntimeBackend(onnx_path),
        "openvino_f32": OpenVINOBackend(xml_path, precision="f32"),
        "openvino_default": OpenVINOBackend(xml_path),
    }
    if fp16_path is not None:
        runs["openvino_fp16_ir"] = OpenVINOBackend(fp16_path, precision="f32")
    for key, backend in runs.items():
        result[key] = {"precision": backend.precision,
                       **_difference(reference, backend.predict(feed), integer)}
    result["passed"] = all(_passes(result[k], integer, tolerance) for k in ("onnxruntime", "openvino_f32"))
    return result


# --------------------------------------------------------------------------------------
# Whole conversions
# --------------------------------------------------------------------------------------
def export_model(model, out_dir, stem: str, slide, *, source: str | None = None,
                 metadata: ModelMetadata | None = None, opset: int = DEFAULT_OPSET, fp16: bool = False,
                 tolerance: float = TOLERANCE) -> dict:
    """Export an in-memory Keras ``model`` into ``out_dir`` as ``<stem>.onnx``,
    ``<stem>.xml/.bin`` (and ``<stem>_fp16.xml/.bin`` with ``fp16``) carrying
    ``metadata`` (default: H2G-Net's, inferred from the model's kind: the report entry's
    ``metadata_source`` says "inferred"), and check parity on inputs from ``slide`` (an
    open :class:`h2g.io.slide.Slide`).  Returns the report entry."""
    out_dir = Path(out_dir)
    if len(model.outputs) > 1:  # deep supervision: export the segmentation output only
        from h2g.models import inference_model

        model = inference_model(model)
    sig = signature(model, source or stem, metadata)
    how = "given"
    if metadata is None:
        metadata, how = inferred_metadata(sig), "inferred (H2G-Net, from the model's inputs and output)"
    onnx_path = embed_onnx(to_onnx(model, sig, out_dir / f"{stem}.onnx", opset), metadata)
    xml_path = to_openvino(onnx_path, out_dir / f"{stem}.xml", metadata=metadata)
    fp16_path = to_openvino(onnx_path, out_dir / f"{stem}_fp16.xml", fp16=True, metadata=metadata) if fp16 else None
    feed, described = parity_inputs(sig, slide, metadata)
    return {
        "keras": source or model.name,
        "kind": str(sig.kind),
        "inputs": {n: list(s) for n, s in zip(sig.names, sig.shapes)},
        "output": sig.output,
        "metadata": metadata.to_dict(),
        "metadata_source": how,
        "onnx": str(onnx_path),
        "opset": opset,
        "openvino": str(xml_path),
        "openvino_fp16": str(fp16_path) if fp16_path else None,
        "parity_inputs": described,
        "parity": check_parity(model, sig, onnx_path, xml_path, feed, fp16_path, tolerance),
    }


def convert_model(path, out_dir, slide, **kw) -> dict:
    """Load one ``.keras`` file and :func:`export_model` it as ``<its stem>.*``, with the
    metadata of its ``<stem>.meta.json`` sidecar when it has one."""
    path = Path(path)
    metadata = read_sidecar(path)
    entry = export_model(load_keras_model(path), out_dir, path.stem, slide, source=str(path),
                         metadata=metadata, **kw)
    if metadata is not None:
        entry["metadata_source"] = f"sidecar {path.with_name(path.stem + '.meta.json')}"
    return entry


def versions() -> dict:
    """Versions of the conversion stack."""
    import keras
    import onnx
    import onnxruntime
    import openvino
    import tensorflow as tf
    import tf2onnx

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def _target_dir(model: Path, roots: list[Path], out: Path | None) -> Path:
    if out is None:
        return model.parent
    for root in roots:
        if root.is_dir() and model.is_relative_to(root):
            return out / model.parent.relative_to(root)
    return out


def convert(paths, slide, out=None, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
            tolerance: float = TOLERANCE, progress: bool = True, int8=None) -> Path:
    """Convert every ``.keras`` model under ``paths`` (see :func:`find_models`).  Outputs go
    next to each model, or under ``out`` (mirroring the folders given).  Writes the JSON
    report (``conversion_report.json`` in ``out``, or in the first folder / model folder
    given) and returns its path; raises :class:`ExportError` naming the models that failed
    parity, after writing the report.  ``int8`` (:class:`h2g.export.quantize.Int8Options`)
    also quantises the deployable models to int8, calibrated on the run's training slides
    and guarded on its test slides (the report's ``int8`` entries); a failed guard raises
    :class:`ExportError` after the report is written, with the f32 models kept."""
    from tqdm.auto import tqdm

    roots = [Path(p) for p in paths]
    models = find_models(roots)
    out = Path(out) if out is not None else None
    targets = [_target_dir(m, roots, out) / m.stem for m in models]
    clashes = sorted({str(t) for t in targets if targets.count(t) > 1})
    if clashes:
        raise ExportError(f"several models would be written to {', '.join(clashes)}.*; "
                          "convert them separately or give their folder")
    entries = [convert_model(m, t.parent, slide, opset=opset, fp16=fp16, tolerance=tolerance)
               for m, t in tqdm(list(zip(models, targets)), desc="convert", unit="model", disable=not progress)]
    failed = [e["keras"] for e in entries if not e["parity"]["passed"]]
    report_dir = out or (roots[0] if roots[0].is_dir() else models[0].parent)
    report_dir.mkdir(parents=True, exist_ok=True)
    report = report_dir / REPORT_NAME
    content = {"versions": versions(), "opset": opset, "tolerance": tolerance, "parity_slide": str(slide.path),
               "passed": not failed, "models": entries}
    write_text(report, json.dumps(content, indent=2))
    if failed:
        raise ExportError(f"parity check failed (max |diff| > {tolerance:g} or ids differ) for "
                          f"{', '.join(failed)}; see {report}")
    if int8 is not None:
        from h2g.export.quantize import check_guards, quantize_entries

        content["int8"] = quantize_entries(entries, int8, progress=progress)
        write_text(report, json.dumps(content, indent=2))
        check_guards(content["int8"], report)
    return report
