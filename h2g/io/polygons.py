"""Polygon annotation files: QuPath GeoJSON, ASAP XML and Aperio ImageScope XML.

:func:`read_polygons` reads one file into :class:`Shape` s (a class name, a valid shapely
``Polygon`` / ``MultiPolygon`` in the file's coordinates, and whether it is an exclusion),
in file order, with one-line warnings about what it skipped or repaired.  The format is
found from the content (:func:`sniff`), not from the suffix:

- **QuPath GeoJSON**: a ``FeatureCollection``, a bare list of Features (older QuPath) or
  one Feature.  ``Polygon`` and ``MultiPolygon`` geometries, holes kept (a
  ``GeometryCollection`` gives its polygons).  The class is
  ``properties.classification.name`` (``names`` joined by ``": "`` for derived classes,
  or the older plain string).  Detection, cell and tile objects (``objectType``, or the
  ``id`` ``PathDetectionObject`` / ``PathCellObject`` / ``PathTileObject`` of QuPath 0.2)
  are skipped and counted; features without a class, and points and lines, are skipped
  with one warning giving their count.  A feature whose properties carry
  ``originOffset`` [x, y] (written by :mod:`h2g.io.geojson` for QuPath's cropped origin)
  is moved back by it to level-0 coordinates.
- **ASAP XML** (CAMELYON16/17, BACH): ``Annotation`` elements with ``PartOfGroup``;
  types ``Polygon``, ``Spline`` (its vertices, read as a polygon) and ``Rectangle``; a
  ``Dot`` (or ``PointSet``) is skipped with a warning.  Groups ``_2`` and ``Exclusion``
  are exclusions, cut out of every other annotation whatever their order; Camelyon's
  ``_0`` and ``_1`` are marked as tumour (:attr:`Shape.tumour_group`).
- **Aperio ImageScope XML**: each ``Annotation`` layer is a class, named by its ``Name``
  attribute or, when that is empty, by its layer description (the ``Description``
  attribute's value).  ``Region`` s are polygons (an ellipse region, two vertices, is its
  inscribed ellipse); a region with ``NegativeROA="1"`` is cut out of its own layer.

Names ``Exclusion`` and QuPath's ``Ignore*`` are exclusions in every format.  A polygon
that intersects itself is repaired with shapely's ``make_valid`` (a warning counts
them); rings with fewer than three distinct points, or no area, are skipped (counted).
Malformed files raise :class:`~h2g.core.errors.AnnotationError` naming the file and the
line (JSON, XML syntax) or the element (structure).  TensorFlow-free.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h2g.core.errors import AnnotationError
from h2g.io.classes import name_key

FORMATS = ("geojson", "asap", "aperio")
FORMAT_NAMES = {"geojson": "QuPath GeoJSON", "asap": "ASAP XML", "aperio": "Aperio ImageScope XML"}
#: names that make a shape an exclusion in every format (compared by name_key)
EXCLUSION_NAMES = frozenset({"exclusion", "ignore*"})
ASAP_EXCLUSION_GROUPS = frozenset({"_2", "Exclusion"})
ASAP_TUMOUR_GROUPS = frozenset({"_0", "_1"})
QUPATH_SKIPPED_OBJECTS = {"detection": "detection", "cell": "cell", "tile": "tile",
                          "PathDetectionObject": "detection", "PathCellObject": "cell",
                          "PathTileObject": "tile"}
ELLIPSE_VERTICES = 64  # vertices of an Aperio ellipse region's polygon
_SNIFF_BYTES = 4096
_RASTER_MAGIC = (b"\x89PNG", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\xff\xd8\xff", b"BM", b"GIF8")


@dataclass(frozen=True)
class Shape:
    """One annotation of a polygon file: its class ``name`` as written, its valid
    ``geometry`` (shapely Polygon or MultiPolygon, file coordinates), whether it is an
    ``exclusion`` (cut out of every other shape, or with a ``scope`` only out of the
    shapes of that ``layer``: an Aperio negative region), whether it is one of Camelyon's
    tumour groups (``tumour_group``) and ``where`` it is in the file."""

    name: str
    geometry: object
    exclusion: bool = False
    scope: str | None = None
    layer: str | None = None
    tumour_group: bool = False
    where: str = ""

    @property
    def polygons(self) -> int:
        """Polygons in the shape (parts of a MultiPolygon counted one by one)."""
        return len(getattr(self.geometry, "geoms", [self.geometry]))


@dataclass
class PolygonFile:
    """The shapes of one annotation file, in file order, and its warnings."""

    path: Path
    format: str
    shapes: list[Shape] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.format]


# ------------------------------------------------------------------ format detection
def sniff(path) -> str | None:
    """The polygon format of ``path`` from its first bytes: ``"geojson"`` (JSON text),
    ``"xml"`` (XML text: ASAP or Aperio, told apart by :func:`read_polygons`), or None
    for anything else (a raster mask: PNG, TIFF, ...)."""
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if any(head.startswith(m) for m in _RASTER_MAGIC):
        return None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"["):
        return "geojson"
    if text[:1] == b"<":
        return "xml"
    return None


def has_image_signature(path) -> bool:
    """Whether ``path`` starts like a PNG, TIFF, JPEG, BMP or GIF image."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return any(head.startswith(m) for m in _RASTER_MAGIC)


