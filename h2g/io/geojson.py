"""Segmentations as GeoJSON that QuPath imports: outlines in level-0 pixel coordinates.

- :func:`tumour_geojson`: H2G-Net's one "Tumor" annotation of a binary mask;
- :func:`class_geojson`: one annotation per class of a label map (multi-class systems),
  each with its QuPath classification (name and colour).

Outlines come from :func:`mask_polygons` (OpenCV contours through pixel centres, holes
kept).  TensorFlow-free.
"""
from __future__ import annotations

import numpy as np

TUMOUR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}


def _ring(points: np.ndarray, sx: float, sy: float) -> list[list[float]]:
    """A closed ring in level-0 coordinates from mask-pixel (col, row) points."""
    ring = [[round((x + 0.5) * sx, 2), round((y + 0.5) * sy, 2)] for x, y in points]
    return ring + [ring[0]]


def _box_ring(points: np.ndarray, sx: float, sy: float) -> list[list[float]]:
    """The outline of the pixels spanned by ``points`` (for blobs too thin to have an
    area through pixel centres: single pixels, one-pixel lines)."""
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0) + 1
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return [[round(x * sx, 2), round(y * sy, 2)] for x, y in corners]


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def mask_polygons(mask: np.ndarray, dimensions: tuple[int, int]) -> list[list[list[list[float]]]]:
    """Polygons (exterior ring, then hole rings) of the connected regions of ``mask``
    (S_h x S_w over the slide's level-0 extent ``dimensions``), in level-0 pixels.
    Contours come from ``cv2.findContours`` through pixel centres; rings are closed and
    have at least 4 points; holes without area are dropped."""
    import cv2

    height_px, width_px = mask.shape
    sx, sy = dimensions[0] / width_px, dimensions[1] / height_px
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1:  # a hole: added with its parent
            continue
        points = contour[:, 0, :]
        rings = [_ring(points, sx, sy) if _area(points) > 0 else _box_ring(points, sx, sy)]
        child = hierarchy[0][i][2]
        while child != -1:
            hole = contours[child][:, 0, :]
            if _area(hole) > 0:
                rings.append(_ring(hole, sx, sy))
            child = hierarchy[0][child][0]
        polygons.append(rings)
    return polygons


def _feature(mask: np.ndarray, dimensions: tuple[float, float], name: str, classification: dict) -> dict | None:
    """One annotation Feature outlining ``mask`` (Polygon or MultiPolygon), or None
    when the mask is empty."""
    polygons = mask_polygons(mask, dimensions)
    if not polygons:
        return None
    if len(polygons) == 1:
        geometry = {"type": "Polygon", "coordinates": polygons[0]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", "name": name, "classification": classification}}


def tumour_geojson(mask: np.ndarray, dimensions: tuple[int, int]) -> dict:
    """The tumour outline of ``mask`` as a GeoJSON FeatureCollection that QuPath imports:
    one "Tumor" annotation (Polygon, or MultiPolygon for several regions) in level-0
    pixel coordinates; no features when the mask is empty."""
    feature = _feature(mask, dimensions, "H2G-Net tumour", TUMOUR_CLASS)
    return {"type": "FeatureCollection", "features": [feature] if feature else []}


def class_geojson(labels: np.ndarray, dimensions: tuple[float, float], classes, skip=()) -> dict:
    """A FeatureCollection with one annotation per class present in ``labels`` (an
    ``(H, W)`` map of class indices over the level-0 ``dimensions`` = (w, h) its pixels
    span; other values, e.g. -1 for "not segmented", are ignored).  ``classes`` lists
    ``{"name", "colour"}`` by index; each feature's ``classification`` is QuPath's
    ``{"name", "color"}``.  Class names in ``skip`` get no feature."""
    features = []
    for index, cls in enumerate(classes):
        if cls["name"] in skip:
            continue
        colour = [int(v) for v in cls.get("colour", cls.get("color", (128, 128, 128)))]
        feature = _feature(labels == index, dimensions, cls["name"], {"name": cls["name"], "color": colour})
        if feature:
            features.append(feature)
    return {"type": "FeatureCollection", "features": features}
