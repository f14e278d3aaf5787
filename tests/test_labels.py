"""Multi-class labels end to end: class tables, label-map annotations, patch grids,
class-balanced sampling and per-class metrics.

The cohort is one 40x synthetic slide (4 x 4 patches of 256 px at 10x, 1024 level-0 px a
side; tissue on the top two patch rows) with a 3-class label map whose content per patch
is set by hand, so every expected patch label, count and metric below is known without
the code under test.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare
from sklearn.metrics import jaccard_score, precision_recall_fscore_support
from synthetic import make_slide

from h2g.core.errors import AnnotationError, ConfigError, ManifestError, SamplerError
from h2g.data.sampler import HierarchicalSampler, build_sources
from h2g.evaluation import metrics
from h2g.io.annotation import IGNORE, load_annotation
from h2g.io.classes import (
    BINARY,
    ClassEntry,
    ClassTable,
    load_class_table,
    sidecar_path,
)
from h2g.io.manifest import load_manifest
from h2g.io.slide import Slide
from h2g.tiling.grid import build_patch_grid

P_MIN = 1e-3
SIZE = (4096, 4096)
CELL = 256  # mask pixels per patch side (1024 level-0 px at downsample 4)
SIDECAR = "name,value,colour\nignore,0,\nstroma,10,#ff00ff\ntumour,20;21,\nfat,30,\n"
STROMA, TUMOUR, FAT = 0, 1, 2


def pixel_values() -> np.ndarray:
    """The mask's pixel values (0 = unannotated) per patch (row, col):
    (0,0) stroma; (0,1) tumour (value 20); (0,2) fat; (0,3) 60 % tumour (value 21) over
    40 % stroma; (1,0) 2 labelled rows of 256 (0.78 % < 1 %: discarded); (1,1) 5 rows of fat
    (1.95 %: fat); (1,2) nothing; (1,3) 77 rows stroma, 103 rows fat (fat wins); (2,0)
    tumour without tissue (background)."""
    v = np.zeros((4 * CELL, 4 * CELL), np.uint8)

    def cell(r, c):
        return slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL)

    v[cell(0, 0)] = 10
    v[cell(0, 1)] = 20
    v[cell(0, 2)] = 30
    rows, cols = cell(0, 3)
    v[rows, cols] = 10
    v[0:154, cols] = 21                      # 154 / 256 = 60 % tumour
    v[CELL:CELL + 2, 0:CELL] = 10            # (1, 0)
    v[CELL:CELL + 5, CELL:2 * CELL] = 30     # (1, 1)
    v[CELL:CELL + 77, 3 * CELL:] = 10        # (1, 3)
    v[CELL + 77:CELL + 180, 3 * CELL:] = 30
    v[cell(2, 0)] = 20
    return v


def expected_labels(values: np.ndarray) -> np.ndarray:
    lut = np.full(256, 99, np.uint8)
    lut[[0, 10, 20, 21, 30]] = [IGNORE, STROMA, TUMOUR, TUMOUR, FAT]
    return lut[values]


EXPECTED_GRID = {(0, 0): STROMA, (1024, 0): TUMOUR, (2048, 0): FAT, (3072, 0): TUMOUR,
                 (1024, 1024): FAT, (3072, 1024): FAT}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A manifest (no grade column, an extra ``stain`` column) with its class table."""
    folder = tmp_path_factory.mktemp("labels")
    make_slide(folder / "s.tiff", SIZE, tissue=(0, 0, 4096, 2048), downsamples=(1, 4, 16))
    Image.fromarray(pixel_values()).save(folder / "s_labels.png")
    make_slide(folder / "u.tiff", (2048, 1024), tissue=(0, 0, 2048, 1024), downsamples=(1, 4))
    manifest = folder / "manifest.csv"
    manifest.write_text("slide_id,slide_path,annotation_path,split,stain\n"
                        "s,s.tiff,s_labels.png,train,HE\n"
                        "u,u.tiff,,val,IHC\n")
    sidecar_path(manifest).write_text(SIDECAR)
    return manifest


