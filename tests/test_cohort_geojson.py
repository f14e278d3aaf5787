"""The embedded cohort's annotations as QuPath GeoJSON: written beside every mask and label
map, listed by data_manifest_geojson.csv / data_manifest_multiclass_geojson.csv, and read
back to the same labels the raster files give."""
from __future__ import annotations

import filecmp
import json
import shutil

import numpy as np
import pytest
import tifffile
from conftest import REPO

from h2g.systems.registry import load_config
from h2g.data import cohort
from h2g.io.annotation import IGNORE, load_annotation
from h2g.io.classes import sidecar_path
from h2g.io.manifest import load_manifest
from h2g.io.slide import open_slide


def _image(path):
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def test_committed_geojson_manifests_are_what_the_smoke_preset_writes():
    for name, (text, classes) in cohort.manifest_texts("smoke").items():
        assert (REPO / name).read_text() == text, name
        if classes is not None:
            assert sidecar_path(REPO / name).read_text() == classes, name
    binary = load_manifest(REPO / cohort.MANIFEST_NAME, check_files=False)
    geojson = load_manifest(REPO / cohort.GEOJSON_MANIFEST_NAME, check_files=False)
    assert [(r.slide_id, r.split, r.annotation_path.with_suffix(".tiff")) for r in geojson] == [
        (r.slide_id, r.split, r.annotation_path) for r in binary]
    multiclass = load_manifest(REPO / cohort.MULTICLASS_GEOJSON_MANIFEST_NAME, check_files=False)
    assert multiclass.classes == load_manifest(REPO / cohort.MULTICLASS_MANIFEST_NAME, check_files=False).classes


@pytest.mark.slow
def test_every_annotation_reads_back_from_its_geojson_pixel_for_pixel(tiny_cohort):
    folder = tiny_cohort.parent
    table = load_manifest(folder / cohort.MULTICLASS_MANIFEST_NAME).classes
    bach = load_manifest(folder / cohort.BACH_MANIFEST_NAME).classes
    for spec in cohort.cohort_specs("tiny"):
        slide = open_slide(folder / spec.slide_path)
        for image in spec.rasters[1:]:
            geojson = folder / cohort.geojson_path(image)
            collection = json.loads(geojson.read_text())
            assert all(f["properties"]["objectType"] == "annotation" for f in collection["features"])
            classes = None if image == spec.annotation_path else bach if image == spec.bach_path else table
            values = _image(folder / image)
            read = load_annotation(geojson, slide, downsample=4, classes=classes)
            if classes is None:
                np.testing.assert_array_equal(read.mask, values > 127)
                continue
            lut = np.full(256, 99, np.uint8)
            lut[0] = IGNORE
            for index, entry in enumerate(classes.entries):
                lut[list(entry.values)] = index
            np.testing.assert_array_equal(read.labels, lut[values], err_msg=str(geojson))


def test_dmmn_partial_label_maps_are_the_same_from_both_manifests(tiny_cohort, tmp_path):
    """What DMMN trains and is scored on (base.Pipeline.annotation, which every system's
    pipeline reads its annotations through), from the label-map TIFFs and from their
    GeoJSON: >= 99 % of pixels equal (they are all equal)."""
    from h2g.systems.base import Pipeline

    folder = tiny_cohort.parent
    config = load_config("smoke")
    raster = Pipeline(folder / cohort.MULTICLASS_MANIFEST_NAME, tmp_path / "a", config)
    polygons = Pipeline(folder / cohort.MULTICLASS_GEOJSON_MANIFEST_NAME, tmp_path / "b", config)
    assert raster.classes == polygons.classes
    partial = 0
    for a, b in zip(raster.manifest, polygons.manifest):
        assert a.slide_id == b.slide_id and b.annotation_path.suffix == ".geojson"
        want, got = raster.annotation(a).labels, polygons.annotation(b).labels
        assert want.shape == got.shape and (want == got).mean() >= 0.99
        partial += int((want == IGNORE).any())
    assert partial == 4  # the train and val slides' maps are partial


def test_h2g_truths_are_the_same_from_masks_and_geojson(tiny_cohort):
    """H2G-Net's truth at the smoke refinement size (256): box-filtered mask vs sampled
    polygons, Dice >= 0.99 on every slide."""
    from h2g.inference.lowres import target_mask

    folder = tiny_cohort.parent
    rasters = load_manifest(folder / cohort.MANIFEST_NAME)
    geojson = load_manifest(folder / cohort.GEOJSON_MANIFEST_NAME)
    for a, b in zip(rasters, geojson):
        slide = open_slide(a.slide_path)
        want, got = target_mask(a.annotation_path, slide, 256), target_mask(b.annotation_path, slide, 256)
        dice = 2 * (want & got).sum() / (want.sum() + got.sum())
        assert dice >= 0.99, (a.slide_id, dice)