def read_polygons(path) -> PolygonFile:
    """Read the polygon annotation file at ``path`` (see the module doc)."""
    path = Path(path)
    kind = sniff(path)
    if kind == "geojson":
        return _read_geojson(path)
    if kind == "xml":
        return _read_xml(path)
    raise AnnotationError(path, "not a polygon annotation (QuPath GeoJSON, ASAP XML or Aperio ImageScope XML)")


# ------------------------------------------------------------------ geometry helpers
class _Builder:
    """Turns rings into valid shapes, counting what it repairs and skips."""

    def __init__(self, path: Path, fmt: str):
        self.out = PolygonFile(path, fmt)
        self.skipped: Counter = Counter()
        self.repaired = 0

    def polygon(self, rings, where: str):
        """A valid Polygon / MultiPolygon of ``rings`` (exterior, holes...), or None when
        degenerate (counted)."""
        import shapely

        exterior, *holes = rings
        if _distinct(exterior) < 3:
            self.skipped["degenerate polygon(s) (fewer than 3 distinct points)"] += 1
            return None
        holes = [h for h in holes if _distinct(h) >= 3]
        try:
            geometry = shapely.Polygon(exterior, holes)
        except (ValueError, shapely.errors.GEOSException) as exc:
            raise AnnotationError(self.out.path, f"{where}: cannot build a polygon: {exc}") from None
        return self.valid(geometry)

    def valid(self, geometry):
        import shapely

        if not geometry.is_valid:
            self.repaired += 1
            geometry = shapely.make_valid(geometry)
        parts = [p for p in shapely.get_parts(_flatten(geometry)) if p.geom_type == "Polygon" and p.area > 0]
        if not parts:
            self.skipped["polygon(s) without area"] += 1
            return None
        return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)

    def add(self, name, geometry, where: str, **kw) -> None:
        if geometry is None:
            return
        name = str(name).strip()
        exclusion = kw.pop("exclusion", False) or name_key(name) in EXCLUSION_NAMES
        self.out.shapes.append(Shape(name, geometry, exclusion=exclusion, where=where, **kw))

    def finish(self) -> PolygonFile:
        if self.repaired:
            self.out.warnings.append(f"{self.repaired} self-intersecting polygon(s) repaired (shapely make_valid)")
        for what, n in self.skipped.items():
            self.out.warnings.append(f"{n} {what} skipped")
        return self.out


def _flatten(geometry):
    """Polygons of a (possibly nested) collection, as one MultiPolygon / Polygon."""
    import shapely

    if geometry.geom_type == "GeometryCollection":
        parts = [p for g in geometry.geoms for p in shapely.get_parts(_flatten(g)) if p.geom_type == "Polygon"]
        return shapely.MultiPolygon(parts) if parts else shapely.Polygon()
    return geometry


def _distinct(ring) -> int:
    if isinstance(ring, np.ndarray):
        return len(np.unique(ring, axis=0)) if len(ring) else 0
    return len({(float(x), float(y)) for x, y in ring})


