"""tools/make_manifest.py (h2g.io.manifest_builder): slides paired with annotations by stem,
checked, split by a seed, written as a manifest experiments/run.py reads as it is."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from synthetic import make_mask, make_slide

from h2g.core.errors import ConfigError, ManifestError
from h2g.io.classes import sidecar_path
from h2g.io.manifest import load_manifest
from h2g.io.manifest_builder import assign_splits, build_manifest, pair_files, parse_split

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args):
    return subprocess.run([sys.executable, "tools/make_manifest.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def tumour_geojson_file(path: Path, box=(300, 300, 1300, 1300)) -> Path:
    x0, y0, x1, y1 = box
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    return path


@pytest.mark.slow
def test_on_the_real_slides_with_drawn_geojson(real_data, tmp_path):
    """cmu_small_region (20x, mpp in its metadata) and the TCGA frozen section (no scale:
    --mpp is its fallback only); broken.svs has no annotation; an orphan annotation."""
    slides = real_data / "slides"
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    tumour_geojson_file(annotations / "cmu_small_region.geojson")
    tumour_geojson_file(annotations / "tcga-cr-7395-01a-01-ts1.geojson", box=(100, 100, 900, 700))
    tumour_geojson_file(annotations / "orphan.geojson")
    out = tmp_path / "cohort" / "manifest.csv"
    out.parent.mkdir()
    without_mpp = run_tool(slides, "--annotations", annotations, "--split", "50/0/50", "--out", out)
    assert without_mpp.returncode == 2 and not out.exists()
    assert "tcga-cr-7395-01a-01-ts1.svs" in without_mpp.stderr and "--mpp" in without_mpp.stderr
    done = run_tool(slides, "--annotations", annotations, "--split", "50/0/50", "--mpp", "0.25", "--seed", 3,
                    "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"slide without an annotation (left out): {slides / 'broken.svs'}" in done.stdout
    assert f"annotation without a slide (left out): {annotations / 'orphan.geojson'}" in done.stdout
    assert "--set sampler.stages=slide,class,patch" in done.stdout  # no grades: the sampler's grade stage
    manifest = load_manifest(out)  # what experiments/run.py --manifest does first
    records = {r.slide_id: r for r in manifest}
    assert set(records) == {"cmu_small_region", "tcga-cr-7395-01a-01-ts1"}
    assert sorted(r.split for r in manifest) == ["test", "train"]
    assert records["cmu_small_region"].mpp is None and records["tcga-cr-7395-01a-01-ts1"].mpp == 0.25
    assert records["cmu_small_region"].slide_path.resolve() == (slides / "cmu_small_region.svs").resolve()
    assert records["cmu_small_region"].annotation_path.resolve() == (annotations / "cmu_small_region.geojson").resolve()
    assert not out.read_text().count(str(tmp_path))  # paths relative to the manifest's folder
    again = tmp_path / "cohort" / "again.csv"
    assert run_tool(slides, "--annotations", annotations, "--split", "50/0/50", "--mpp", "0.25", "--seed", 3,
                    "--out", again).returncode == 0
    assert again.read_text() == out.read_text()  # same seed, same manifest


def test_pairing_rules(tmp_path):
    for name in ("a.svs", "b.tiff", "c.ndpi", "d.svs"):
        (tmp_path / name).write_bytes(b"x")
    for name in ("a.geojson", "b_mask.tiff", "c.annotations.json", "c_mask.png", "zz.xml", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    pairing = pair_files(tmp_path)
    assert [(s.name, a.name) for s, a in pairing.pairs] == [("a.svs", "a.geojson"), ("b.tiff", "b_mask.tiff")]
    assert [(s.name, sorted(a.name for a in found)) for s, found in pairing.ambiguous] == [
        ("c.ndpi", ["c.annotations.json", "c_mask.png"])]
    assert [s.name for s in pairing.slides_without] == ["d.svs"]
    assert [a.name for a in pairing.annotations_without] == ["zz.xml"]  # b_mask.tiff is not a slide


def test_splits_are_seeded_fractions_stratified_by_grade():
    ids = [f"s{i:02d}" for i in range(20)]
    splits = assign_splits(ids, parse_split("70/15/15"), seed=1)
    assert Counter(splits.values()) == {"train": 14, "val": 3, "test": 3}
    assert splits == assign_splits(list(reversed(ids)), parse_split("70/15/15"), seed=1)
    assert splits != assign_splits(ids, parse_split("70/15/15"), seed=2)
    grades = {slide_id: 1 + i % 2 for i, slide_id in enumerate(ids)}
    stratified = assign_splits(ids, parse_split("50/0/50"), seed=0, grades=grades)
    assert Counter((grades[s], split) for s, split in stratified.items()) == {
        (1, "train"): 5, (1, "test"): 5, (2, "train"): 5, (2, "test"): 5}
    # 5 slides per grade, 60/20/20: 3/1/1 each; 3 grades of one slide, 1/1/1: one split each
    five = {slide_id: 1 + i % 2 for i, slide_id in enumerate(ids[:10])}
    counts = Counter((five[s], split) for s, split in assign_splits(ids[:10], parse_split("60/20/20"), 0, five).items())
    assert counts == {(g, s): n for g in (1, 2) for s, n in (("train", 3), ("val", 1), ("test", 1))}
    three = assign_splits(["a", "b", "c"], parse_split("1/1/1"), 4, {"a": 1, "b": 2, "c": 3})
    assert sorted(three.values()) == ["test", "train", "val"]
    with pytest.raises(ConfigError, match="TRAIN/VAL/TEST"):
        parse_split("70/30")


def test_masks_classes_and_grades_on_synthetic_slides(tmp_path):
    slides, masks = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir(), masks.mkdir()
    for name in ("p1", "p2", "p3"):
        make_slide(slides / f"{name}.tiff", (2048, 2048), downsamples=(1, 4))
        make_mask(masks / f"{name}_mask.png", (2048, 2048), [(0, 0, 512, 512)])
    grades = tmp_path / "grades.csv"
    grades.write_text("slide_id,grade\np1,1\np2,2\np3,3\n")
    out = tmp_path / "m.csv"
    report = build_manifest(slides, out, annotations_dir=masks, split="1/1/1", seed=0, grades=grades)
    manifest = load_manifest(out)
    assert sorted(r.split for r in manifest) == ["test", "train", "val"]
    assert {r.slide_id: r.grade for r in manifest} == {"p1": 1, "p2": 2, "p3": 3}
    assert report.splits == {r.slide_id: r.split for r in manifest}
    table = tmp_path / "t.csv"
    table.write_text("name,value,colour\nnormal,0,\ntumour,255,\n")
    build_manifest(slides, out, annotations_dir=masks, classes=table, split="1/1/1")
    assert load_manifest(out).classes.names == ("normal", "tumour")
    assert sidecar_path(out).read_text() == table.read_text()
    # a bad annotation: every problem listed, nothing written
    (masks / "p2_mask.png").write_bytes(b"not an image")
    out2 = tmp_path / "m2.csv"
    with pytest.raises(ManifestError) as info:
        build_manifest(slides, out2, annotations_dir=masks, split="1/1/1")
    assert "p2_mask.png" in str(info.value) and "annotation_path" in str(info.value) and not out2.exists()
