"""The synthetic cohort (h2g.cohort, tools/make_cohort.py) and the streaming pyramid
writer it uses (h2g.io.pyramid.write_pyramid_tiles)."""
from __future__ import annotations

import filecmp
import hashlib
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
from h2g.data import cohort, embedded, lesions
from h2g.io.classes import IGNORE, sidecar_path
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


@pytest.mark.slow
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

@pytest.mark.slow
def test_same_seed_gives_identical_files(tiny, tmp_path):
    spec = cohort.cohort_specs("tiny")[1]
    cohort.write_slide(tmp_path, "tiny", spec, seed=0)
    assert len(spec.outputs) == 9  # slide, mask, full, partial and BACH-like labels, the four annotations' GeoJSON
    for name in spec.outputs:
        assert filecmp.cmp(tmp_path / name, tiny / name, shallow=False), name


@pytest.mark.slow
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
    kinds, _ = renderer.lesions(grid)
    look_alikes = np.isin(kinds, [lesions.DCIS, lesions.NODULE])  # the tumour's cells, not invasive
    assert not carcinoma[~tumour & ~look_alikes].any()
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

@pytest.mark.slow
def test_ensure_cohort_regenerates_missing_files_identically(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    spec = cohort.cohort_specs("tiny")[3]
    (copy / spec.slide_path).unlink()
    kept = copy / cohort.cohort_specs("tiny")[0].slide_path
    before = kept.stat().st_mtime_ns
    assert embedded.ensure_cohort(copy / "data_manifest.csv", seed=0) == copy / "data_manifest.csv"
    assert filecmp.cmp(copy / spec.slide_path, tiny / spec.slide_path, shallow=False)
    assert kept.stat().st_mtime_ns == before  # complete slides are left alone
    assert not list(copy.rglob("*.tmp")) and not list(copy.rglob(".pyramid-*"))


def test_ensure_cohort_leaves_a_complete_cohort_alone(tiny):
    manifest = tiny / "data_manifest.csv"
    stamps = {p: p.stat().st_mtime_ns for p in tiny.rglob("*.tiff")}
    assert embedded.ensure_cohort(manifest) == manifest
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*.tiff")} == stamps


def test_ensure_cohort_does_not_generate_for_other_manifests(tmp_path):
    manifest = tmp_path / "mine.csv"
    manifest.write_text("slide_id,slide_path,annotation_path,grade,split\n"
                        "x,slides/x.svs,,1,train\n")
    with pytest.raises(ManifestError, match="x.svs"):
        embedded.ensure_cohort(manifest)
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



@pytest.mark.slow
def test_cli_names_the_slides_of_non_smoke_presets(tiny_cohort, tmp_path, capsys, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "make_cohort", lambda out, preset, seed, progress: tiny_cohort)
    assert tool.main(["--preset", "tiny", "--out", str(tmp_path), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = list(load_manifest(tiny_cohort))
    assert lines[1:] == [f"{r.slide_id}: {r.slide_path}" for r in records]
    assert all(r.slide_path.is_file() for r in records)


# ------------------------------------------------------ multi-class label maps (DMMN)

# SHA-256 of files the tiny preset (seed 0) writes since the tumour mimics and the new
# nucleus types (issue #12); the masks are unchanged since before the label maps existed
# (the mimics lie outside the tumour and the label maps never touch the slides).
# (The file bytes also depend on the JPEG/zlib codecs: should a codec upgrade change them,
# test_rendered_pixels_are_unchanged still pins the pixels themselves.)
FROZEN_FILES = {
    "cohort/slides/t02.tiff": "937d8b0f1d30d0d4bcb983297f58f3e9bb536c8c277423f6fc1889231c0d330c",
    "cohort/masks/t02_mask.tiff": "317478d7fca8217b75836f39e123e8a810886bc2df7d9d71a13465890a453114",
    "cohort/slides/t05.tiff": "580464d8726f0bff5ddf17d4e82aa2641e9e1ce80caaac155c1c8de12aad4a27",
    "cohort/masks/t05_mask.tiff": "bf572fe394b0f917b04ae9ba6817ce436ed36990c6d708b1df7048a49706893e",
    "data_manifest.csv": "05acc457e9cddbc0da6373c33b33bb6a5aca8fa39e089b3507c8f13150ec282f",
}
# slide index -> SHA-256 of render(1000, 1200, 1024, 768) and of the whole render_mask
FROZEN_PIXELS = {
    1: ("cd46f59d14eda4804f77b7bdc31201fd85f4f3dd7cb9660cfc13fd363c580941",
        "b388a35c97bc1155e37d61940499047ede64fc04419d46798a21fe32661c679f"),
    4: ("e036cb519690e6ada3e7d92a02e9f328dd619ec428403088df054263407f73c7",
        "a06e07cced477ce4ae4a87abc5cbed354fe1cf319b340236a0df039ad78942e3"),
}
CLASS_NAMES = ("tumour", "benign", "stroma", "fat", "glass")
TUMOUR, BENIGN, STROMA, FAT, GLASS = 1, 2, 3, 4, 5  # pixel values in the label TIFFs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _renderer(index: int):
    spec = cohort.cohort_specs("tiny")[index]
    layout = cohort.slide_layout("tiny", spec, 0)
    return spec, layout, cohort.SlideRenderer(layout, (0, spec.index))


def test_slides_and_masks_are_byte_identical_to_their_recorded_digests(tiny):
    for name, digest in FROZEN_FILES.items():
        assert _sha256(tiny / name) == digest, name


@pytest.mark.parametrize("index", sorted(FROZEN_PIXELS))
def test_rendered_pixels_are_unchanged(index):
    _, layout, renderer = _renderer(index)
    width, height = layout.size
    region = renderer.render(1000, 1200, 1024, 768)
    mask = renderer.render_mask(0, 0, -(-width // 4), -(-height // 4))
    assert (hashlib.sha256(region.tobytes()).hexdigest(),
            hashlib.sha256(mask.tobytes()).hexdigest()) == FROZEN_PIXELS[index]


def test_label_files_are_lossless_maps_on_the_mask_grid(tiny):
    for spec in cohort.cohort_specs("tiny"):
        mask = _mask(tiny / spec.annotation_path)
        with tifffile.TiffFile(tiny / spec.annotation_path) as tif:
            levels = [page.shape for page in tif.pages]
        assert (tiny / spec.labels_path).is_file()
        assert (tiny / "cohort" / "labels" / f"{spec.slide_id}_partial.tiff").is_file() == (
            spec.split in ("train", "val"))
        for path in filter(None, (spec.labels_path, spec.partial_path)):
            with tifffile.TiffFile(tiny / path) as tif:
                assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
                assert tif.pages[0].is_tiled and [page.shape for page in tif.pages] == levels
                labels = tif.pages[0].asarray()
            assert labels.dtype == np.uint8 and labels.shape == mask.shape
            assert set(np.unique(labels)) <= set(range(6)), path


def test_full_labels_tumour_is_exactly_the_binary_mask(tiny):
    for spec in cohort.cohort_specs("tiny"):
        mask = _mask(tiny / spec.annotation_path)
        labels = _mask(tiny / spec.labels_path)
        assert np.array_equal(labels == TUMOUR, mask == 255), spec.slide_id
        assert not (labels == 0).any(), spec.slide_id  # full maps: every pixel annotated
        present = set(np.unique(labels))
        assert {TUMOUR, STROMA, FAT, GLASS} <= present, (spec.slide_id, present)


def test_partial_labels_are_blobs_of_the_full_ones(tiny):
    """Where the partial map is annotated it is the full map; it annotates 20-60% of the
    tissue, tumour and stroma on every slide, some glass, and leaves the rest 0."""
    classes_annotated = set()
    for spec in cohort.cohort_specs("tiny"):
        if spec.split == "test":
            assert spec.partial_path is None
            continue
        full = _mask(tiny / spec.labels_path)
        partial = _mask(tiny / spec.partial_path)
        annotated = partial != 0
        assert np.array_equal(partial[annotated], full[annotated]), spec.slide_id
        tissue = full != GLASS
        share = annotated[tissue].mean()
        assert 0.2 <= share <= 0.6, f"{spec.slide_id}: {share:.2f} of the tissue annotated"
        present = set(np.unique(partial))
        assert {0, TUMOUR, STROMA, GLASS} <= present, (spec.slide_id, present)
        for value in (TUMOUR, STROMA, GLASS):  # not a sliver: a real part of each class
            assert (partial == value).sum() > 0.1 * (full == value).sum(), (spec.slide_id, value)
        # irregular blobs, not a speckle: most annotated pixels sit inside annotated areas
        inner = annotated[1:-1, 1:-1] & annotated[:-2, 1:-1] & annotated[2:, 1:-1] \
            & annotated[1:-1, :-2] & annotated[1:-1, 2:]
        assert inner.sum() > 0.95 * annotated[1:-1, 1:-1].sum(), spec.slide_id
        classes_annotated |= present
    assert classes_annotated == {0, TUMOUR, BENIGN, STROMA, FAT, GLASS}


def test_label_classes_agree_with_the_slide_pixels(tiny):
    """At 1 um/px (slide level 1 = the label grid): glass labels are bright grey pixels and
    the bright grey pixels that are not fat are glass; fat (empty adipocytes) is bright."""
    for spec in cohort.cohort_specs("tiny"):
        image = _level(tiny / spec.slide_path, 1).astype(np.float32)
        labels = _mask(tiny / spec.labels_path)
        assert labels.shape == image.shape[:2]
        brightness = image.mean(axis=2)
        pale = (image.max(axis=2) - image.min(axis=2) <= 20) & (brightness > 200)
        glass = labels == GLASS
        assert pale[glass].mean() > 0.97, spec.slide_id
        assert glass[pale & (labels != FAT)].mean() > 0.97, spec.slide_id
        assert (pale == glass)[labels != FAT].mean() > 0.95, spec.slide_id
        fat = labels == FAT
        assert (brightness[fat] > 200).mean() > 0.9, spec.slide_id
        assert brightness[fat].mean() > brightness[labels == STROMA].mean() + 30, spec.slide_id


def test_label_rendering_is_a_pure_function_of_position():
    _, _, renderer = _renderer(0)
    for render in (renderer.render_labels, renderer.render_partial):
        whole = render(200, 150, 700, 500)
        pieces = np.concatenate([
            np.concatenate([render(200 + a, 150 + b, wa, hb) for a, wa in ((0, 333), (333, 367))],
                           axis=1)
            for b, hb in ((0, 256), (256, 244))], axis=0)
        assert np.array_equal(whole, pieces)
    full = renderer.render_labels(200, 150, 700, 500)
    assert np.array_equal(renderer.render_partial(200, 150, 700, 500, labels=full),
                          renderer.render_partial(200, 150, 700, 500))
    assert np.array_equal(full, renderer.render_labels(200, 150, 700, 500))  # not modified


def test_label_maps_come_from_the_structure_of_the_slide():
    """The labels are the pieces structure() draws: adipocytes are fat, normal acini
    epithelium is benign, carcinoma is tumour, spindle stroma is stroma, and glass has no
    stain (structure at the label grid, 1 um/px)."""
    _, layout, renderer = _renderer(2)
    width, height = layout.size
    grid = cohort.Grid(0, 0, (height // 4, width // 4), 4)
    st, labels = renderer.structure(grid), renderer.labels(grid)
    assert np.array_equal(labels, renderer.render_labels(0, 0, width // 4, height // 4))
    assert (labels[st.kind == cohort.ADIPOCYTE] == FAT).all()
    assert (labels[st.kind == cohort.NORMAL] == BENIGN).all()
    carcinoma = np.isin(st.kind, [cohort.GRADE1, cohort.GRADE2, cohort.GRADE3])
    assert carcinoma.any() and (labels[carcinoma] == TUMOUR).all()
    assert (st.kind[labels == STROMA] == cohort.SPINDLE).all()
    glass = labels == GLASS
    assert (st.kind[glass] == cohort.NONE).all() and not st.e[glass].any() and not st.h[glass].any()
    assert (labels[st.kind == cohort.NONE] == GLASS).all()


def test_multiclass_manifest_reads_partial_labels_with_ignored_pixels(tiny):
    from h2g.io.annotation import load_annotation
    from h2g.io.slide import open_slide

    path = tiny / "data_manifest_multiclass.csv"
    assert path.read_text() == cohort.manifest_text("tiny", multiclass=True)
    assert sidecar_path(path).read_text() == cohort.classes_text()
    manifest = load_manifest(path)
    assert manifest.classes.names == CLASS_NAMES
    assert manifest.classes.ignore == (0,) and manifest.classes.tumour_index == 0
    binary = load_manifest(tiny / "data_manifest.csv")
    assert [(r.slide_id, r.slide_path, r.grade, r.split) for r in manifest] == [
        (r.slide_id, r.slide_path, r.grade, r.split) for r in binary]
    for record in manifest:
        kind = "labels" if record.split == "test" else "partial"
        expected = tiny / "cohort" / "labels" / f"{record.slide_id}_{kind}.tiff"
        assert record.annotation_path == expected
    for record in (manifest.split("train")[0], manifest.split("test")[0]):
        values = _mask(record.annotation_path)
        annotation = load_annotation(record.annotation_path, open_slide(record.slide_path),
                                     classes=manifest.classes)
        expected = np.where(values == 0, IGNORE, values.astype(np.int16) - 1)
        assert np.array_equal(annotation.labels, expected)
        assert (annotation.labels == IGNORE).any() == (record.split != "test")
        assert np.array_equal(annotation.mask, values == TUMOUR)


def test_committed_multiclass_manifest_is_what_the_smoke_preset_writes():
    path = REPO / "data_manifest_multiclass.csv"
    assert path.read_text() == cohort.manifest_text("smoke", multiclass=True)
    assert sidecar_path(path) == REPO / "data_manifest_multiclass.classes.csv"
    assert sidecar_path(path).read_text() == cohort.classes_text()
    manifest = load_manifest(path, check_files=False)
    assert manifest.classes.names == CLASS_NAMES
    assert [e.values for e in manifest.classes.entries] == [(1,), (2,), (3,), (4,), (5,)]
    binary = load_manifest(DEFAULT_MANIFEST, check_files=False)
    assert [(r.slide_id, r.grade, r.split) for r in manifest] == [
        (r.slide_id, r.grade, r.split) for r in binary]


@pytest.mark.slow
def test_ensure_cohort_completes_a_multiclass_cohort_without_touching_slides(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    train, test = cohort.cohort_specs("tiny")[0], cohort.cohort_specs("tiny")[5]
    for name in (train.partial_path, test.labels_path):
        (copy / name).unlink()
    manifest = copy / "data_manifest_multiclass.csv"
    sidecar_path(manifest).unlink()
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*.tiff")}
    assert embedded.ensure_cohort(manifest, seed=0) == manifest
    for name in (train.partial_path, test.labels_path):
        assert filecmp.cmp(copy / name, tiny / name, shallow=False), name
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # only the missing files written
    assert sidecar_path(manifest).read_text() == cohort.classes_text()
    assert load_manifest(manifest).classes.names == CLASS_NAMES
    assert not list(copy.rglob("*.tmp")) and not list(copy.rglob(".pyramid-*"))


@pytest.mark.slow
def test_pyramid_rendered_in_processes_is_the_same_file(tmp_path):
    """write_pyramid_tiles with level 0 rendered by two worker processes (and tiles
    compressed by two threads) writes the same bytes as one process: the full preset's
    one slide is rendered this way on every core."""
    from h2g.data.cohort import SlideRenderer, cohort_specs, slide_layout
    from h2g.io.pyramid import write_pyramid_tiles

    spec = cohort_specs("tiny")[0]
    renderer = SlideRenderer(slide_layout("tiny", spec, 0), key=(0, spec.index))
    files = [write_pyramid_tiles(tmp_path / f"w{n}.tiff", (1280, 1024), renderer.render, block=512, workers=n)
             for n in (1, 2)]
    one, two = (f.read_bytes() for f in files)
    assert len(one) > 100_000 and one == two