def _number(value, path: Path, where: str) -> float:
    """A finite coordinate (ASAP writes ``1234,5`` in some locales)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        try:
            number = float(str(value).replace(",", "."))
        except (TypeError, ValueError):
            raise AnnotationError(path, f"{where}: coordinate {value!r} is not a number") from None
    if not math.isfinite(number):
        raise AnnotationError(path, f"{where}: coordinate {value!r} is not finite")
    return number


# ------------------------------------------------------------------ GeoJSON
def _read_geojson(path: Path) -> PolygonFile:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, f"not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(path, f"not UTF-8 text: {exc}") from None
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(path, "FeatureCollection without a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise AnnotationError(path, f"GeoJSON must be a FeatureCollection or a list of Features, got {kind!r}")
    build = _Builder(path, "geojson")
    objects: Counter = Counter()
    unclassified = points = 0
    for number, feature in enumerate(features, start=1):
        where = f"feature {number}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise AnnotationError(path, f"{where} is not a GeoJSON Feature")
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(path, f"{where}: 'properties' is not an object")
        kind = QUPATH_SKIPPED_OBJECTS.get(str(props.get("objectType", props.get("object_type", ""))).lower()) \
            or QUPATH_SKIPPED_OBJECTS.get(str(feature.get("id", "")))
        if kind:
            objects[kind] += 1
            continue
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict) or "type" not in geometry:
            raise AnnotationError(path, f"{where}: no geometry")
        polygons = _geojson_polygons(geometry, path, where)
        if polygons is None:
            points += 1
            continue
        name = _classification(props.get("classification"))
        if not name:
            unclassified += 1
            continue
        offset = _origin_offset(props.get("originOffset"), path, where)
        if offset is not None:
            polygons = [[np.asarray(ring, np.float64) + offset for ring in rings] for rings in polygons]
        shapes = [build.polygon(rings, where) for rings in polygons]
        shapes = [s for s in shapes if s is not None]
        if shapes:
            build.add(name, build.valid(_union_parts(shapes)) if len(shapes) > 1 else shapes[0], where)
    out = build.finish()
    if objects:
        listed = ", ".join(f"{n} {kind}" for kind, n in objects.items())
        out.warnings.insert(0, f"{sum(objects.values())} detection / cell object(s) skipped ({listed})")
    if unclassified:
        out.warnings.insert(0, f"{unclassified} feature(s) without a class (properties.classification) skipped")
    if points:
        out.warnings.insert(0, f"{points} point / line feature(s) skipped (only Polygon and MultiPolygon are areas)")
    return out


def _union_parts(shapes):
    """The parts of a MultiPolygon feature as one geometry (parts that overlap merge)."""
    import shapely

    return shapely.unary_union(shapes)


def _classification(value) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        if isinstance(value.get("name"), str):
            return value["name"].strip()
        names = value.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return ": ".join(n.strip() for n in names)
    return ""


def _origin_offset(value, path: Path, where: str):
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2):
        raise AnnotationError(path, f"{where}: originOffset must be [x, y], got {value!r}")
    return tuple(_number(v, path, where) for v in value)


def _geojson_polygons(geometry: dict, path: Path, where: str):
    """The polygons (lists of rings) of a GeoJSON geometry; None for points and lines."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        return [_rings(coords, path, where)]
    if kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise AnnotationError(path, f"{where}: MultiPolygon coordinates are not a list of polygons")
        return [_rings(c, path, f"{where} part {k + 1}") for k, c in enumerate(coords)]
    if kind == "GeometryCollection":
        out = []
        for member in geometry.get("geometries") or []:
            polygons = _geojson_polygons(member, path, where) if isinstance(member, dict) else None
            out.extend(polygons or [])
        return out or None
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return None
    raise AnnotationError(path, f"{where}: unknown geometry type {kind!r}")


def _rings(coords, path: Path, where: str) -> list[list[tuple[float, float]]]:
    if not isinstance(coords, list) or not coords:
        raise AnnotationError(path, f"{where}: Polygon coordinates are not a list of rings")
    rings = []
    for ring in coords:
        if not isinstance(ring, list):
            raise AnnotationError(path, f"{where}: a ring is not a list of [x, y] positions")
        try:  # the common case, in one numpy pass; anything odd is named below
            array = np.asarray(ring, dtype=np.float64)
            if array.ndim == 2 and array.shape[1] >= 2 and np.isfinite(array[:, :2]).all():
                rings.append(array[:, :2])
                continue
        except (TypeError, ValueError):
            pass
        points = []
        for position in ring:
            if not isinstance(position, list) or len(position) < 2:
                raise AnnotationError(path, f"{where}: position {position!r} is not [x, y]")
            points.append((_number(position[0], path, where), _number(position[1], path, where)))
        rings.append(points)
    return rings


