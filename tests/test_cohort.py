"""The synthetic cohort (h2g.cohort, tools/make_cohort.py) and the streaming pyramid
writer it uses (h2g.io.pyramid.write_pyramid_tiles)."""
from __future__ import annotations

import filecmp
import importlib.util
import math
import shutil
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from h2g.core.cli import run_cli
from h2g.core.errors import ConfigError, ManifestError
from h2g.data import cohort
from h2g.io.manifest import DEFAULT_MANIFEST, load_manifest
from h2g.io.pyramid import write_pyramid_tiles

REPO = Path(__file__).resolve().parents[1]
TINY_SIDES = cohort.PRESETS["tiny"].sides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny cohort (6 slides), written by two worker processes."""
    out = tmp_path_factory.mktemp("tiny")
    manifest = cohort.make_cohort(out, "tiny", seed=0, progress=False, workers=2)
    assert manifest == out / "data_manifest.csv"
    return out


def _mask(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def _level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        region = slide.read_region((0, 0), level, slide.level_dimensions[level])
    return np.asarray(region)[..., :3]


# ------------------------------------------------------------------ presets, manifest

def test_committed_manifest_is_what_the_smoke_preset_writes():
    assert DEFAULT_MANIFEST.read_text() == cohort.manifest_text("smoke")


def test_smoke_preset_shape():
    specs = cohort.cohort_specs("smoke")
    assert len(specs) == 24 and len({s.slide_id for s in specs}) == 24
    assert Counter(s.grade for s in specs) == {1: 8, 2: 8, 3: 8}
    per_split = Counter((s.split, s.grade) for s in specs)
    assert per_split == {**{("train", g): 4 for g in (1, 2, 3)},
                         **{("val", g): 2 for g in (1, 2, 3)},
                         **{("test", g): 2 for g in (1, 2, 3)}}
    low, high = cohort.PRESETS["smoke"].sides
    assert 2000 <= low < high <= 16_384
    sizes = [cohort.slide_size("smoke", s, 0) for s in specs]
    assert all(low <= side <= high for size in sizes for side in size)


def test_full_preset_is_one_slide_of_about_100k():
    (spec,) = cohort.cohort_specs("full")
    width, height = cohort.slide_size("full", spec, 0)
    assert 90_000 <= width <= 110_000 and 90_000 <= height <= 110_000


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown cohort preset 'huge'"):
        cohort.cohort_specs("huge")


# -------------------------------------------------------------------- tiny cohort files

def test_tiny_manifest_validates(tiny):
    manifest = load_manifest(tiny / "data_manifest.csv")
    assert (tiny / "data_manifest.csv").read_text() == cohort.manifest_text("tiny")
    assert [r.slide_id for r in manifest] == [f"t{i:02d}" for i in range(1, 7)]
    assert {r.grade for r in manifest} == {1, 2, 3}
    assert {r.split for r in manifest} == {"train", "val", "test"}
    for record in manifest:
        assert record.slide_path == tiny / "cohort" / "slides" / f"{record.slide_id}.tiff"
        assert record.annotation_path == tiny / "cohort" / "masks" / f"{record.slide_id}_mask.tiff"


def test_slides_open_in_openslide_at_quarter_micron(tiny):
    for record in load_manifest(tiny / "data_manifest.csv"):
        with openslide.OpenSlide(str(record.slide_path)) as slide:
            assert slide.properties["openslide.vendor"] == "generic-tiff"
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
            assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25)
            width, height = slide.dimensions
            assert TINY_SIDES[0] <= width <= TINY_SIDES[1]
            assert TINY_SIDES[0] <= height <= TINY_SIDES[1]
            assert slide.level_count >= 2
            assert slide.level_dimensions[1] == (math.ceil(width / 4), math.ceil(height / 4))
            assert slide.level_downsamples[1] == pytest.approx(4, rel=1e-3)
        with tifffile.TiffFile(record.slide_path) as tif:
            page = tif.pages[0]
            assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG


def test_masks_are_lossless_at_downsample_4(tiny):
    for record in load_manifest(tiny / "data_manifest.csv"):
        with openslide.OpenSlide(str(record.slide_path)) as slide:
            width, height = slide.dimensions
        mask = _mask(record.annotation_path)
        assert mask.shape == (math.ceil(height / 4), math.ceil(width / 4))
        assert set(np.unique(mask)) == {0, 255}
        with tifffile.TiffFile(record.annotation_path) as tif:
            assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        tumour = (mask > 0).mean()
        assert 0.03 < tumour < 0.5, f"{record.slide_id}: tumour covers {tumour:.2f}"


def test_slides_look_like_stained_tissue_on_glass(tiny):
    """At 1 um/px (level 1): glass is bright and grey, tissue covers 30-60% and is pink
    (red above green), tumour is darker than the rest of the tissue (more nuclei), and
    grade-3 tumour is darker than grade-1 tumour."""
    tumour_darkness = {}
    for record in load_manifest(tiny / "data_manifest.csv"):
        image = _level(record.slide_path, 1).astype(np.float32)
        mask = _mask(record.annotation_path) > 0
        h, w = min(image.shape[0], mask.shape[0]), min(image.shape[1], mask.shape[1])
        image, mask = image[:h, :w], mask[:h, :w]
        saturation = image.max(axis=2) - image.min(axis=2)
        tissue = saturation > 20
        assert 0.25 < tissue.mean() < 0.65, f"{record.slide_id}: tissue {tissue.mean():.2f}"
        glass = image[~tissue & ~mask]
        assert glass.mean() > 225 and np.abs(glass.mean(0) - glass.mean()).max() < 10
        pink = image[tissue & ~mask]
        assert pink[:, 0].mean() > pink[:, 1].mean() + 30  # eosin absorbs green
        darkness = 255 - image.mean(axis=2)
        tumour_dark, normal_dark = darkness[mask].mean(), darkness[tissue & ~mask].mean()
        assert tumour_dark > normal_dark + 5, record.slide_id
        tumour_darkness.setdefault(record.grade, []).append(tumour_dark)
    assert np.mean(tumour_darkness[3]) > np.mean(tumour_darkness[1]) + 5


def test_every_slide_has_tumour_and_non_tumour_patches_at_10x(tiny):
    from h2g.io.annotation import load_annotation
    from h2g.io.slide import open_slide
    from h2g.tiling.grid import build_patch_grid

    for record in load_manifest(tiny / "data_manifest.csv"):
        slide = open_slide(record.slide_path)
        assert slide.objective_power == pytest.approx(40)
        grid = build_patch_grid(slide, annotation=load_annotation(record.annotation_path, slide))
        assert grid.step == 1024
        assert grid.counts["tumour"] >= 1 and grid.counts["non_tumour"] >= 1, (
            record.slide_id, grid.counts)


# ------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_files(tiny, tmp_path):
    spec = cohort.cohort_specs("tiny")[1]
    cohort.write_slide(tmp_path, "tiny", spec, seed=0)
    for name in (spec.slide_path, spec.annotation_path):
        assert filecmp.cmp(tmp_path / name, tiny / name, shallow=False), name


def test_another_seed_gives_other_pixels(tiny, tmp_path):
    spec = cohort.cohort_specs("tiny")[1]
    cohort.write_slide(tmp_path, "tiny", spec, seed=1)
    other, ours = _level(tmp_path / spec.slide_path, 1), _level(tiny / spec.slide_path, 1)
    assert other.shape != ours.shape or np.abs(other.astype(int) - ours).mean() > 10
    assert not np.array_equal(_mask(tmp_path / spec.annotation_path),
                              _mask(tiny / spec.annotation_path))


def test_rendering_is_a_pure_function_of_position():
    """Regions rendered whole or in arbitrary pieces are identical (no seams between
    tiles, whatever the order)."""
    spec = cohort.cohort_specs("tiny")[2]
    renderer = cohort.SlideRenderer(cohort.slide_layout("tiny", spec, 0), (0, spec.index))
    x, y = 1500, 1700
    whole = renderer.render(x, y, 700, 500)
    pieces = np.concatenate([
        np.concatenate([renderer.render(x + a, y + b, wa, hb)
                        for a, wa in ((0, 130), (130, 570))], axis=1)
        for b, hb in ((210, 290), (0, 210))[::-1]], axis=0)
    assert np.array_equal(whole, pieces)
    mask = renderer.render_mask(300, 300, 200, 150)
    assert np.array_equal(mask[50:], renderer.render_mask(300, 350, 200, 100))


@pytest.mark.parametrize("index", [0, 2])
def test_part_of_the_tumour_is_stroma_like_the_stroma_outside(index):
    """Inside the annotation some area is stroma (spindle-cell type), some of it inflamed
    (dense lymphocytes), and inflamed stroma also occurs outside the annotation: such
    patches look alike, so only the context tells them apart."""
    spec = cohort.cohort_specs("tiny")[index]
    layout = cohort.slide_layout("tiny", spec, 0)
    renderer = cohort.SlideRenderer(layout, (0, spec.index))
    width, height = layout.size
    grid = cohort.Grid(0, 0, (height // 8, width // 8), 8)
    st = renderer.structure(grid)
    tumour = renderer.tumour(grid)
    stroma = st.kind == cohort.SPINDLE
    inflamed = stroma & (st.p_lymph > 0.3)
    carcinoma = np.isin(st.kind, [cohort.GRADE1, cohort.GRADE2, cohort.GRADE3])
    assert not carcinoma[~tumour].any()
    assert 0.2 < carcinoma[tumour].mean() < 0.9
    assert stroma[tumour].mean() > 0.1 and inflamed[tumour].mean() > 0.02
    assert inflamed[~tumour].sum() > 0


def test_glass_colour_is_the_unstained_lut_entry():
    lut = cohort.stain_lut()
    assert tuple(lut[0]) == tuple(cohort.BACKGROUND.astype(np.uint8))
    # Beer-Lambert by hand for one pair: H = 128, E = 200
    hv = cohort.HAEMATOXYLIN / np.linalg.norm(cohort.HAEMATOXYLIN) * cohort.MAX_OD[0]
    ev = cohort.EOSIN / np.linalg.norm(cohort.EOSIN) * cohort.MAX_OD[1]
    expected = cohort.BACKGROUND * np.exp(-(128 / 255 * hv + 200 / 255 * ev))
    assert np.abs(lut[128 << 8 | 200] - expected).max() <= 0.5 + 1e-9


# ----------------------------------------------------------------------- ensure_cohort

def test_ensure_cohort_regenerates_missing_files_identically(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    spec = cohort.cohort_specs("tiny")[3]
    (copy / spec.slide_path).unlink()
    kept = copy / cohort.cohort_specs("tiny")[0].slide_path
    before = kept.stat().st_mtime_ns
    assert cohort.ensure_cohort(copy / "data_manifest.csv", seed=0) == copy / "data_manifest.csv"
    assert filecmp.cmp(copy / spec.slide_path, tiny / spec.slide_path, shallow=False)
    assert kept.stat().st_mtime_ns == before  # complete slides are left alone
    assert not list(copy.rglob("*.tmp")) and not list(copy.rglob(".pyramid-*"))


def test_ensure_cohort_leaves_a_complete_cohort_alone(tiny):
    manifest = tiny / "data_manifest.csv"
    stamps = {p: p.stat().st_mtime_ns for p in tiny.rglob("*.tiff")}
    assert cohort.ensure_cohort(manifest) == manifest
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*.tiff")} == stamps


def test_ensure_cohort_does_not_generate_for_other_manifests(tmp_path):
    manifest = tmp_path / "mine.csv"
    manifest.write_text("slide_id,slide_path,annotation_path,grade,split\n"
                        "x,slides/x.svs,,1,train\n")
    with pytest.raises(ManifestError, match="x.svs"):
        cohort.ensure_cohort(manifest)
    assert not (tmp_path / "cohort").exists()


# ------------------------------------------------------------------------------ CLI

def _tool():
    spec = importlib.util.spec_from_file_location("make_cohort", REPO / "tools/make_cohort.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    tool = _tool()

    def cohort_run(argv) -> int:
        return run_cli(tool.main, argv)

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert cohort_run(["--seed", "-1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert cohort_run(["--out", str(a_file)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cohort_run(["--out", str(a_file / "below")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse rejects unknown presets itself
        cohort_run(["--preset", "huge"])
    assert info.value.code == 2


def test_cli_default_folders():
    tool = _tool()
    assert tool.default_out("smoke") == DEFAULT_MANIFEST.parent
    assert tool.default_out("full") == DEFAULT_MANIFEST.parent / "cohort" / "full"


# ----------------------------------------------------------------- streaming pyramids

def test_streaming_pyramid_is_exact_and_memory_light(tmp_path):
    """A 6000 x 4102 RGB pyramid (74 MB raw) written from a render function: OpenSlide
    reads level 0 as rendered (up to JPEG error) and level 1 as its 4x4 box average,
    while Python allocations peak far below the raw size."""
    width, height = 6000, 4102  # not a multiple of 4: level 1 gets a padded last row

    def render(x, y, w, h):
        xx, yy = np.arange(x, x + w)[None, :], np.arange(y, y + h)[:, None]
        channels = [(xx // 7) % 256 + 0 * yy, (yy // 5) % 256 + 0 * xx, ((xx + yy) // 50) % 256]
        return np.stack([c.astype(np.uint8) for c in channels], axis=-1)

    tracemalloc.start()
    path = write_pyramid_tiles(tmp_path / "big.tiff", (width, height), render,
                               downsamples=[1, 4, 16], block=1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    raw = width * height * 3
    assert peak < raw / 4, f"peak Python allocations {peak / 1e6:.1f} MB"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.dimensions == (width, height)
        assert slide.level_dimensions == ((6000, 4102), (1500, 1026), (375, 257))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        region = np.asarray(slide.read_region((2000, 1000), 0, (512, 512)))[..., :3]
        level1 = np.asarray(slide.read_region((0, 0), 1, (1500, 1026)))[..., :3]
    expected = render(2000, 1000, 512, 512).astype(float)
    assert np.abs(region - expected).mean() < 3
    bottom = np.full((264, width, 3), 255, np.float64)  # rows 3840..4104, white-padded
    bottom[:262] = render(0, 3840, width, 262)
    box = bottom.reshape(66, 4, 1500, 4, 3).mean(axis=(1, 3))
    assert np.abs(level1[960:] - box).mean() < 3
    assert not list(tmp_path.glob(".pyramid-*"))  # the scratch folder is gone


def test_streaming_mask_pyramid_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    mask = (rng.random((700, 900)) > 0.5).astype(np.uint8) * 255
    path = write_pyramid_tiles(tmp_path / "mask.tiff", (900, 700),
                               lambda x, y, w, h: mask[y:y + h, x:x + w], channels=1,
                               mpp=1.0, downsamples=[1, 4])
    with tifffile.TiffFile(path) as tif:
        assert np.array_equal(tif.pages[0].asarray(), mask)
        assert tif.pages[1].shape == (175, 225)
        assert np.array_equal(tif.pages[1].asarray(), mask[2::4, 2::4])


def test_tile_count_matches_the_written_pyramid(tmp_path):
    size = (5000, 2100)
    path = write_pyramid_tiles(tmp_path / "t.tiff", size,
                               lambda x, y, w, h: np.full((h, w, 3), 200, np.uint8))
    with tifffile.TiffFile(path) as tif:
        tiles = sum(len(page.dataoffsets) for page in tif.pages)
    assert cohort._tile_count(size) == tiles



def test_cli_names_the_slides_of_non_smoke_presets(tiny_cohort, tmp_path, capsys, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "make_cohort", lambda out, preset, seed, progress: tiny_cohort)
    assert tool.main(["--preset", "tiny", "--out", str(tmp_path), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = list(load_manifest(tiny_cohort))
    assert lines[1:] == [f"{r.slide_id}: {r.slide_path}" for r in records]
    assert all(r.slide_path.is_file() for r in records)
