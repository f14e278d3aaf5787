"""tools/inspect_annotation.py on a real Aperio slide with annotations drawn here by hand
(a polygon with a hole, a MultiPolygon, two classes; an ASAP XML with an exclusion group):
areas against the shoelace formula, label maps against matplotlib's point-in-polygon test
on pixel centres (an independent rasteriser).  The annotation files are written in
tmp_path; the tests skip without the real data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import centres_inside
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CMU = ("slides", "cmu_small_region.svs")  # 2220 x 2967 px, 0.499 um/px
TABLE = "name,value,colour,aliases\ntumour,1,#c80000,Tumor\nstroma,2,#0064c8,\nignore,0,,\n"


def run_tool(*args):
    return subprocess.run([sys.executable, "tools/inspect_annotation.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def star(cx, cy, r_out, r_in, n=24, phase=0.0):
    """A closed star-shaped ring (alternating radii), not aligned to any pixel grid."""
    angles = phase + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    ring = np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)].round(3)
    return np.vstack([ring, ring[:1]])


def shoelace(ring) -> float:
    x, y = np.asarray(ring, float).T
    return 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]))


@pytest.fixture(scope="module")
def cmu(real_data):
    path = real_data.joinpath(*CMU)
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.slow
def test_geojson_with_a_hole_a_multipolygon_and_two_classes(cmu, tmp_path):
    tumour = [star(900, 1100, 520, 380, phase=0.1), star(880, 1090, 160, 120, n=12, phase=0.3)]  # with a hole
    stroma = [[star(1700, 600, 200, 150, n=9)], [star(1600, 2400, 260, 180, n=11, phase=0.2)]]    # MultiPolygon
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [r.tolist() for r in tumour]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon",
                                         "coordinates": [[r.tolist() for r in p] for p in stroma]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [0, 0, 200]}}},
    ]}
    annotation = tmp_path / "cmu.geojson"
    annotation.write_text(json.dumps(collection))
    table = tmp_path / "cmu.classes.csv"
    table.write_text(TABLE)
    labels_png, overlay = tmp_path / "labels.png", tmp_path / "overlay.png"
    done = run_tool(cmu, annotation, "--classes", table, "--json", "--downsample", 4, "--labels", labels_png,
                    "--overlay", overlay)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    mm2 = 0.499 ** 2 / 1e6
    want = {"tumour": (shoelace(tumour[0]) - shoelace(tumour[1])) * mm2,
            "stroma": sum(shoelace(p[0]) for p in stroma) * mm2}
    got = {c["name"]: c for c in report["classes"]}
    for name, area in want.items():
        assert got[name]["area_mm2"] == pytest.approx(area, rel=0.01), name
    assert got["tumour"]["polygons"] == 1 and got["stroma"]["polygons"] == 2 and report["warnings"] == []
    labels = np.asarray(Image.open(labels_png))
    assert labels.shape == (742, 555)  # 2967 / 4, 2220 / 4 rounded up
    expected = np.full(labels.shape, 255, np.uint8)
    expected[centres_inside([stroma[0], stroma[1]], labels.shape, 4)] = 1
    expected[centres_inside([tumour], labels.shape, 4)] = 0
    assert (labels == expected).mean() >= 0.99
    assert (labels == expected)[expected != 255].mean() >= 0.99  # on the annotated pixels alone too
    picture = np.asarray(Image.open(overlay).convert("RGB"))
    assert np.all(picture == (200, 0, 0), axis=-1).sum() > 100  # the tumour outline in its colour


def test_asap_xml_with_an_exclusion_group(cmu, tmp_path):
    outer, excluded = star(1100, 1500, 700, 520, n=30), star(1150, 1450, 220, 170, n=10, phase=0.4)
    coordinates = lambda ring: "".join(  # noqa: E731
        f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(ring[:-1]))
    text = ('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
            f'<Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2"><Coordinates>{coordinates(excluded)}'
            "</Coordinates></Annotation>"
            f'<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0"><Coordinates>{coordinates(outer)}'
            "</Coordinates></Annotation></Annotations><AnnotationGroups>"
            '<Group Name="_0" PartOfGroup="None"/><Group Name="_2" PartOfGroup="None"/></AnnotationGroups>'
            "</ASAP_Annotations>")
    annotation = tmp_path / "cmu.xml"
    annotation.write_text(text)
    labels_png = tmp_path / "labels.png"
    done = run_tool(cmu, annotation, "--json", "--downsample", 8, "--labels", labels_png)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    tumour = {c["name"]: c for c in report["classes"]}["tumour"]
    assert tumour["area_mm2"] == pytest.approx((shoelace(outer) - shoelace(excluded)) * 0.499 ** 2 / 1e6, rel=0.01)
    labels = np.asarray(Image.open(labels_png))
    expected = centres_inside([[outer, excluded]], labels.shape, 8).astype(np.uint8)  # binary: outside is non-tumour
    beyond = (np.arange(labels.shape[1]) + 0.5) * 8 >= 2220  # 2220 / 8 = 277.5: the last column's centres
    expected[:, beyond] = 255                                  # lie beyond the slide
    assert labels.shape == (371, 278) and beyond.sum() == 1
    assert (labels == expected).mean() >= 0.99 and set(np.unique(labels)) == {0, 1, 255}


def test_unknown_class_name_exits_2_with_one_line(cmu, tmp_path):
    (tmp_path / "t.csv").write_text(TABLE)
    annotation = tmp_path / "typo.geojson"
    annotation.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[10, 10], [400, 10], [400, 400], [10, 10]]]}, "properties": {"classification": {"name": "Tumro"}}}]))
    done = run_tool(cmu, annotation, "--classes", tmp_path / "t.csv")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "'Tumro'" in done.stderr and "typo.geojson" in done.stderr and "tumour (Tumor), stroma" in done.stderr
    assert run_tool(cmu, annotation, "--labels", tmp_path / "x.png").returncode == 2  # --labels needs --downsample
