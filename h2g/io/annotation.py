"""Annotation masks: a slide's ground truth as a label map at a fixed downsample.

:func:`load_annotation` reads a PNG or (pyramidal) TIFF mask (level 0, channel 0 when
the image has several) whose size is the slide's level-0 size / ``downsample``.  What
its pixel values mean comes from a :class:`~h2g.io.classes.ClassTable`:

- the default binary table (H2G-Net's tumour masks) keeps the historical rule: in a
  0/1 mask 1 is tumour, otherwise a value > 127 is tumour.  A mask with values in 1..127
  that is not a 0/1 mask (a label map such as {0, 1, 2}, or 1 = tumour beside 255 =
  ignore: {0, 1, 255}) would lose its tumour under that rule: it is an
  :class:`~h2g.core.errors.AnnotationError` naming the values and asking for a class table;
- any other table maps each pixel value to its class index, the table's ``ignore``
  values to :data:`IGNORE`; a value the table does not list is an error naming the file
  and the values.

An :class:`Annotation` holds ``labels`` (uint8 class indices, :data:`IGNORE` = 255 for
unannotated pixels), ``mask`` (bool tumour, what H2G-Net trains on), ``downsample``
(level-0 pixels per mask pixel) and ``classes``.  Masks can be 25k x 25k pixels: values
are mapped in row chunks through a look-up table, never through full-size int64
temporaries, and a binary annotation's ``labels`` is a read-only view of its ``mask``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from h2g.core.errors import AnnotationError
from h2g.io.classes import BINARY, IGNORE, ClassTable, sidecar_path  # noqa: F401 (re-export)

_CHUNK_VALUES = 1 << 22  # mask values processed per chunk (bounds temporaries)
_SHOWN_VALUES = 12  # unexpected values named in an error


class Annotation:
    """A slide's ground truth at ``downsample`` level-0 pixels per mask pixel.

    ``Annotation(mask, downsample, path)`` wraps a boolean tumour mask (the binary
    table); :meth:`from_labels` wraps a label map of another table."""

    def __init__(self, mask: np.ndarray | None, downsample: float, path: Path | None = None, *,
                 labels: np.ndarray | None = None, classes: ClassTable | None = None):
        self.downsample = float(downsample)
        self.path = None if path is None else Path(path)
        self.classes = BINARY if classes is None else classes
        if mask is None and labels is None:
            raise ValueError("an annotation needs a mask or a label map")
        if labels is None:
            mask = np.asarray(mask, bool)
            labels = mask.view(np.uint8)  # bool is one byte of 0/1: the label map, free
            labels.flags.writeable = False
        self._mask = mask
        self.labels = labels

    @classmethod
    def from_labels(cls, labels: np.ndarray, downsample: float, path: Path | None,
                    classes: ClassTable) -> Annotation:
        """An annotation of the uint8 label map ``labels`` (class indices, :data:`IGNORE`)."""
        return cls(None, downsample, path, labels=np.asarray(labels, np.uint8), classes=classes)

    @property
    def mask(self) -> np.ndarray:
        """Boolean tumour mask: ``labels == classes.tumour_index`` (ignored pixels are not
        tumour).  :class:`AnnotationError` when the class table has no tumour class."""
        if self._mask is None:
            tumour = self.classes.tumour_index
            if tumour is None:
                raise AnnotationError(self.path, f"no tumour class in the class table "
                                                 f"({', '.join(self.classes.names)}): no tumour mask")
            self._mask = _equal_chunked(self.labels, tumour)
        return self._mask

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)

    def __repr__(self) -> str:
        return (f"Annotation({str(self.path)!r}, {self.shape[1]}x{self.shape[0]} px, "
                f"downsample {self.downsample:g}, classes {', '.join(self.classes.names)})")


def _equal_chunked(labels: np.ndarray, value: int) -> np.ndarray:
    out = np.empty(labels.shape, bool)
    chunk = _rows_per_chunk(labels)
    for top in range(0, labels.shape[0], chunk):
        np.equal(labels[top:top + chunk], value, out=out[top:top + chunk])
    return out


def _rows_per_chunk(array: np.ndarray) -> int:
    return max(1, _CHUNK_VALUES // max(1, array.shape[1] if array.ndim > 1 else 1))


def _read_mask_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ValueError("the TIFF holds no image")
            return tif.series[0].levels[0].asarray()
    with Image.open(path) as image:
        return np.asarray(image)


def _binarise(values: np.ndarray, path: Path) -> np.ndarray:
    """The historical binary rule (see the module doc); label maps are refused."""
    if values.dtype == bool:
        return values
    if not values.size:
        return values > 0
    top = values.max()
    if top <= 1:
        return values > 0
    small = values[(values > 0) & (values <= 127)]
    if small.size:  # label-like values (a label map, or 1 = tumour beside 255 = ignore)
        raise AnnotationError(path, binary_values_problem(_distinct_values(values)))
    return values > 127


def binary_values_problem(values) -> str:
    """Why a mask holding ``values`` (some in 1..127, and not only 0/1) is refused under
    the binary table, and the class-table fix."""
    shown = _format_values(values)
    return (f"mask values {shown} are not a binary tumour mask (0/1 or 0/255): with the default "
            f"binary classes their meaning is ambiguous (1 = tumour beside 255 = ignore, or a label "
            f"map); give the manifest a class table ({sidecar_path('<manifest>.csv').name}: "
            f"name,value rows such as non-tumour,0 / tumour,1 / ignore,255)")


def _distinct_values(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer image, chunk by chunk (no full-size copy)."""
    found: set[int] = set()
    flat = values.reshape(values.shape[0], -1)
    for top in range(0, flat.shape[0], _rows_per_chunk(flat)):
        found.update(np.unique(flat[top:top + _rows_per_chunk(flat)]).tolist())
    return np.array(sorted(found))