def test_class_table_sidecar_is_read(cohort):
    table = load_manifest(cohort).classes
    assert table.names == ("stroma", "tumour", "fat") and table.n_classes == 3
    assert table.tumour_index == 1 and table.ignore == (0,) and not table.is_binary
    assert [e.values for e in table.entries] == [(10,), (20, 21), (30,)]
    assert table.entries[0].colour == "#ff00ff"
    assert ClassTable.from_dict(table.to_dict()) == table
    assert sidecar_path(cohort).name == "manifest.classes.csv"


def test_label_map_round_trip(cohort):
    manifest = load_manifest(cohort)
    (record,) = manifest.split("train")
    assert record.grade is None and record.attributes == {"stain": "HE"}
    with Slide(record.slide_path) as slide:
        annotation = load_annotation(record.annotation_path, slide, classes=manifest.classes)
    assert annotation.labels.dtype == np.uint8 and annotation.downsample == 4.0
    assert annotation.classes == manifest.classes
    np.testing.assert_array_equal(annotation.labels, expected_labels(pixel_values()))
    np.testing.assert_array_equal(annotation.mask, expected_labels(pixel_values()) == TUMOUR)

    # patch grid: majority labelled class, > 1 % labelled
    sources = build_sources(manifest.split("train"), classes=manifest.classes, progress=False)
    (source,) = sources
    grid = source.grid
    assert {tuple(c): int(label) for c, label in zip(grid.coords.tolist(), grid.labels)} == EXPECTED_GRID
    assert grid.counts == {"stroma": 1, "tumour": 2, "fat": 3, "discarded": 2, "background": 8}
    assert source.attributes == {"split": "train", "stain": "HE"}

    # sampler: every class, labels as in the map, classes uniform within the slide
    sampler = HierarchicalSampler(sources, stages=("stain", "slide", "class", "patch"), seed=1)
    assert sampler.n_classes == 3 and sampler.class_names == ("stroma", "tumour", "fat")
    draws = [d for b in range(100) for d in sampler.draw_batch(b, 60)]
    assert all(EXPECTED_GRID[(x, y)] == label for _, x, y, label in draws)
    counts = Counter(label for *_, label in draws)
    assert set(counts) == {STROMA, TUMOUR, FAT}
    assert chisquare([counts[c] for c in range(3)]).pvalue > P_MIN

    # weighted 2:1:1 tumour:stroma:fat
    weighted = HierarchicalSampler(sources, stages=("slide", "class", "patch"),
                                   class_weights={"tumour": 2, "stroma": 1, "fat": 1})
    counts = Counter(d[3] for b in range(100) for d in weighted.draw_batch(b, 60))
    assert chisquare([counts[c] for c in range(3)], np.array([0.25, 0.5, 0.25]) * 6000).pvalue > P_MIN

    # a grade-less manifest cannot balance on grade
    with pytest.raises(SamplerError, match="unknown sampler stage 'grade'"):
        HierarchicalSampler(sources)


def test_metrics_on_the_label_map(cohort):
    truth = expected_labels(pixel_values())
    pred = np.where(truth == IGNORE, STROMA, truth).astype(np.uint8)
    pred[0:128, 0:256] = TUMOUR      # half of the stroma patch called tumour
    pred[0:256, 512:768] = STROMA    # the whole fat patch called stroma
    scores = metrics.class_metrics(pred, truth, load_manifest(cohort).classes)
    # by hand: per class, pixel counts on labelled pixels
    labelled = truth != IGNORE
    for c in range(3):
        tp = np.sum((pred == c) & (truth == c) & labelled)
        fp = np.sum((pred == c) & (truth != c) & labelled)
        fn = np.sum((pred != c) & (truth == c) & labelled)
        assert scores.iou[c] == pytest.approx(tp / (tp + fp + fn))
        assert scores.dice[c] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    t, p = truth[labelled], pred[labelled]
    reference = precision_recall_fscore_support(t, p, labels=[0, 1, 2], average=None)[:3]
    np.testing.assert_allclose([scores.precision, scores.recall, scores.dice], reference)
    iou = jaccard_score(t, p, labels=[0, 1, 2], average=None)
    np.testing.assert_allclose(scores.iou, iou)
    assert scores.mean_iou == pytest.approx(np.mean(iou))
    tumour = metrics.tumour_metrics(pred, truth, TUMOUR, 3)
    assert tumour == metrics.segmentation_metrics(p == TUMOUR, t == TUMOUR)


# -- errors -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    path = make_slide(tmp_path_factory.mktemp("small") / "small.tiff", (1024, 768), downsamples=(1,))
    with Slide(path) as opened:
        yield opened


