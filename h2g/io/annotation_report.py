"""What an annotation holds, for a person to check before training on it: per class its
area in mm^2 and its polygons, the warnings, and outlines over the slide's thumbnail
(``tools/inspect_annotation.py``).  TensorFlow-free."""
from __future__ import annotations

import numpy as np

from h2g.io.annotation import Annotation, PolygonSource
from h2g.io.classes import colour_rgb

#: the longest side of an overlay thumbnail (larger thumbnails are reduced)
OVERLAY_SIDE = 2048


def class_areas(annotation: Annotation, mpp: float) -> list[dict]:
    """``[{"name", "area_mm2", "polygons"}]`` per class of the annotation's table.
    Polygon annotations: the area of the resolved geometry (later shapes cut out of
    earlier ones, exclusions out of all; :meth:`PolygonSource.class_regions`) and the
    polygons read for the class.  Raster annotations: labelled pixels x pixel area at
    the mask's own grid (``polygons`` is None)."""
    source = annotation.source
    names = annotation.classes.names
    if isinstance(source, PolygonSource):
        regions = source.class_regions()
        return [{"name": name, "area_mm2": float(regions[k].area * mpp ** 2 / 1e6) if k in regions else 0.0,
                 "polygons": int(source.polygons.get(k, 0))} for k, name in enumerate(names)]
    grid = getattr(source, "native", annotation.downsample)
    counts = source.pixel_counts(grid)
    return [{"name": name, "area_mm2": float(counts[k] * (grid * mpp) ** 2 / 1e6), "polygons": None}
            for k, name in enumerate(names)]


def annotation_report(annotation: Annotation, slide) -> dict:
    """The facts ``tools/inspect_annotation.py`` prints (its ``--json`` object)."""
    source = annotation.source
    report = {
        "slide": str(slide.path),
        "annotation": str(annotation.path),
        "format": getattr(source, "format_name", "raster mask"),
        "dimensions": list(slide.dimensions),
        "mpp": slide.mpp,
        "classes": class_areas(annotation, slide.mpp),
        "outside": "non-tumour" if source.outside == 0 else "unannotated (ignored)",
        "warnings": list(annotation.warnings),
        "empty": annotation.empty,
    }
    non_tumour = getattr(source, "non_tumour", None)
    if non_tumour:
        report["read_as_non_tumour"] = dict(sorted(non_tumour.items()))
    return report


def outline_overlay(thumbnail: np.ndarray, labels: np.ndarray, colours, skip=()) -> np.ndarray:
    """``thumbnail`` (uint8 RGB) with the outline of each class of ``labels`` (a label
    map over the same extent, any size; nearest-resized to the thumbnail) drawn in the
    class's colour (``#rrggbb``), two pixels wide; classes in ``skip`` are not drawn."""
    import cv2

    height, width = thumbnail.shape[:2]
    if labels.shape != (height, width):
        rows = (np.arange(height) * labels.shape[0] // height)
        cols = (np.arange(width) * labels.shape[1] // width)
        labels = labels[np.ix_(rows, cols)]
    out = np.ascontiguousarray(thumbnail.copy())
    for index, colour in enumerate(colours):
        if index in skip:
            continue
        region = (labels == index).astype(np.uint8)
        if not region.any():
            continue
        contours, _ = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(v) for v in colour_rgb(colour)), 2)
    return out
