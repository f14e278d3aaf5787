"""The cohort's measurement method (h2g.evaluation.nuclei, cohort_windows, cohort_stats):
the nucleus measure, the crop finder, the statistics; and tools/cohort_report.py, which
draws them: thumbnails from slide files, the palette sheet and the command line on the
tiny preset (with and without real data)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import load_cli
from PIL import Image

from h2g.core.cli import run_cli
from h2g.data import cohort
from h2g.evaluation import cohort_stats, cohort_windows, nuclei

tool = load_cli("cohort_report", folder="tools")


@pytest.fixture(scope="module")
def tiny_views():
    return cohort_windows.open_slides("tiny", 0)


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
    found = nuclei.measure_nuclei(image, um_per_px)
    assert found.count == count
    assert found.diameters.size == count  # none touches the border
    assert np.all(np.abs(found.diameters - 8.0) <= 0.8), found.diameters
    tissue_um2 = image.shape[0] * image.shape[1] * um_per_px ** 2
    assert found.density == pytest.approx(1000 * count / tissue_um2, rel=0.02)


def test_nucleus_measure_blank_and_pink_images_have_no_nuclei():
    glass = np.full((128, 128, 3), 245, np.uint8)
    assert nuclei.measure_nuclei(glass, 0.25).count == 0
    pink = np.full((128, 128, 3), (236, 172, 206), np.uint8)  # tissue, no nuclei
    assert nuclei.measure_nuclei(pink, 0.25).count == 0


def test_nucleus_measure_counts_only_centres_in_the_area():
    image, _ = _discs(0.25)
    left = np.zeros(image.shape[:2], bool)
    left[:, : image.shape[1] // 3] = True  # the first column of discs
    found = nuclei.measure_nuclei(image, 0.25, left)
    assert found.count == 3
    assert found.tissue_um2 == pytest.approx(left.sum() * 0.25 ** 2, rel=0.01)


# ------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("kind", ["invasive", "stroma"])
def test_crop_finder_returns_a_window_mostly_of_the_kind(tiny_views, kind):
    window = cohort_windows.find_window(tiny_views, kind)
    assert window is not None and window.pure and window.share >= cohort_windows.PURITY
    view = tiny_views[window.slide]
    half = cohort_windows.PURITY_WINDOW // 2
    assert half <= window.cx <= view.size[0] - half and half <= window.cy <= view.size[1] - half
    # independently: the region map at 1 um over the 20x field
    step = 4
    n = cohort_windows.PURITY_WINDOW // step
    regions = view.renderer.regions(cohort.Grid(window.cx - half, window.cy - half, (n, n), step))
    assert (regions == cohort.REGION_NAMES.index(kind)).mean() >= 0.7
    # deterministic, and the first slide that has such a window
    assert cohort_windows.find_window(tiny_views, kind) == window
    for earlier in tiny_views[:window.slide]:
        found = cohort_windows.best_window(earlier, cohort.REGION_NAMES.index(kind), cohort_windows.PURITY_WINDOW, cohort_windows.PURITY_WINDOW)
        assert found is None or found[0] < cohort_windows.PURITY


def test_crop_finder_skips_or_falls_back_when_no_window_is_pure_enough(tiny_views):
    assert cohort_windows.find_window(tiny_views, "stroma", purity=1.01, fallback=None) is None
    best = cohort_windows.find_window(tiny_views, "stroma", purity=1.01, fallback=0.3)
    assert best is not None and not best.pure and best.share >= 0.3
    vetoed = cohort_windows.find_window(tiny_views, "stroma", accept=lambda w: w.slide > 0)
    assert vetoed is None or vetoed.slide > 0


def test_stats_windows_are_one_per_slide_in_order(tiny_views):
    windows = cohort_windows.stats_windows(tiny_views, "invasive", count=3)
    assert [w.slide for w in windows] == sorted({w.slide for w in windows})
    assert len(windows) == 3 and all(w.share >= cohort_windows.STATS_PURITY for w in windows)
    w = windows[0]
    mask = cohort_windows.crop_kind_mask(tiny_views[w.slide].renderer, w.cx, w.cy, cohort.REGION_NAMES.index("invasive"))
    assert mask.shape == (cohort_windows.CROP, cohort_windows.CROP) and mask.mean() >= 0.4


def test_window_shares_against_a_direct_count():
    rng = np.random.default_rng(1)
    mask = rng.random((9, 11)) < 0.4
    shares = cohort_windows.window_shares(mask, 4)
    for k, l in ((2, 2), (4, 7), (0, 0), (9, 11)):
        cells = mask[max(k - 2, 0):k + 2, max(l - 2, 0):l + 2]
        assert shares[k, l] == pytest.approx(cells.sum() / 16)


def test_ink_share_counts_green_blue_and_black_ink():
    rgb = np.empty((2, 4, 3), np.uint8)
    rgb[:] = (200, 120, 180)    # H&E pink: not ink
    rgb[0, 0] = (60, 140, 90)   # green ink: G > R + 12
    rgb[0, 1] = (40, 60, 200)   # blue ink: 60 > 40 + 12
    rgb[0, 2] = (30, 35, 40)    # black ink: max < 80, max - min < 30
    rgb[0, 3] = (70, 20, 75)    # dark haematoxylin: max < 80 but not grey (75 - 20 >= 30)
    assert cohort_windows.ink_share(rgb) == 3 / 8


# --------------------------------------------------------------------------- statistics

def test_stats_rows_groups_and_csv_on_hand_made_samples(tmp_path):
    red = np.full((4, 4, 3), (200, 100, 150), np.uint8)
    blue = np.full((4, 4, 3), (100, 50, 250), np.uint8)
    half = np.zeros((4, 4), bool)
    half[:, :2] = True  # 8 of the red crop's pixels are of the kind; all 16 of the blue one's
    stroma = cohort_stats.Sample("stroma", "synthetic", 0.25, [red, blue], [half, None])
    real = {"normal": cohort_stats.Sample("normal", "real_camelyon16", 0.243, [red], [None])}
    shares = {k: (0.0, None if k == "glass" else 0.0) for k in cohort.REGION_NAMES}
    shares["stroma"] = (0.5, 0.625)
    rows = cohort_stats.stats_rows(shares, {"stroma": stroma}, real)
    assert [(r["source"], r["name"], r["crops"]) for r in rows] == [("synthetic", "stroma", 2),
                                                                    ("real_camelyon16", "normal", 1)]
    # mean RGB over the measured pixels: 8 red and 16 blue
    assert [rows[0][c] for c in ("mean_r", "mean_g", "mean_b")] == [133.3, 66.7, 216.7]
    assert (rows[0]["area_share"], rows[0]["tissue_share"]) == (0.5, 0.625)
    assert [rows[1][c] for c in ("mean_r", "mean_g", "mean_b", "area_share")] == [200, 100, 150, None]
    # the plots' groups: synthetic non-tumour crops measured whole, real classes as they are
    grouped = cohort_stats.groups({"stroma": stroma}, real)
    assert list(grouped) == ["synthetic non-tumour", "real normal"]
    assert grouped["synthetic non-tumour"].mean_rgb() == [150, 75, 200]
    assert grouped["real normal"] is real["normal"]
    cohort_stats.write_csv(tmp_path / "stats.csv", rows)
    written = _read_csv(tmp_path / "stats.csv")
    assert tuple(written[0]) == cohort_stats.CSV_COLUMNS
    assert (written[0]["mean_r"], written[1]["area_share"], written[1]["tissue_share"]) == ("133.3", "", "")


# --------------------------------------------------------------------------- thumbnails

@pytest.mark.slow
def test_thumbnail_from_a_slide_file_matches_the_rendered_one(tiny_views, tmp_path):
    view = tiny_views[0]
    cohort.write_slide(tmp_path, "tiny", view.spec, 0, only=(view.spec.slide_path,))
    factor = tool.thumbnail_factor(view.size)
    rendered = tool.rendered_thumbnail(view.renderer, view.size, factor)
    on_disk = tool.disk_thumbnail(tmp_path / view.spec.slide_path, view, factor)
    assert on_disk is not None and on_disk.shape == rendered.shape
    assert np.abs(on_disk.astype(float) - rendered).mean() < 4
    # the same layout with other pixels (another seed's key) is not taken for the file's
    other = cohort_windows.SlideView(view.spec, view.layout, cohort.SlideRenderer(view.layout, key=(1, 0)),
                                     view.step, view.regions)
    assert tool.disk_thumbnail(tmp_path / view.spec.slide_path, other, factor) is None
    assert tool.disk_thumbnail(tmp_path / "missing.tiff", view, factor) is None


@pytest.mark.slow
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


@pytest.mark.slow  # a whole run of the tool (about 9 s of CPU)
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


@pytest.mark.slow  # a whole run of the tool with the real patches measured (about 16 s of CPU)
def test_cli_with_real_data(real_data, without_real, tmp_path):
    code, out = _run(tmp_path, "--slides", "1", "--real-data", str(real_data))
    assert code == 0
    rows = _read_csv(out / "cohort_stats.csv")
    real = {r["name"]: r for r in rows if r["source"] == "real_camelyon16"}
    assert set(real) == set(cohort_stats.REAL_CLASSES)
    for name, row in real.items():
        files = list((real_data / cohort_stats.REAL_PATCHES / name).glob("*.png"))
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