# ------------------------------------------------------------------ XML
def _read_xml(path: Path) -> PolygonFile:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, column = exc.position
        raise AnnotationError(path, f"not valid XML: line {line} column {column}: {exc}") from None
    if root.tag == "ASAP_Annotations":
        return _read_asap(path, root)
    if root.tag == "Annotations":
        return _read_aperio(path, root)
    raise AnnotationError(path, f"XML root <{root.tag}> is neither ASAP (<ASAP_Annotations>) nor Aperio "
                                "ImageScope (<Annotations>)")


def _vertices(parent, tag: str, path: Path, where: str, order: bool) -> list[tuple[float, float]]:
    items = list(parent.iter(tag))
    if order and items and all(i.get("Order") is not None for i in items):
        try:
            items.sort(key=lambda i: int(i.get("Order")))
        except ValueError:
            raise AnnotationError(path, f"{where}: a <{tag}> Order is not an integer") from None
    points = []
    for k, item in enumerate(items):
        x, y = item.get("X"), item.get("Y")
        if x is None or y is None:
            raise AnnotationError(path, f"{where}: <{tag}> {k + 1} has no X or Y attribute")
        points.append((_number(x, path, f"{where} <{tag}> {k + 1}"), _number(y, path, f"{where} <{tag}> {k + 1}")))
    return points


def _read_asap(path: Path, root) -> PolygonFile:
    build = _Builder(path, "asap")
    dots = unclassified = 0
    for number, element in enumerate(root.iter("Annotation"), start=1):
        label = element.get("Name") or str(number)
        where = f"<Annotation> {number} ({label!r})"
        kind = (element.get("Type") or "Polygon").strip().lower()
        if kind in ("dot", "pointset"):
            dots += 1
            continue
        if kind not in ("polygon", "spline", "rectangle"):
            build.skipped[f"<Annotation> of type {element.get('Type')!r}"] += 1
            continue
        group = (element.get("PartOfGroup") or "").strip()
        points = _vertices(element, "Coordinate", path, where, order=True)
        if kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        if not group or group == "None":
            unclassified += 1
            continue
        build.add(group, build.polygon([points], where), where, exclusion=group in ASAP_EXCLUSION_GROUPS,
                  tumour_group=group in ASAP_TUMOUR_GROUPS)
    out = build.finish()
    if dots:
        out.warnings.insert(0, f"{dots} Dot annotation(s) skipped (a point has no area)")
    if unclassified:
        out.warnings.insert(0, f"{unclassified} annotation(s) without a group (PartOfGroup) skipped")
    return out


def _layer_name(layer) -> str:
    name = (layer.get("Name") or "").strip()
    if name:
        return name
    attributes = [a for a in layer.findall("Attributes/Attribute") if (a.get("Value") or "").strip()]
    described = [a for a in attributes if (a.get("Name") or "").strip().lower() == "description"]
    for attribute in described or attributes:
        return attribute.get("Value").strip()
    return ""


def _read_aperio(path: Path, root) -> PolygonFile:
    import shapely

    build = _Builder(path, "aperio")
    unclassified = 0
    for number, layer in enumerate(root.findall("Annotation"), start=1):
        name = _layer_name(layer)
        scope = f"layer {number}"
        regions = layer.findall("Regions/Region")
        if not name:
            unclassified += len(regions)
            continue
        for k, region in enumerate(regions, start=1):
            where = f"<Region> {region.get('Id') or k} of layer {number} ({name!r})"
            points = _vertices(region, "Vertex", path, where, order=False)
            if region.get("Type") == "2" and len(points) == 2:  # an ellipse: its bounding box
                (x0, y0), (x1, y1) = points
                centre = ((x0 + x1) / 2, (y0 + y1) / 2)
                circle = shapely.Point(0, 0).buffer(1.0, quad_segs=ELLIPSE_VERTICES // 4)
                points = [(centre[0] + x * abs(x1 - x0) / 2, centre[1] + y * abs(y1 - y0) / 2)
                          for x, y in circle.exterior.coords]
            if _distinct(points) < 3:
                build.skipped["<Region>(s) that are not areas (fewer than 3 vertices: arrows, rulers)"] += 1
                continue
            negative = (region.get("NegativeROA") or "0").strip() == "1"
            build.add(name, build.polygon([points], where), where, exclusion=negative,
                      scope=scope if negative else None, layer=scope)
    out = build.finish()
    if unclassified:
        out.warnings.insert(0, f"{unclassified} region(s) of layers without a name or description skipped")
    return out