def test_values_outside_the_table_are_an_error(small_slide, tmp_path):
    table = load_class_table(_sidecar(tmp_path, SIDECAR))
    values = np.full((192, 256), 10, np.uint8)
    values[5, 5], values[6, 6] = 40, 7
    Image.fromarray(values).save(tmp_path / "odd.png")
    with pytest.raises(AnnotationError) as info:
        load_annotation(tmp_path / "odd.png", small_slide, classes=table)
    message = str(info.value)
    assert "odd.png" in message and "{7, 40}" in message and "stroma=10" in message


def test_a_label_map_is_not_silently_binary(small_slide, tmp_path):
    values = np.zeros((192, 256), np.uint8)
    values[:50], values[50:100] = 1, 2
    Image.fromarray(values).save(tmp_path / "three.png")
    with pytest.raises(AnnotationError) as info:
        load_annotation(tmp_path / "three.png", small_slide)
    message = str(info.value)
    assert "three.png" in message and "{0, 1, 2}" in message and "class table" in message
    # with a table the same file is a label map
    table = ClassTable.of([("normal", 0), ("tumour", 1), ("other", 2)])
    annotation = load_annotation(tmp_path / "three.png", small_slide, classes=table)
    np.testing.assert_array_equal(annotation.labels, values)
    np.testing.assert_array_equal(annotation.mask, values == 1)


def test_binary_annotation_labels_are_the_mask(small_slide, tmp_path):
    values = np.zeros((192, 256), np.uint8)
    values[10:20, 30:90] = 255
    Image.fromarray(values).save(tmp_path / "bin.png")
    annotation = load_annotation(tmp_path / "bin.png", small_slide)
    assert annotation.classes == BINARY and annotation.mask.dtype == bool
    assert annotation.labels.dtype == np.uint8
    np.testing.assert_array_equal(annotation.labels, (values == 255).astype(np.uint8))


def test_a_table_without_tumour_has_no_tumour_mask(small_slide, tmp_path):
    Image.fromarray(np.zeros((192, 256), np.uint8)).save(tmp_path / "zero.png")
    table = ClassTable.of([("stroma", 0), ("fat", 1)])
    annotation = load_annotation(tmp_path / "zero.png", small_slide, classes=table)
    assert table.tumour_index is None
    with pytest.raises(AnnotationError, match="no tumour class"):
        _ = annotation.mask


def _sidecar(folder, text, name="m.classes.csv"):
    path = folder / name
    path.write_text(text)
    return path


def test_class_table_problems_are_listed_together(tmp_path):
    path = _sidecar(tmp_path, "name,value,colour\n"
                              "stroma,10,\n"          # 1: fine
                              ",11,\n"                # 2: empty name
                              "Stroma,12,\n"          # 3: duplicate name
                              "fat,10,\n"             # 4: value already stroma's
                              "glass,x;70000,\n"      # 5: not an integer, out of range
                              "fold,13,red\n"         # 6: bad colour
                              "background,14,\n"      # 7: reserved name
                              "tumour,15,\n"          # 8: fine
                              "tumor,16,\n"           # 9: a second tumour class
                              "ignore,0,\n")
    with pytest.raises(ManifestError) as info:
        load_class_table(path)
    where = sorted((row, column) for _, row, column, _ in info.value.problems)
    assert where == [(2, "name"), (3, "name"), (4, "value"), (5, "value"), (5, "value"),
                     (6, "colour"), (7, "name"), (9, "name")]
    assert all(file == str(path) for file, *_ in info.value.problems)
    with pytest.raises(ManifestError, match="missing column"):
        load_class_table(_sidecar(tmp_path, "name,colour\nx,#000000\n", "b.csv"))
    with pytest.raises(ManifestError, match="at least 2 classes"):
        load_class_table(_sidecar(tmp_path, "name,value\nx,1\nignore,0\n", "c.csv"))


def test_a_bad_sidecar_is_reported_with_the_manifest(tmp_path):
    (tmp_path / "a.tiff").write_bytes(b"x")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide_id,slide_path,annotation_path,split\na,a.tiff,,banana\n")
    _sidecar(tmp_path, "name,value\nstroma,1\nfat,1\n", "cohort.classes.csv")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    files = {(file.rsplit("/", 1)[-1], row, column) for file, row, column, _ in info.value.problems}
    assert files == {("cohort.csv", 1, "split"), ("cohort.classes.csv", 2, "value")}