@pytest.mark.slow
def test_ensure_cohort_writes_missing_geojson_without_touching_the_images(tiny_cohort, tmp_path):
    folder = tiny_cohort.parent
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    spec = cohort.cohort_specs("tiny")[0]
    missing = [cohort.geojson_path(spec.annotation_path), cohort.geojson_path(spec.partial_path)]
    for name in missing:
        (copy / name).unlink()
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*.tiff")}
    from h2g.data.embedded import ensure_cohort

    assert ensure_cohort(copy / cohort.MULTICLASS_GEOJSON_MANIFEST_NAME) == copy / \
        cohort.MULTICLASS_GEOJSON_MANIFEST_NAME
    for name in missing:
        assert filecmp.cmp(copy / name, folder / name, shallow=False), name
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_the_int8_guard_scores_test_slides_against_their_geojson(tiny_cohort):
    """h2g.export.quantize._truth (the guard's truth) reads a GeoJSON manifest as it reads
    masks: the same truth, and an empty test annotation is an error, not a perfect score."""
    from types import SimpleNamespace

    from h2g.core.errors import AnnotationError
    from h2g.export import quantize

    folder = tiny_cohort.parent
    data = quantize.RunData(folder / cohort.GEOJSON_MANIFEST_NAME, 0)
    seg = SimpleNamespace(raster=None, prob=np.zeros((128, 128), np.float32))  # H2G-Net's probability grid
    for a, b in zip(load_manifest(folder / cohort.MANIFEST_NAME).split("test"),
                    load_manifest(folder / cohort.GEOJSON_MANIFEST_NAME).split("test")):
        slide = open_slide(a.slide_path)
        want = quantize._truth(seg, a, slide, data)
        got = quantize._truth(seg, b, slide, data)
        assert want.shape == (128, 128) and 2 * (want & got).sum() / (want.sum() + got.sum()) >= 0.99
    empty = folder / "empty_test.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(AnnotationError, match="needs its annotation"):
        quantize._truth(seg, SimpleNamespace(annotation_path=empty), slide, data)
    empty.unlink()


def test_eval_real_reads_a_polygon_truth(tmp_path):
    """A BCSS-like region whose truth is a GeoJSON of the same name (real.load_truth)."""
    from PIL import Image

    from h2g.evaluation import real

    (tmp_path / "images").mkdir(), (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(tmp_path / "images" / "r1.jpg")
    ring = [[100.5, 50.5], [300.5, 50.5], [300.5, 250.5], [100.5, 250.5], [100.5, 50.5]]
    (tmp_path / "masks" / "r1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"classification": {"name": "Tumor"}}}]}))
    (region,) = real.bcss_regions(tmp_path)
    assert region.mask_path.name == "r1.geojson"
    truth = real.load_truth(region.mask_path, (300, 400))
    want = np.zeros((300, 400), bool)
    want[50:250, 100:300] = True  # centres j + 0.5 in [100.5, 300.5): on a left / top edge is inside
    np.testing.assert_array_equal(truth, want)


def test_an_empty_geojson_is_refused_for_a_test_slide_and_allowed_for_training(tiny_cohort, tmp_path):
    """What every system's pipeline reads (base.Pipeline.annotation) and H2G-Net's truth
    of a test slide (the pipeline asks target_mask with required=True)."""
    from h2g.core.errors import AnnotationError
    from h2g.inference.lowres import target_mask
    from h2g.systems.base import Pipeline

    folder = tiny_cohort.parent
    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    lines = (folder / cohort.MULTICLASS_GEOJSON_MANIFEST_NAME).read_text().splitlines()
    rows = [lines[0]] + [",".join([r.split(",")[0], str(folder / r.split(",")[1]), str(empty), *r.split(",")[3:]])
                         for r in lines[1:]]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    shutil.copyfile(sidecar_path(folder / cohort.MULTICLASS_GEOJSON_MANIFEST_NAME), sidecar_path(manifest))
    pipeline = Pipeline(manifest, tmp_path / "out", load_config("smoke"))
    train, test = pipeline.records("train")[0], pipeline.records("test")[0]
    assert (pipeline.annotation(train).labels == IGNORE).all()  # unannotated training slide: a warning
    with pytest.raises(AnnotationError, match="needs its annotation"):
        pipeline.annotation(test)
    slide = open_slide(test.slide_path)
    assert not target_mask(empty, slide, 64).any()
    with pytest.raises(AnnotationError, match="needs its annotation"):
        target_mask(empty, slide, 64, required=True)