def _format_values(values) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:_SHOWN_VALUES])
    return "{" + text + (f", ... ({len(values)} values)" if len(values) > _SHOWN_VALUES else "") + "}"


def _map_labels(values: np.ndarray, classes: ClassTable, path: Path) -> np.ndarray:
    """uint8 label map of ``values`` through ``classes``, row chunk by row chunk."""
    if values.dtype == bool:
        values = values.view(np.uint8)
    if not np.issubdtype(values.dtype, np.integer):
        raise AnnotationError(path, f"label map must hold integer values, got {values.dtype}")
    lut = np.full(1 << 16, -1, np.int16)  # pixel value -> label, -1 = not in the table
    for value, label in classes.value_map().items():
        lut[value] = label
    labels = np.empty(values.shape, np.uint8)
    bad: set[int] = set()
    chunk = _rows_per_chunk(values)
    for top in range(0, values.shape[0], chunk):
        block = values[top:top + chunk]
        if block.dtype.itemsize > 2 or np.issubdtype(block.dtype, np.signedinteger):
            outside = (block < 0) | (block > 0xFFFF)
            if outside.any():
                bad.update(np.unique(block[outside]).tolist())
                block = np.where(outside, 0, block)
            block = block.astype(np.uint16)
        mapped = lut[block]
        unknown = mapped < 0
        if unknown.any():
            bad.update(np.unique(block[unknown]).tolist())
        labels[top:top + chunk] = mapped
    if bad:
        listed = "; ".join(f"{e.name}={'/'.join(map(str, e.values))}" for e in classes.entries)
        ignore = f"; ignore={'/'.join(map(str, classes.ignore))}" if classes.ignore else ""
        raise AnnotationError(path, f"mask values {_format_values(sorted(bad))} are not in the "
                                    f"class table ({listed}{ignore})")
    return labels


def load_annotation(path, slide, downsample: float = 4.0,
                    classes: ClassTable | None = None) -> Annotation:
    """Read the annotation mask at ``path`` for ``slide`` (an :class:`h2g.io.slide.Slide`)
    at ``downsample``, its values read through ``classes`` (default: the binary tumour
    table; see the module doc).  Its size must be the slide's level-0 size /
    ``downsample`` rounded down or up, else an :class:`AnnotationError` naming both
    sizes; values the table does not know are an :class:`AnnotationError` too."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    try:
        values = _read_mask_image(path)
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError) as exc:
        raise AnnotationError(path, f"cannot read the mask image: {exc}") from None
    if values.ndim not in (2, 3):
        raise AnnotationError(path, f"mask must be a 2-D image, got shape {values.shape}")
    if values.ndim == 3:
        values = values[..., 0]
    width, height = slide.dimensions
    expected_w = {math.floor(width / downsample), math.ceil(width / downsample)}
    expected_h = {math.floor(height / downsample), math.ceil(height / downsample)}
    mask_h, mask_w = values.shape
    if mask_w not in expected_w or mask_h not in expected_h:
        want = f"{round(width / downsample)}x{round(height / downsample)}"
        raise AnnotationError(
            path, f"mask is {mask_w}x{mask_h} px but slide {slide.path} ({width}x{height}) at "
                  f"downsample {downsample:g} needs {want} px")
    if classes is None or classes == BINARY:
        return Annotation(_binarise(values, path), downsample, path)
    return Annotation.from_labels(_map_labels(values, classes, path), downsample, path, classes)