def test_class_table_checks(tmp_path):
    with pytest.raises(ConfigError, match="duplicate class name"):
        ClassTable.of([("a", 1), ("A", 2)])
    with pytest.raises(ConfigError, match="index 3, expected 1"):
        ClassTable((ClassEntry(0, "a", (0,), "#000000"), ClassEntry(3, "b", (1,), "#000000")))
    with pytest.raises(ConfigError, match="bad class table mapping"):
        ClassTable.from_dict({"classes": [{"name": "a"}]})
    table = ClassTable.of([("normal", 0), ("Invasive_Tumour", 1), ("other", (2, 3))], ignore=[255])
    assert table.tumour_index == 1 and table.index_of("other") == 2
    assert table.value_map() == {255: IGNORE, 0: 0, 1: 1, 2: 2, 3: 2}
    assert BINARY.is_binary and BINARY.names == ("non-tumour", "tumour") and BINARY.tumour_index == 1


# -- the binary rule is kept for binary tables ---------------------------------------------

def test_an_explicit_binary_table_labels_like_the_default(tmp_path):
    """A sidecar naming non-tumour 0 / tumour 255 gives the default grid: the tumour-fraction
    rule (a 10 % tumour patch is discarded, not called non-tumour by majority)."""
    size = (4096, 3072)
    slide_path = make_slide(tmp_path / "s.tiff", size, tissue=(0, 0, 4096, 3072), downsamples=(1, 4))
    values = np.zeros((768, 1024), np.uint8)
    values[0:256, 256:512] = 255    # patch (0, 1) tumour
    values[256:282, 0:256] = 255    # patch (1, 0) 10 % tumour: discarded
    Image.fromarray(values).save(tmp_path / "m.png")
    table = ClassTable.of([("non-tumour", 0), ("tumour", 255)])
    assert table.is_binary
    with Slide(slide_path) as slide:
        default = build_patch_grid(slide, annotation=load_annotation(tmp_path / "m.png", slide))
        explicit = build_patch_grid(slide, annotation=load_annotation(tmp_path / "m.png", slide,
                                                                      classes=table))
    np.testing.assert_array_equal(default.coords, explicit.coords)
    np.testing.assert_array_equal(default.labels, explicit.labels)
    assert default.counts == explicit.counts == {"tumour": 1, "non_tumour": 10, "discarded": 1,
                                                 "background": 0}


# -- unannotated training slides --------------------------------------------------------------

def test_a_split_without_annotations_is_a_clear_error(cohort, caplog):
    manifest = load_manifest(cohort)
    with pytest.raises(SamplerError, match=r"split val: no slide has labelled patches.*u \(no annotation\)"):
        build_sources(manifest.split("val"), classes=manifest.classes, progress=False)
    # mixed: the unannotated slide is left out with a warning naming it
    with caplog.at_level(logging.WARNING, logger="h2g.data.sampler"):
        sources = build_sources(manifest.records, classes=manifest.classes, progress=False)
    assert [s.slide_id for s in sources] == ["s"]
    assert any("u (no annotation)" in r.getMessage() for r in caplog.records)


# -- issue 29 (2): a binary mask with an ignore value is refused, not read as all non-tumour --

@pytest.mark.parametrize("values", [(0, 1, 255), (0, 2, 7, 255)])
def test_a_mask_with_small_labels_and_255_is_refused(small_slide, tmp_path, values):
    """{0, 1, 255} (1 = tumour, 255 = ignore) and {0, 2, 7, 255} used to pass the guard (its
    maximum is above 127) and read as tumour only where 255: tumour became non-tumour."""
    image = np.zeros((192, 256), np.uint8)
    for k, value in enumerate(values):
        image[k * 40:(k + 1) * 40] = value
    Image.fromarray(image).save(tmp_path / "ignore.png")
    with pytest.raises(AnnotationError) as info:
        load_annotation(tmp_path / "ignore.png", small_slide)
    message = str(info.value)
    assert "\n" not in message and "ignore.png" in message
    assert "{" + ", ".join(map(str, values)) + "}" in message
    assert "classes.csv" in message and "ignore" in message
