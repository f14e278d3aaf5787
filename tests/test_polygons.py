"""Polygon annotations (QuPath GeoJSON, ASAP XML, Aperio ImageScope XML) wherever a mask
is accepted: parsing, class names through the class table, the semantics (full / partial,
later wins, exclusions, repairs, clipping, extent), the rasteriser, lazily read raster
masks, and the QuPath round trip.

Expectations come from hand-placed rectangles (exact pixel counts), from matplotlib's
point-in-polygon test on pixel centres (an independent rasteriser) and from the masks a
GeoJSON was written from.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from helpers import centres_inside
from PIL import Image

from h2g.core.errors import AnnotationError
from h2g.io import annotation as annotation_module
from h2g.io.annotation import IGNORE, load_annotation
from h2g.io.classes import BINARY, ClassTable, load_class_table
from h2g.io.geojson import class_geojson, tumour_geojson
from h2g.io.rasterise import fill, polygon_edges

W, H = 4000, 3000  # the stub slide's level-0 size


def stub_slide(width=W, height=H):
    return SimpleNamespace(dimensions=(width, height), path=Path("stub.svs"), mpp=0.25)


def box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(rings_or_polys, name=None, multi=False, **props):
    geometry = {"type": "MultiPolygon" if multi else "Polygon", "coordinates": rings_or_polys}
    properties = dict(props)
    if name is not None:
        properties.setdefault("classification", {"name": name, "color": [200, 0, 0]})
    properties.setdefault("objectType", "annotation")
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def write_geojson(path, features, bare=False):
    path.write_text(json.dumps(features if bare else {"type": "FeatureCollection", "features": features}))
    return path


THREE = ClassTable.of([("stroma", 1), ("tumour", 2, "", ("Invasive_Carcinoma", "_0", "_1")), ("fat", 3)], ignore=[0])


# ------------------------------------------------------------------ the rasteriser
def test_rasteriser_labels_pixel_centres_like_an_independent_point_in_polygon_test():
    import shapely

    rng = np.random.default_rng(3)
    for _ in range(10):
        centre = rng.uniform(60, 240, 2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
        radii = rng.uniform(20, 80, 14)
        outer = np.c_[centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)]
        hole = centre + 8 * np.c_[np.cos(angles), np.sin(angles)]
        canvas = np.zeros((150, 160), np.uint8)
        fill(canvas, polygon_edges(shapely.Polygon(outer, [hole])), 7, sx=2.0, sy=2.0)
        want = centres_inside([[outer, hole]], canvas.shape, 2.0)
        np.testing.assert_array_equal(canvas == 7, want)
    # a rectangle's pixels: centres strictly inside [10.2, 20.2) -> pixels 10..19 (centres 10.5..19.5)
    canvas = np.zeros((30, 30), np.uint8)
    fill(canvas, polygon_edges(shapely.box(10.2, 10.2, 20.2, 20.2)), 1)
    assert np.argwhere(canvas).min(axis=0).tolist() == [10, 10] and np.argwhere(canvas).max(axis=0).tolist() == [19, 19]
    # why not OpenCV's fillPoly (the README): it also draws the outline, one more pixel row and column here
    import cv2

    opencv = np.zeros((30, 30), np.uint8)
    corners = (np.array([[10.2, 10.2], [20.2, 10.2], [20.2, 20.2], [10.2, 20.2]]) - 0.5) * 256  # centres at j + 0.5
    cv2.fillPoly(opencv, [np.round(corners).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=8)
    assert opencv.sum() == 11 * 11 and canvas.sum() == 10 * 10


# ------------------------------------------------------------------ QuPath GeoJSON
def test_geojson_polygons_holes_multipolygons_and_what_is_skipped(tmp_path, caplog):
    features = [
        feature([box(400, 400, 1200, 1200), box(600, 600, 800, 800)], "Tumor"),          # with a hole
        feature([[box(2000, 400, 2400, 800)], [box(2800, 400, 3200, 800)]], "tumour", multi=True),
        feature([box(400, 2000, 800, 2400)], "Stroma"),                                   # non-tumour
        feature([box(0, 0, 100, 100)], "Tumor", objectType="detection"),
        feature([box(0, 0, 100, 100)], "Tumor", objectType="cell"),
        feature([box(3000, 2000, 3400, 2400)]),                                            # no class
        {"type": "Feature", "id": "PathDetectionObject", "geometry": {"type": "Polygon",
         "coordinates": [box(0, 0, 50, 50)]}, "properties": {"classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
         "properties": {"classification": "Tumor"}},
    ]
    path = write_geojson(tmp_path / "a.json", features)
    with caplog.at_level(logging.INFO, logger="h2g.io.annotation"):
        annotation = load_annotation(path, stub_slide(), downsample=8)
    assert annotation.kind == "polygons" and annotation.classes == BINARY
    text = "\n".join(annotation.warnings)
    assert "3 detection / cell object(s) skipped (2 detection, 1 cell)" in text
    assert "1 feature(s) without a class" in text and "1 point / line feature(s)" in text
    assert "'Stroma' (1 polygon(s))" in caplog.text  # names read as non-tumour are logged
    want = centres_inside([[box(400, 400, 1200, 1200), box(600, 600, 800, 800)], [box(2000, 400, 2400, 800)],
                           [box(2800, 400, 3200, 800)]], annotation.shape, 8)
    np.testing.assert_array_equal(annotation.mask, want)
    assert annotation.shape == (375, 500) and set(np.unique(annotation.labels)) == {0, 1}  # full: outside = 0
    assert annotation.mask.sum() == (100 * 100 - 25 * 25) + 2 * 50 * 50
    # a bare list of Features (older QuPath) with the class as a plain string
    bare = write_geojson(tmp_path / "b.geojson", [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [box(400, 400, 1200, 1200)]}, "properties": {"classification": "Tumor"}}],
        bare=True)
    assert load_annotation(bare, stub_slide(), downsample=8).mask.sum() == 100 * 100


def test_label_map_manifests_are_partial_later_shapes_win_exclusions_always_win(tmp_path):
    features = [
        feature([box(0, 0, 2000, 2000)], "Stroma"),
        feature([box(1000, 1000, 3000, 2000)], "invasive-carcinoma"),  # alias, case and '-' / '_' ignored
        feature([box(800, 800, 1200, 1200)], "Exclusion"),              # an exclusion
        feature([box(500, 500, 900, 900)], "FAT"),                      # later than the exclusion, still cut
    ]
    annotation = load_annotation(write_geojson(tmp_path / "p.geojson", features), stub_slide(), downsample=100,
                                 classes=THREE)
    labels = annotation.labels
    assert labels.shape == (30, 40)
    assert labels[2, 2] == 0 and labels[15, 25] == 1 and labels[25, 35] == IGNORE  # outside: unannotated
    assert labels[10, 15] == 1                      # tumour drawn after stroma wins where they overlap
    assert (labels[8:12, 8:12] == IGNORE).all()     # the exclusion cuts out stroma, tumour and fat alike
    assert labels[6, 6] == 2 and labels[8, 6] == 2 and labels[4, 4] == 0  # fat (outside the exclusion) over stroma


def test_unknown_class_names_are_one_error_naming_the_name_the_file_and_the_table(tmp_path):
    table_path = tmp_path / "m.classes.csv"
    table_path.write_text("name,value,colour,aliases\nstroma,1,,\ntumour,2,,Tumor;_0;_1\nfat,3,,adipose\nignore,0,,\n")
    table = load_class_table(table_path)
    path = write_geojson(tmp_path / "typo.geojson", [feature([box(0, 0, 10, 10)], "Tumor"),
                                                     feature([box(0, 0, 10, 10)], "Strom")])
    with pytest.raises(AnnotationError) as info:
        load_annotation(path, stub_slide(), classes=table)
    message = str(info.value)
    assert "\n" not in message and "typo.geojson" in message and "'Strom'" in message
    assert "m.classes.csv" in message and "stroma" in message and "fat (adipose)" in message
    ok = write_geojson(tmp_path / "ok.geojson", [feature([box(0, 0, 400, 400)], "Adipose"),
                                                 feature([box(400, 0, 800, 400)], " tumor ")])
    labels = load_annotation(ok, stub_slide(), downsample=100, classes=table).labels
    assert labels[1, 1] == 2 and labels[1, 5] == 1


def test_repairs_clipping_extent_and_all_outside(tmp_path):
    bowtie = [[0, 0], [1000, 1000], [1000, 0], [0, 1000], [0, 0]]  # intersects itself
    path = write_geojson(tmp_path / "r.geojson", [feature([bowtie], "Tumor"),
                                                  feature([box(3500, 2500, 4500, 3500)], "Tumor")])
    annotation = load_annotation(path, stub_slide(), downsample=100)
    text = " ".join(annotation.warnings)
    assert "1 self-intersecting polygon(s) repaired" in text and "1 shape(s) reach outside the slide" in text
    # make_valid keeps both triangles of the bow-tie; the clipped square keeps its inside part
    assert annotation.mask[5, 9] and annotation.mask[5, 1] and not annotation.mask[1, 5] and not annotation.mask[9, 5]
    assert annotation.mask[25:, 35:].all() and annotation.mask.sum() > 0
    wrong_level = write_geojson(tmp_path / "level0_of_a_bigger_slide.geojson", [feature([box(0, 0, 7000, 2000)], "Tumor")])
    with pytest.raises(AnnotationError, match=r"more than 1.5x the slide's 4000x3000.*another pyramid level or scale"):
        load_annotation(wrong_level, stub_slide())
    outside = write_geojson(tmp_path / "outside.geojson", [feature([box(4100, 100, 4500, 500)], "Tumor")])
    with pytest.raises(AnnotationError, match="every polygon lies outside the slide"):
        load_annotation(outside, stub_slide())


def test_malformed_files_name_the_line_or_element(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection",\n "features": [\n  {"type": "Feature" "geometry": null}]}')
    with pytest.raises(AnnotationError, match=r"bad.geojson: not valid JSON: line 3 column"):
        load_annotation(bad, stub_slide())
    structure = write_geojson(tmp_path / "s.geojson", [feature([box(0, 0, 9, 9)], "Tumor"),
                                                       feature([[[0, 0], [5, "x"], [9, 9]]], "Tumor")])
    with pytest.raises(AnnotationError, match=r"s.geojson: feature 2: coordinate 'x' is not a number"):
        load_annotation(structure, stub_slide())
    xml = tmp_path / "bad.xml"
    xml.write_text('<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n<Annotation Name="a">\n'
                   "</Annotations>\n</ASAP_Annotations>\n")
    with pytest.raises(AnnotationError, match=r"bad.xml: not valid XML: line 5 column"):
        load_annotation(xml, stub_slide())
    element = tmp_path / "e.xml"
    element.write_text('<ASAP_Annotations><Annotations><Annotation Name="A 1" Type="Polygon" PartOfGroup="_0">'
                       '<Coordinates><Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="5"/>'
                       "</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    with pytest.raises(AnnotationError, match=r"<Annotation> 1 \('A 1'\): <Coordinate> 2 has no X or Y"):
        load_annotation(element, stub_slide())


def test_an_empty_geojson_is_an_unannotated_slide_for_training_and_an_error_for_a_test_slide(tmp_path, caplog):
    empty = write_geojson(tmp_path / "empty.geojson", [])
    with caplog.at_level(logging.WARNING, logger="h2g.io.annotation"):
        annotation = load_annotation(empty, stub_slide(), downsample=100)
    assert annotation.empty and not annotation.mask.any() and "no annotated polygon" in caplog.text
    with pytest.raises(AnnotationError, match="needs its annotation"):
        load_annotation(empty, stub_slide(), required=True)


# ------------------------------------------------------------------ ASAP and Aperio XML
def _asap(annotations, groups=("_0", "_1", "_2")) -> str:
    out = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for name, kind, group, points in annotations:
        out.append(f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58"><Coordinates>')
        # written out of order: the Order attribute decides
        for order, (x, y) in reversed(list(enumerate(points))):
            out.append(f'<Coordinate Order="{order}" X="{x}" Y="{y}" />')
        out.append("</Coordinates></Annotation>")
    out += ["</Annotations>", "<AnnotationGroups>"]
    out += [f'<Group Name="{g}" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>' for g in groups]
    out += ["</AnnotationGroups>", "</ASAP_Annotations>"]
    return "\n".join(out)


def test_asap_camelyon_groups_exclusions_in_any_order_and_dots(tmp_path, caplog):
    corners = lambda x0, y0, x1, y1: box(x0, y0, x1, y1)[:4]  # noqa: E731
    text = _asap([
        ("Annotation 0", "Polygon", "_2", corners(1000, 1000, 1400, 1400)),     # exclusion before the tumour
        ("Annotation 1", "Polygon", "_0", corners(600, 600, 2000, 2000)),
        ("Annotation 2", "Spline", "_1", corners(2400, 600, 3000, 1200)),
        ("Annotation 3", "Rectangle", "Tumor", [(200, 2400), (600, 2800)]),
        ("Annotation 4", "Dot", "_0", [(50, 50)]),
        ("Annotation 5", "Polygon", "Exclusion", corners(2500, 700, 2600, 800)),
    ])
    path = tmp_path / "camelyon.xml"
    path.write_text(text)
    annotation = load_annotation(path, stub_slide(), downsample=100)
    assert any("1 Dot annotation(s) skipped" in w for w in annotation.warnings)
    tumour = (box(600, 600, 2000, 2000), box(2400, 600, 3000, 1200), box(200, 2400, 600, 2800))
    want = centres_inside([[t] for t in tumour], annotation.shape, 100)
    want &= ~centres_inside([[box(1000, 1000, 1400, 1400)], [box(2500, 700, 2600, 800)]], annotation.shape, 100)
    np.testing.assert_array_equal(annotation.mask, want)
    assert annotation.mask.sum() == 14 * 14 - 4 * 4 + 6 * 6 - 1 + 4 * 4
    # the same file with a multi-class table: _0 / _1 are its tumour class (here also by alias)
    labels = load_annotation(path, stub_slide(), downsample=100, classes=THREE).labels
    assert labels[7, 7] == 1 and labels[11, 11] == IGNORE and labels[0, 0] == IGNORE


def test_aperio_layers_by_name_or_description_and_negative_regions(tmp_path):
    def region(x0, y0, x1, y1, negative=0, kind=0):
        vertices = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in box(x0, y0, x1, y1)[:4])
        return (f'<Region Id="1" Type="{kind}" NegativeROA="{negative}"><Attributes/>'
                f"<Vertices>{vertices}</Vertices></Region>")

    ellipse = ('<Region Id="9" Type="2" NegativeROA="0"><Vertices><Vertex X="2000" Y="2000"/>'
               '<Vertex X="3000" Y="2600"/></Vertices></Region>')
    text = ('<Annotations MicronsPerPixel="0.25">'
            '<Annotation Id="1" Name="Tumor"><Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>'
            f"<Regions>{region(400, 400, 1600, 1600)}{region(800, 800, 1200, 1200, negative=1)}{ellipse}</Regions>"
            "</Annotation>"
            '<Annotation Id="2" Name=""><Attributes><Attribute Name="Description" Id="0" Value="Stroma"/></Attributes>'
            f"<Regions>{region(1000, 1000, 1400, 1400)}</Regions></Annotation>"
            "</Annotations>")
    path = tmp_path / "aperio.xml"
    path.write_text(text)
    labels = load_annotation(path, stub_slide(), downsample=100, classes=THREE).labels
    assert labels[5, 5] == 1                        # tumour layer
    assert labels[9, 9] == IGNORE                   # cut out of the tumour layer by its negative region ...
    assert labels[11, 11] == 0                      # ... while the stroma layer (later) covers its own part
    ellipse_px = centres_inside([[np.c_[2500 + 500 * np.cos(t), 2300 + 300 * np.sin(t)]]
                                 for t in [np.linspace(0, 2 * np.pi, 400)]], labels.shape, 100)
    agree = ((labels == 1) == ellipse_px)[18:30, 15:35].mean()
    assert agree > 0.97 and labels[23, 25] == 1     # the ellipse of the two vertices


# ------------------------------------------------------------------ patch grids and truths
def test_patch_grid_and_truth_grid_from_polygons(tmp_path):
    from h2g.tiling.grid import build_patch_grid
    from h2g.tiling.tissue import TissueMask

    slide = SimpleNamespace(dimensions=(4096, 4096), path=Path("s.svs"), mpp=0.25,
                            downsample_for=lambda m: 40 / m)
    features = [feature([box(1024, 0, 2048, 1024)], "Tumor"),                  # patch (0, 1): 100 %
                feature([box(0, 1024, 1024, 1024 + 256)], "Tumor"),            # patch (1, 0): 25 % -> discarded
                feature([box(0, 2048, 1024, 2048 + 260)], "Tumor")]            # patch (2, 0): 25.4 % -> tumour
    path = write_geojson(tmp_path / "g.geojson", features)
    annotation = load_annotation(path, slide)
    tissue = TissueMask(np.ones((128, 128), bool), 32.0)
    grid = build_patch_grid(slide, tissue, annotation)
    labels = {tuple(c): int(v) for c, v in zip(grid.coords.tolist(), grid.labels)}
    assert labels[(1024, 0)] == 1 and labels[(0, 2048)] == 1 and (0, 1024) not in labels and labels[(0, 0)] == 0
    assert grid.counts == {"tumour": 2, "non_tumour": 13, "discarded": 1, "background": 0}
    from h2g.inference.lowres import target_mask

    truth = target_mask(path, slide, 16)  # 256 level-0 px per cell
    assert truth[0:4, 4:8].all() and truth[4, 0:4].all() and truth[8, 0:4].all() and truth.sum() == 16 + 4 + 4


# ------------------------------------------------------------------ raster masks, read lazily
def _pyramid_mask(path, values, levels=(1, 4)):
    with tifffile.TiffWriter(path) as tif:
        for k, factor in enumerate(levels):
            level = values[factor // 2::factor, factor // 2::factor] if factor > 1 else values
            tif.write(level, tile=(64, 64), compression="zlib", subfiletype=0 if k == 0 else 1)
    return path


def test_large_raster_masks_are_read_by_region_with_the_same_labels(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    values = np.zeros((750, 1000), np.uint8)
    for _ in range(30):
        x, y = rng.integers(0, 900), rng.integers(0, 650)
        values[y:y + rng.integers(10, 100), x:x + rng.integers(10, 100)] = rng.choice([1, 2, 3])
    path = _pyramid_mask(tmp_path / "labels.tiff", values)
    whole = load_annotation(path, stub_slide(), downsample=4, classes=THREE)
    monkeypatch.setattr(annotation_module, "IN_MEMORY_BYTES", 1000)
    lazy = load_annotation(path, stub_slide(), downsample=4, classes=THREE)
    assert whole.source.in_memory and not lazy.source.in_memory
    np.testing.assert_array_equal(lazy.labels, whole.labels)
    np.testing.assert_array_equal(lazy.sample(333, 77, 4, 4, 300, 200), whole.sample(333, 77, 4, 4, 300, 200))
    np.testing.assert_allclose(lazy.class_fractions(1024, (3, 4)), whole.class_fractions(1024, (3, 4)))
    # the truth grid: box-filtered whole (PIL, as before) or by rows above BOX_FILTER_PIXELS (exact
    # overlap areas; PIL's box kernel weighs the border pixels of fractional cells a little differently)
    boxed = whole.coverage(1, 50, 40)
    monkeypatch.setattr(annotation_module, "BOX_FILTER_PIXELS", 1000)
    by_rows = whole.coverage(1, 50, 40)
    assert np.abs(by_rows - boxed).mean() < 0.002 and np.abs(by_rows - boxed).max() < 0.03
    # a coarse grid reads the pyramid's second level (downsample 16): its centre samples
    coarse = lazy.sample(0, 0, 16, 16, 250, 187)
    np.testing.assert_array_equal(coarse, THREE_LUT[values[2::4, 2::4][:187, :250]])


THREE_LUT = np.full(256, 99, np.uint8)
THREE_LUT[[0, 1, 2, 3]] = [IGNORE, 0, 1, 2]


def test_any_mask_downsample_and_the_png_pixel_limit(tmp_path, monkeypatch):
    values = np.zeros((375, 500), np.uint8)
    values[100:200, 50:150] = 255
    Image.fromarray(values).save(tmp_path / "ds8.png")
    annotation = load_annotation(tmp_path / "ds8.png", stub_slide(), downsample=4)
    assert annotation.source.native == 8 and annotation.shape == (750, 1000)
    assert annotation.mask.sum() == 4 * 100 * 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(AnnotationError, match="over PIL's limit.*tiled"):
        load_annotation(tmp_path / "ds8.png", stub_slide())


# ------------------------------------------------------------------ QuPath round trip
def test_qupath_round_trip_of_our_geojson_gives_the_mask_again(tmp_path):
    from scipy import ndimage

    rng = np.random.default_rng(1)
    mask = ndimage.gaussian_filter(rng.normal(size=(375, 500)), 5) > 0.03
    path = tmp_path / "tumour.geojson"
    path.write_text(json.dumps(tumour_geojson(mask, (W, H))))
    back = load_annotation(path, stub_slide(), downsample=8).mask
    assert (back & mask).sum() / (back | mask).sum() >= 0.99
    np.testing.assert_array_equal(back, mask)  # pixel outlines: exact
    # QuPath's cropped frame (slides with OpenSlide bounds): the offset is recorded and undone
    shifted = tumour_geojson(mask, (W, H), offset=(120, 40))
    props = shifted["features"][0]["properties"]
    assert props["coordinateOrigin"] == "bounds" and props["originOffset"] == [120.0, 40.0]
    path.write_text(json.dumps(shifted))
    np.testing.assert_array_equal(load_annotation(path, stub_slide(), downsample=8).mask, mask)
    # a label map's classes
    labels = rng.integers(-1, 3, size=(30, 40))
    labels = ndimage.median_filter(labels, 5)
    classes = [{"name": "stroma", "colour": [1, 2, 3]}, {"name": "tumour", "colour": [4, 5, 6]},
               {"name": "fat", "colour": [7, 8, 9]}]
    path.write_text(json.dumps(class_geojson(labels, (W, H), classes)))
    read = load_annotation(path, stub_slide(), downsample=100, classes=THREE).labels
    np.testing.assert_array_equal(read, np.where(labels < 0, IGNORE, labels))


# ------------------------------------------------------------------ the memory benchmark
def test_bench_annotations_runs_with_its_documented_arguments():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "tools/bench_annotations.py", "--width", "8192", "--height", "12288",
                           "--polygons", "40", "--views", "5", "--json"], cwd=repo, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["geojson"]
    assert [name for name, _, _ in result["steps"]] == ["imports", "load", "patch grid", "views", "truth 1024",
                                                        "label map /32"]
    assert max(peak for _, _, peak in result["steps"]) < 1024
    counts = result["patch_counts"]  # the 8 x 12 grid of 1024 px cells
    assert sum(counts.values()) == 8 * 12 and counts["background"] == 0
    assert result["label_map_shape"] == [384, 256]


@pytest.mark.slow
def test_exact_patch_coverage_agrees_with_the_painted_labels(tmp_path):
    """Overlapping shapes of two classes and exclusions: the geometric class fractions
    (PolygonSource.class_fractions) against labels painted at 256 x 256 points per cell
    (the generic AnnotationSource.class_fractions) and, summed, against the geometry."""
    import sys

    from h2g.io.annotation import AnnotationSource

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_annotations import CLASSES, StubSlide, write_geojson

    geojson, classes = tmp_path / "a.geojson", tmp_path / "a.classes.csv"
    classes.write_text(CLASSES)
    write_geojson(geojson, 12000, 9000, 80, seed=2)  # dense: most cells hold several shapes
    for table in (load_class_table(classes), None):
        annotation = load_annotation(geojson, StubSlide(12001, 9003), classes=table)
        exact = annotation.class_fractions(1024, (9, 12))
        painted = AnnotationSource.class_fractions(annotation.source, 1024, (9, 12), 256)
        assert np.abs(exact - painted).max() < 0.005
    regions = annotation.source.class_regions()  # binary: tumour's resolved area
    assert exact[1].sum() * 1024 ** 2 == pytest.approx(regions[1].area, rel=1e-9)
