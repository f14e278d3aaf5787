"""Segmentations as GeoJSON that QuPath imports, and reads back as annotations.

- :func:`tumour_geojson`: H2G-Net's one "Tumor" annotation of a binary mask;
- :func:`class_geojson`: one annotation per class of a label map (multi-class systems,
  the embedded cohort's label maps), each with its QuPath classification (name, colour).

Outlines come from :func:`mask_polygons`: the exact outline of the mask's pixels (the
edges between pixels, holes kept), so reading the GeoJSON back
(:func:`h2g.io.annotation.load_annotation`, which labels a pixel by the polygon its centre
lies in) on the mask's own grid gives the mask again, pixel for pixel.

Coordinates are level-0 pixels of the slide as OpenSlide reads it (``origin="level0"``,
the default).  For a slide with OpenSlide bounds (``openslide.bounds-x`` /
``bounds-y``: MRXS and some other formats scan only part of the glass) QuPath shows the
image cropped to those bounds, so its coordinates start at the bounds' corner:
``origin="bounds"`` writes coordinates in that cropped frame (:func:`origin_offset`).
Every feature says which frame it uses in its properties: ``coordinateOrigin``
(``"level0"`` or ``"bounds"``) and, for ``"bounds"``, ``originOffset`` = the level-0
position of its (0, 0), which :mod:`h2g.io.polygons` adds back when it reads the file.
TensorFlow-free.
"""
from __future__ import annotations

import numpy as np

TUMOUR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}
ORIGINS = ("level0", "bounds")
#: masks larger than this many pixels are outlined band by band (bounds the 2x upsample)
BAND_PIXELS = 1 << 24


def origin_offset(slide, origin: str = "level0") -> tuple[float, float]:
    """The level-0 position of the coordinates' (0, 0) for ``origin``: ``"level0"`` ->
    (0, 0); ``"bounds"`` -> the slide's OpenSlide bounds corner (``bounds_offset``;
    (0, 0) for slides without bounds)."""
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {', '.join(ORIGINS)}, got {origin!r}")
    if origin == "level0":
        return (0.0, 0.0)
    return tuple(float(v) for v in getattr(slide, "bounds_offset", (0, 0)))


def _outline(mask: np.ndarray, top: int):
    """Shapely polygons of the pixels of ``mask`` (rows offset by ``top``): contours of
    the 2x-upsampled mask through its border pixels' centres, which lie a quarter pixel
    inside the pixel edges, rounded onto the pixel corners."""
    import cv2
    import shapely

    up = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1:  # a hole: added with its parent
            continue
        rings = [_corners(contour, top)]
        child = hierarchy[0][i][2]
        while child != -1:
            rings.append(_corners(contours[child], top))
            child = hierarchy[0][child][0]
        rings = [r for r in rings if len(r) >= 3]
        if not rings or rings is None:
            continue
        polygon = shapely.Polygon(rings[0], rings[1:])
        if not polygon.is_valid:  # rings touching themselves at diagonal pixel corners
            polygon = shapely.make_valid(polygon)
        polygons.extend(p for p in shapely.get_parts(polygon) if p.geom_type == "Polygon" and p.area > 0)
    return polygons


def _corners(contour: np.ndarray, top: int) -> np.ndarray:
    points = np.round((contour[:, 0, :].astype(np.float64) + 0.5) / 2)
    points[:, 1] += top
    keep = np.ones(len(points), bool)
    keep[1:] = np.any(points[1:] != points[:-1], axis=1)
    points = points[keep]
    if len(points) > 1 and np.all(points[0] == points[-1]):
        points = points[:-1]
    return points


def mask_polygons(mask: np.ndarray, dimensions: tuple[float, float],
                  offset: tuple[float, float] = (0.0, 0.0)) -> list[list[list[list[float]]]]:
    """Polygons (exterior ring, then hole rings) outlining the pixels of ``mask`` (S_h x
    S_w over the slide's level-0 extent ``dimensions``), in level-0 pixels minus
    ``offset``; rings are closed and follow the pixel edges exactly.  Large masks are
    outlined band by band and the pieces merged."""
    import shapely

    height_px, width_px = mask.shape
    sx, sy = dimensions[0] / width_px, dimensions[1] / height_px
    band = max(1, BAND_PIXELS // max(1, width_px))
    pieces = []
    for top in range(0, height_px, band):
        pieces.extend(_outline(mask[top:top + band], top))
    if not pieces:
        return []
    if height_px > band:  # pieces cut at band borders: merge them
        merged = shapely.unary_union(pieces)
        pieces = [p for p in shapely.get_parts(merged) if p.geom_type == "Polygon"]
    polygons = []
    for polygon in pieces:
        polygon = shapely.geometry.polygon.orient(polygon, sign=1.0)
        rings = [polygon.exterior, *polygon.interiors]
        polygons.append([[[round(x * sx - offset[0], 2), round(y * sy - offset[1], 2)] for x, y in ring.coords]
                         for ring in rings])
    return polygons


def _feature(mask: np.ndarray, dimensions: tuple[float, float], name: str, classification: dict,
             offset: tuple[float, float]) -> dict | None:
    """One annotation Feature outlining ``mask`` (Polygon or MultiPolygon), or None
    when the mask is empty."""
    polygons = mask_polygons(mask, dimensions, offset)
    if not polygons:
        return None
    if len(polygons) == 1:
        geometry = {"type": "Polygon", "coordinates": polygons[0]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
    properties = {"objectType": "annotation", "name": name, "classification": classification,
                  "coordinateOrigin": "level0" if offset == (0.0, 0.0) else "bounds"}
    if offset != (0.0, 0.0):
        properties["originOffset"] = [float(offset[0]), float(offset[1])]
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def tumour_geojson(mask: np.ndarray, dimensions: tuple[int, int],
                   offset: tuple[float, float] = (0.0, 0.0)) -> dict:
    """The tumour outline of ``mask`` as a GeoJSON FeatureCollection that QuPath imports:
    one "Tumor" annotation (Polygon, or MultiPolygon for several regions) in level-0
    pixel coordinates minus ``offset`` (:func:`origin_offset`); no features when the mask
    is empty."""
    feature = _feature(mask, dimensions, "H2G-Net tumour", TUMOUR_CLASS, tuple(map(float, offset)))
    return {"type": "FeatureCollection", "features": [feature] if feature else []}


def class_geojson(labels: np.ndarray, dimensions: tuple[float, float], classes, skip=(),
                  offset: tuple[float, float] = (0.0, 0.0)) -> dict:
    """A FeatureCollection with one annotation per class present in ``labels`` (an
    ``(H, W)`` map of class indices over the level-0 ``dimensions`` = (w, h) its pixels
    span; other values, e.g. -1 for "not segmented", are ignored).  ``classes`` lists
    ``{"name", "colour"}`` by index; each feature's ``classification`` is QuPath's
    ``{"name", "color"}``.  Class names in ``skip`` get no feature.  Coordinates are
    level-0 pixels minus ``offset`` (:func:`origin_offset`)."""
    features = []
    for index, cls in enumerate(classes):
        if cls["name"] in skip:
            continue
        colour = [int(v) for v in cls.get("colour", cls.get("color", (128, 128, 128)))]
        feature = _feature(labels == index, dimensions, cls["name"], {"name": cls["name"], "color": colour},
                           tuple(map(float, offset)))
        if feature:
            features.append(feature)
    return {"type": "FeatureCollection", "features": features}
