"""tools/cohort_report.py: the nucleus measure, the crop finder, thumbnails from slide
files, and the command line on the tiny preset (with and without real data)."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from h2g.core.cli import run_cli
from h2g.data import cohort

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("cohort_report", REPO / "tools" / "cohort_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def tiny_views():
    return tool.open_slides("tiny", 0)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- nuclei

def _discs(um_per_px: float, diameter_um: float = 8.0, seed: int = 0) -> tuple[np.ndarray, int]:
    """Dark purple discs on a noisy pink background, drawn with numpy: the image and
    the number of discs (a 3 x 3 grid well inside the image)."""
    rng = np.random.default_rng(seed)
    side = int(round(80 / um_per_px))  # 80 um
    image = np.empty((side, side, 3), np.float64)
    image[:] = (236, 172, 206)
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    radius = diameter_um / um_per_px / 2
    centres = [(side * f, side * g) for f in (0.2, 0.5, 0.8) for g in (0.2, 0.5, 0.8)]
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = (72, 48, 128)
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), len(centres)


@pytest.mark.parametrize("um_per_px", [0.25, 0.243, 0.5])
def test_nucleus_measure_finds_discs_of_known_size(um_per_px):
    image, count = _discs(um_per_px)
    nuclei = tool.measure_nuclei(image, um_per_px)
    assert nuclei.count == count
    assert nuclei.diameters.size == count  # none touches the border
    assert np.all(np.abs(nuclei.diameters - 8.0) <= 0.8), nuclei.diameters
    tissue_um2 = image.shape[0] * image.shape[1] * um_per_px ** 2
    assert nuclei.density == pytest.approx(1000 * count / tissue_um2, rel=0.02)


def test_nucleus_measure_blank_and_pink_images_have_no_nuclei():
    glass = np.full((128, 128, 3), 245, np.uint8)
    assert tool.measure_nuclei(glass, 0.25).count == 0
    pink = np.full((128, 128, 3), (236, 172, 206), np.uint8)  # tissue, no nuclei
    assert tool.measure_nuclei(pink, 0.25).count == 0


def test_nucleus_measure_counts_only_centres_in_the_area():
    image, _ = _discs(0.25)
    left = np.zeros(image.shape[:2], bool)
    left[:, : image.shape[1] // 3] = True  # the first column of discs
    nuclei = tool.measure_nuclei(image, 0.25, left)
    assert nuclei.count == 3
    assert nuclei.tissue_um2 == pytest.approx(left.sum() * 0.25 ** 2, rel=0.01)


# ------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("kind", ["invasive", "stroma"])
def test_crop_finder_returns_a_window_mostly_of_the_kind(tiny_views, kind):
    window = tool.find_window(tiny_views, kind)
    assert window is not None and window.pure and window.share >= tool.PURITY
    view = tiny_views[window.slide]
    half = tool.PURITY_WINDOW // 2
    assert half <= window.cx <= view.size[0] - half and half <= window.cy <= view.size[1] - half
    # independently: the region map at 1 um over the 20x field
    step = 4
    n = tool.PURITY_WINDOW // step
    regions = view.renderer.regions(cohort.Grid(window.cx - half, window.cy - half, (n, n), step))
    assert (regions == cohort.REGION_NAMES.index(kind)).mean() >= 0.7
    # deterministic, and the first slide that has such a window
    assert tool.find_window(tiny_views, kind) == window
    for earlier in tiny_views[:window.slide]:
        found = tool.best_window(earlier, cohort.REGION_NAMES.index(kind), tool.PURITY_WINDOW, tool.PURITY_WINDOW)
        assert found is None or found[0] < tool.PURITY


def test_crop_finder_skips_or_falls_back_when_no_window_is_pure_enough(tiny_views):
    assert tool.find_window(tiny_views, "stroma", purity=1.01, fallback=None) is None
    best = tool.find_window(tiny_views, "stroma", purity=1.01, fallback=0.3)
    assert best is not None and not best.pure and best.share >= 0.3
    vetoed = tool.find_window(tiny_views, "stroma", accept=lambda w: w.slide > 0)
    assert vetoed is None or vetoed.slide > 0


def test_stats_windows_are_one_per_slide_in_order(tiny_views):
    windows = tool.stats_windows(tiny_views, "invasive", count=3)
    assert [w.slide for w in windows] == sorted({w.slide for w in windows})
    assert len(windows) == 3 and all(w.share >= tool.STATS_PURITY for w in windows)
    w = windows[0]
    mask = tool.crop_kind_mask(tiny_views[w.slide].renderer, w.cx, w.cy, cohort.REGION_NAMES.index("invasive"))
    assert mask.shape == (tool.CROP, tool.CROP) and mask.mean() >= 0.4


def test_window_shares_against_a_direct_count():
    rng = np.random.default_rng(1)
    mask = rng.random((9, 11)) < 0.4
    shares = tool.window_shares(mask, 4)
    for k, l in ((2, 2), (4, 7), (0, 0), (9, 11)):
        cells = mask[max(k - 2, 0):k + 2, max(l - 2, 0):l + 2]
        assert shares[k, l] == pytest.approx(cells.sum() / 16)


# --------------------------------------------------------------------------- thumbnails

def test_thumbnail_from_a_slide_file_matches_the_rendered_one(tiny_views, tmp_path):
    view = tiny_views[0]
    cohort.write_slide(tmp_path, "tiny", view.spec, 0, only=(view.spec.slide_path,))
    factor = tool.thumbnail_factor(view.size)
    rendered = tool.rendered_thumbnail(view.renderer, view.size, factor)
    on_disk = tool.disk_thumbnail(tmp_path / view.spec.slide_path, view, factor)
    assert on_disk is not None and on_disk.shape == rendered.shape
    assert np.abs(on_disk.astype(float) - rendered).mean() < 4
    # the same layout with other pixels (another seed's key) is not taken for the file's
    other = tool.SlideView(view.spec, view.layout, cohort.SlideRenderer(view.layout, key=(1, 0)),
                           view.step, view.regions)
    assert tool.disk_thumbnail(tmp_path / view.spec.slide_path, other, factor) is None
    assert tool.disk_thumbnail(tmp_path / "missing.tiff", view, factor) is None


def test_thumbnail_of_a_large_slide_samples_bands(tiny_views, monkeypatch):
    """Beyond the render budget only a band of rows per thumbnail row is rendered: it
    still looks like the full thumbnail (same size, close colours)."""
    view = tiny_views[1]
    factor = tool.thumbnail_factor(view.size, longest=64)
    full = tool.rendered_thumbnail(view.renderer, view.size, factor)
    monkeypatch.setattr(tool, "RENDER_BUDGET", 0)
    calls = []
    bands = tool.rendered_thumbnail(view.renderer, view.size, factor, calls.append)
    assert len(calls) == tool.thumbnail_units(view.size, factor) == bands.shape[0]
    assert bands.shape == full.shape
    assert np.abs(bands.astype(float) - full).mean() < 12


# ------------------------------------------------------------------------------ the CLI

def _run(tmp_path: Path, *args: str) -> tuple[int, Path]:
    out = tmp_path / "report"
    code = run_cli(tool.main, ["--preset", "tiny", "--out", str(out), "--quiet",
                               "--cohort-dir", str(tmp_path / "no_cohort"), *args])
    return code, out


@pytest.fixture(scope="module")
def without_real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_no_real")
    code, out = _run(tmp, "--slides", "2", "--real-data", str(tmp / "missing"))
    return code, out, tmp


def test_cli_writes_the_sheet_plots_and_tables(without_real, tiny_views, capsys):
    code, out, _ = without_real
    assert code == 0
    with Image.open(out / "contact_sheet.png") as sheet:
        sheet.load()
        assert sheet.width == tool.SHEET_WIDTH and 1500 <= sheet.width < 3000
        assert 1500 <= sheet.height <= 6000
    assert (out / "contact_sheet.png").stat().st_size < tool.MAX_SHEET_BYTES
    with Image.open(out / "colour_nuclei.png") as plots:
        assert plots.size == (1600, 900)
    rows = _read_csv(out / "cohort_stats.csv")
    names = [r["name"] for r in rows]
    found = [k for i, k in enumerate(cohort.REGION_NAMES) if any((v.regions == i).any() for v in tiny_views)]
    assert names == found  # one row per kind found, REGION_NAMES order, no real rows
    assert {"glass", "stroma", "invasive"} <= set(names)
    assert all(r["source"] == "synthetic" for r in rows)
    assert sum(float(r["area_share"]) for r in rows) == pytest.approx(1.0, abs=1e-3)
    tissue = sum(float(r["tissue_share"]) for r in rows if r["tissue_share"])
    assert tissue == pytest.approx(1.0, abs=1e-3)
    invasive = next(r for r in rows if r["name"] == "invasive")
    assert int(invasive["crops"]) > 0 and int(invasive["nuclei"]) > 0
    assert 3 < float(invasive["diameter_median_um"]) < 15
    report = json.loads((out / "cohort_stats.json").read_text())
    assert report["preset"] == "tiny" and not report["real_data_used"]
    assert "absent" in report["real_note"]
    assert [s["slide_id"] for s in report["shown"]] == [v.spec.slide_id for v in tiny_views[:2]]
    assert set(report["windows"]) == set(names)


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for args, words in ((["--preset", "huge"], "huge"), (["--slides", "0"], "--slides"),
                        (["--seed", "-1"], "--seed"), (["--real-data", str(a_file)], "not a folder")):
        code, _ = _run(tmp_path, *args)
        err = capsys.readouterr().err
        assert code == 2, args
        assert err.strip().count("\n") == 0 and words in err, err
    assert run_cli(tool.main, ["--preset", "tiny", "--out", str(a_file)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_with_real_data(real_data, without_real, tmp_path):
    code, out = _run(tmp_path, "--slides", "1", "--real-data", str(real_data))
    assert code == 0
    rows = _read_csv(out / "cohort_stats.csv")
    real = {r["name"]: r for r in rows if r["source"] == "real_camelyon16"}
    assert set(real) == set(tool.REAL_CLASSES)
    for name, row in real.items():
        files = list((real_data / tool.REAL_PATCHES / name).glob("*.png"))
        assert int(row["crops"]) == len(files) > 0
        assert int(row["nuclei"]) > 0 and 2 < float(row["diameter_median_um"]) < 15
    report = json.loads((out / "cohort_stats.json").read_text())
    assert report["real_data_used"] and set(report["groups"]) == {
        "synthetic invasive", "synthetic non-tumour", "real tumour", "real normal"}
    # the synthetic statistics do not depend on the real data or the slides shown
    before = [r for r in _read_csv(without_real[1] / "cohort_stats.csv")]
    assert [r for r in rows if r["source"] == "synthetic"] == before


def test_palette_sheet_keeps_kind_colours_black_and_white_exactly():
    rng = np.random.default_rng(2)
    kinds = len(cohort.REGION_NAMES)
    image = rng.integers(0, 256, (16 + 4 * kinds, 96, 3), dtype=np.uint8)
    image[:8] = 255
    image[8:16] = 0
    for i, name in enumerate(cohort.REGION_NAMES):
        image[16 + i * 4:20 + i * 4, :8] = tool.kind_colour(name)
    reduced = np.asarray(tool.to_palette(Image.fromarray(image)).convert("RGB"))
    assert (reduced[:16] == image[:16]).all()
    assert (reduced[16:, :8] == image[16:, :8]).all()
    assert np.abs(reduced.astype(int) - image).mean() < 40
