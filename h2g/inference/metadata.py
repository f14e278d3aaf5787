"""What deployment needs to know about a model, carried with the model itself.

A :class:`ModelMetadata` says which system and design a model belongs to, its role in
that system's pipeline (``patch_classifier``, ``refinement``, ``segmentation``,
``cluster``, ...), the views it is fed (:class:`h2g.data.views.View`: name,
magnification, size, padding), its classes (``{"name", "colour"}``, in output-channel
order), how pixels are scaled (always ``"[0,1] float32 RGB"`` in this package) and what
it outputs (``class_probs`` (B, C), ``pixel_probs`` (B, H, W, C) or ``clusters``), plus
free-form ``extras`` (e.g. the refinement network's whole-slide input size).

Where it lives:

- beside a ``.keras`` file as ``<model>.meta.json`` (:func:`sidecar_path`,
  :func:`write_sidecar`, :func:`read_sidecar`): the training pipeline writes it;
- inside an exported ONNX file as the ``metadata_props`` entry :data:`KEY` and inside an
  OpenVINO IR as the ``rt_info`` entry :data:`KEY` (:func:`embed_onnx`,
  :func:`embed_openvino`), written by :mod:`h2g.export.conversion`; the deployment
  backends read it back (``backend.metadata``), so ``export/segment_slide.py MODEL...``
  needs no other arguments.

TensorFlow-free (ONNX / OpenVINO are imported inside the functions that need them).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from h2g.core.atomic import replace_atomically, write_text
from h2g.core.errors import ConfigError, ExportError
from h2g.data.views import View

KEY = "h2g"  # ONNX metadata_props key and OpenVINO rt_info key
SCALING = "[0,1] float32 RGB"
SIDECAR_SUFFIX = ".meta.json"
OUTPUTS = ("class_probs", "pixel_probs", "clusters")
#: H2G-Net's two classes (QuPath's standard "Tumor" class and its colour)
H2G_CLASSES = ({"name": "Non-tumour", "colour": [120, 120, 120]}, {"name": "Tumor", "colour": [200, 0, 0]})


def _check_classes(classes) -> tuple[dict, ...]:
    out = []
    for c in classes or ():
        if not isinstance(c, Mapping) or not c.get("name"):
            raise ConfigError(f"a class needs a name, got {c!r}")
        colour = [int(v) for v in c.get("colour", c.get("color", (128, 128, 128)))]
        if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
            raise ConfigError(f"class {c['name']!r}: colour must be three values in 0..255, got {colour}")
        out.append({"name": str(c["name"]), "colour": colour})
    return tuple(out)


@dataclass(frozen=True)
class ModelMetadata:
    """What a deployed model is and how to feed it (see the module doc)."""

    system: str = "h2g"
    design: str = ""
    role: str = ""
    views: tuple[View, ...] = ()
    classes: tuple[dict, ...] = ()
    scaling: str = SCALING
    output: str = "class_probs"
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "views", tuple(v if isinstance(v, View) else View.from_dict(v)
                                                for v in self.views))
        object.__setattr__(self, "classes", _check_classes(self.classes))
        if self.output not in OUTPUTS:
            raise ConfigError(f"output kind {self.output!r} is not one of {', '.join(OUTPUTS)}")
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            raise ConfigError(f"view names must be unique, got {names}")

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def view(self, name: str | None = None) -> View:
        """The view called ``name`` (default: the first, the one a segmentation model's
        output pixel grid is aligned with unless ``extras["target"]`` names another)."""
        name = name or self.extras.get("target") or (self.views[0].name if self.views else None)
        for v in self.views:
            if v.name == name:
                return v
        raise ConfigError(f"model metadata has no view {name!r} (views: {[v.name for v in self.views]})")

    def replace(self, **changes) -> "ModelMetadata":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {"system": self.system, "design": self.design, "role": self.role,
                "views": [v.to_dict() for v in self.views], "classes": [dict(c) for c in self.classes],
                "scaling": self.scaling, "output": self.output, "extras": dict(self.extras)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "metadata") -> "ModelMetadata":
        """Parse a dict (from JSON); :class:`ExportError` naming ``source`` when malformed."""
        if not isinstance(d, Mapping):
            raise ExportError(f"{source}: model metadata must be a JSON object, got {type(d).__name__}")
        known = {"system", "design", "role", "views", "classes", "scaling", "output", "extras"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ExportError(f"{source}: unknown model metadata fields {unknown}")
        try:
            return cls(system=str(d.get("system", "h2g")), design=str(d.get("design", "")),
                       role=str(d.get("role", "")), views=tuple(View.from_dict(v) for v in d.get("views", ())),
                       classes=tuple(d.get("classes", ())), scaling=str(d.get("scaling", SCALING)),
                       output=str(d.get("output", "class_probs")), extras=dict(d.get("extras") or {}))
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{source}: bad model metadata: {exc}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "metadata") -> "ModelMetadata":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"{source}: model metadata is not valid JSON: {exc}") from None
        return cls.from_dict(d, source)


# --------------------------------------------------------------------------------------
# H2G-Net defaults (models saved before sidecars existed)
# --------------------------------------------------------------------------------------
def h2g_patch_metadata(patch_size: int = 256, magnification: float = 10.0, role: str = "patch_classifier",
                       design: str = "", heatmap_stride: int | None = None) -> ModelMetadata:
    """H2G-Net's patch classifier (or cluster model): one ``image`` view, white padding
    (its patches keep OpenSlide's glass beyond the slide, as in training).  A classifier
    whose heatmaps were made with overlapping patches records their ``heatmap_stride``."""
    extras = {"heatmap_stride": int(heatmap_stride)} if heatmap_stride is not None and role != "cluster" else {}
    return ModelMetadata(system="h2g", design=design, role=role,
                         views=(View("image", magnification, int(patch_size), "white"),),
                         classes=H2G_CLASSES if role != "cluster" else (),
                         output="clusters" if role == "cluster" else "class_probs", extras=extras)


def h2g_refinement_metadata(size: int | None, heatmap: bool = True, design: str = "",
                            heatmap_stride: int | None = None) -> ModelMetadata:
    """H2G-Net's refinement network (``image`` + ``heatmap``) or low-resolution U-Net
    (``image``): whole-slide inputs resized to ``size`` x ``size``, no views.  A network
    trained on overlapping-patch heatmaps records their ``heatmap_stride`` (patch px),
    which deployment then uses; absent means the paper's non-overlapping patches."""
    inputs = ["image", "heatmap"] if heatmap else ["image"]
    extras = {"whole_slide": True, "input_size": size, "inputs": inputs}
    if heatmap and heatmap_stride is not None:
        extras["heatmap_stride"] = int(heatmap_stride)
    return ModelMetadata(system="h2g", design=design, role="refinement", classes=H2G_CLASSES,
                         output="pixel_probs", extras=extras)


# --------------------------------------------------------------------------------------
# Sidecar files and embedding
# --------------------------------------------------------------------------------------
def sidecar_path(model_path) -> Path:
    """``<folder>/<stem>.meta.json`` for a model file ``<folder>/<stem>.<ext>``."""
    p = Path(model_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def write_sidecar(model_path, metadata: ModelMetadata) -> Path:
    """Write ``metadata`` beside ``model_path`` (atomically); returns the sidecar path."""
    return write_text(sidecar_path(model_path), json.dumps(metadata.to_dict(), indent=2, sort_keys=True))


def read_sidecar(model_path) -> ModelMetadata | None:
    """The metadata beside ``model_path``, or None when there is no sidecar."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    return ModelMetadata.from_json(path.read_text(encoding="utf-8"), str(path))


def embed_onnx(onnx_path, metadata: ModelMetadata) -> Path:
    """Store ``metadata`` in the ONNX file's ``metadata_props`` under :data:`KEY`."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in model.metadata_props}
    props[KEY] = metadata.to_json()
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    return replace_atomically(onnx_path, lambda tmp: onnx.save(model, str(tmp)))


def embed_openvino(ov_model, metadata: ModelMetadata):
    """Store ``metadata`` in an ``openvino.Model``'s ``rt_info`` under :data:`KEY`."""
    ov_model.set_rt_info(metadata.to_json(), KEY)
    return ov_model


def _varint(fh) -> int | None:
    """A protobuf varint read from ``fh`` (None at the end of the file)."""
    value, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _fields(fh, end: int | None = None):
    """``(field number, wire type, value)`` of the protobuf message in ``fh`` up to
    ``end``; a length-delimited field's value is its ``(offset, length)`` (the file is
    positioned after it), so that large fields (the graph, its weights) are skipped, not
    read."""
    while end is None or fh.tell() < end:
        key = _varint(fh)
        if key is None:
            return
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = _varint(fh)
        elif wire == 1:
            value = fh.seek(8, 1)
        elif wire == 5:
            value = fh.seek(4, 1)
        elif wire == 2:
            length = _varint(fh)
            value = (fh.tell(), length)
            fh.seek(length, 1)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def onnx_metadata_props(onnx_path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (``ModelProto`` field 14, key / value
    strings), read from the protobuf wire format directly: no ``onnx`` package (whose
    import takes seconds and holds the interpreter while it does), and the graph is
    skipped, not parsed.  :class:`ExportError` for a file that is not a protobuf message."""
    props: dict[str, str] = {}
    try:
        with open(onnx_path, "rb") as fh:
            entries = [value for number, wire, value in _fields(fh) if number == 14 and wire == 2]
            if fh.tell() > os.fstat(fh.fileno()).st_size:
                raise ValueError("the file is truncated")
            for offset, length in entries:
                fh.seek(offset)
                key = value = ""
                for number, wire, (start, size) in ((n, w, v) for n, w, v in _fields(fh, offset + length)
                                                    if w == 2):
                    here = fh.tell()
                    fh.seek(start)
                    text = fh.read(size).decode("utf-8")
                    fh.seek(here)
                    if number == 1:
                        key = text
                    elif number == 2:
                        value = text
                props[key] = value
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{onnx_path}: not a readable ONNX file: {exc}") from None
    return props


def read_onnx_metadata(onnx_path) -> ModelMetadata | None:
    """The metadata of an ONNX file (None when absent), from its ``metadata_props``
    (:func:`onnx_metadata_props`; OpenVINO's reader drops them)."""
    text = onnx_metadata_props(onnx_path).get(KEY)
    return ModelMetadata.from_json(text, str(onnx_path)) if text else None


def model_metadata(path) -> ModelMetadata | None:
    """The metadata of a model file without compiling it: an OpenVINO IR's rt_info, an
    ONNX file's metadata_props (:func:`onnx_metadata_props`), a ``.keras`` file's sidecar.
    None when the file carries none."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: model file not found")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return read_sidecar(path)
    if suffix == ".xml":
        try:
            import openvino as ov
        except ImportError:
            raise ExportError("engine openvino is not installed (pip install openvino)") from None
        try:
            model = ov.Core().read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses
            raise ExportError(f"{path}: OpenVINO cannot read the model: {exc}") from None
        return from_text(model.get_rt_info(KEY).astype(str), str(path)) if model.has_rt_info(KEY) else None
    if suffix == ".onnx":
        return read_onnx_metadata(path)
    raise ExportError(f"{path}: not a model file (.keras, .onnx or .xml expected)")


def from_text(text: str | None, source: str) -> ModelMetadata | None:
    """Parse embedded metadata (None stays None)."""
    return ModelMetadata.from_json(text, source) if text else None


def check_inputs(metadata: ModelMetadata, input_names: Sequence[str], source: str) -> None:
    """:class:`ExportError` when a multi-input model's inputs are not its views' names."""
    if len(input_names) < 2 or not metadata.views:
        return
    views = [v.name for v in metadata.views]
    if set(views) != set(input_names):
        raise ExportError(f"{source}: the model's inputs {list(input_names)} are not the views "
                          f"{views} its metadata names")


def describe(metadata: ModelMetadata | None) -> dict[str, Any]:
    """A short JSON-able description for reports and summaries."""
    return metadata.to_dict() if metadata is not None else {}
