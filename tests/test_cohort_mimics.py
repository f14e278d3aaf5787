"""The cohort's tumour mimics, label maps and slide artefacts (issue #12): mimics match the
tumour at low resolution and differ at 10-20x, every label map derives from one layout,
artefacts render position-purely and tissue detection drops pen ink."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from h2g.data import cohort, lesions
from h2g.data.nuclei import BENIGN, MYOEPITHELIAL
from h2g.tiling.tissue import pen_ink, saturation


def _renderer(preset: str, index: int):
    spec = cohort.cohort_specs(preset)[index]
    layout = cohort.slide_layout(preset, spec, 0)
    return layout, cohort.SlideRenderer(layout, (0, spec.index))


def _window_of(renderer, layout, kind: int, side: int, step: int = 64):
    """Top-left level-0 corner of a ``side`` px window that is mostly region ``kind``."""
    width, height = layout.size
    regions = renderer.regions(cohort.Grid(0, 0, (height // step, width // step), step))
    n = side // step
    share = ndimage.uniform_filter((regions == kind).astype(float), n, mode="constant")
    iy, ix = np.unravel_index(np.argmax(share), share.shape)
    if share[iy, ix] < 0.8:
        return None
    x = int(np.clip((ix - n // 2) * step, 0, width - side))
    y = int(np.clip((iy - n // 2) * step, 0, height - side))
    return x, y


def _low_res_means(renderer, layout, ds: int = 32):
    """Mean RGB per region kind of the slide seen at ``ds`` level-0 px per pixel (8 um),
    without the slide's blur, fold and pen (which fall on some regions and not others)."""
    import dataclasses

    layout = dataclasses.replace(layout, look=dataclasses.replace(layout.look, blur=(), fold=None, pen=None))
    renderer = cohort.SlideRenderer(layout, renderer.key)
    width, height = layout.size
    rows = [np.asarray(Image.fromarray(renderer.render(0, y, width, min(1024, height - y))).reduce(ds))
            for y in range(0, height - height % ds, 1024)]
    image = np.concatenate(rows)[: height // ds, : width // ds].astype(float)
    regions = renderer.regions(cohort.Grid(0, 0, image.shape[:2], ds))
    return {k: image[regions == k].mean(0) for k in np.unique(regions) if (regions == k).sum() > 30}


def _nucleus_blobs(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei measured on the pixels alone (not the generator's sprite tables): dark blobs
    of the smoothed grey image, holes filled; their areas (px) and centroids (row, col)."""
    grey = ndimage.gaussian_filter(rgb.astype(float).mean(-1), 2.5)
    dark = ndimage.binary_fill_holes(ndimage.binary_opening(grey < 150, iterations=2))
    labels, n = ndimage.label(dark)
    if not n:
        return np.zeros(0), np.zeros((0, 2))
    areas = np.bincount(labels.ravel())[1:]
    centres = np.array(ndimage.center_of_mass(dark, labels, range(1, n + 1)))
    return areas, centres


@pytest.mark.slow
def test_every_smoke_slide_has_mimics_and_all_kinds_occur():
    found = set()
    for index in range(len(cohort.cohort_specs("smoke"))):
        layout, renderer = _renderer("smoke", index)
        width, height = layout.size
        regions = renderer.regions(cohort.Grid(0, 0, (height // 64, width // 64), 64))
        tissue = (regions != cohort.GLASS_R).sum()
        mimic = np.isin(regions, list(lesions.LESION_NAMES)).sum() / tissue
        tumour = (regions == cohort.INVASIVE_R).sum() / tissue
        assert 0.03 < mimic < 0.35 and 0.1 < tumour < 0.5, (index, mimic, tumour)
        found |= set(np.unique(regions).tolist())
    assert set(lesions.LESION_NAMES) <= found


@pytest.mark.parametrize("index", [0, 1])  # grade 1 and 2 smoke slides
@pytest.mark.slow
def test_mimics_match_the_tumour_at_low_resolution(index):
    """At 8 um/px the glandular mimics' mean colour is much closer to the tumour's than
    the stroma's is (seed 0: within 0.75 of the stroma's distance, summed over RGB)."""
    layout, renderer = _renderer("smoke", index)
    means = _low_res_means(renderer, layout)
    tumour = means[cohort.INVASIVE_R]
    stroma_gap = np.abs(means[cohort.STROMA_R] - tumour).sum()
    glandular = [k for k in (lesions.ADENOSIS, lesions.SCLEROSING, lesions.DCIS) if k in means]
    assert glandular
    for kind in glandular:
        assert np.abs(means[kind] - tumour).sum() < 0.75 * stroma_gap, (kind, means[kind], tumour)


@pytest.mark.slow
def test_benign_mimic_nuclei_are_smaller_than_tumour_nuclei_at_high_resolution():
    """At 40x the nuclei of the benign mimics' epithelium are clearly smaller than those of
    the invasive epithelium (the feature a patch classifier can use and a low-resolution
    view cannot): blobs measured on rendered pixels, sorted by the epithelium they sit in."""
    areas = {"tumour": [], "benign": []}
    for index in range(6):
        layout, renderer = _renderer("smoke", index)
        for kind in (cohort.INVASIVE_R, lesions.ADENOSIS, lesions.SCLEROSING):
            corner = _window_of(renderer, layout, kind, 512)
            if corner is None:
                continue
            blob_areas, centres = _nucleus_blobs(renderer.render(*corner, 512, 512))
            st = renderer.structure(cohort.Grid(corner[0], corner[1], (128, 128), 4))
            at = st.kind[(centres[:, 0] // 4).astype(int), (centres[:, 1] // 4).astype(int)]
            areas["tumour"] += blob_areas[np.isin(at, [cohort.GRADE1, cohort.GRADE2, cohort.GRADE3])].tolist()
            areas["benign"] += blob_areas[at == BENIGN].tolist()
    assert len(areas["tumour"]) > 50 and len(areas["benign"]) > 50
    tumour, benign = np.median(areas["tumour"]), np.median(areas["benign"])
    assert tumour > 1.3 * benign, (tumour, benign)  # 776 vs 522 px at seed 0


def test_dcis_keeps_its_myoepithelial_rim_and_invasive_tumour_has_none():
    for index in range(len(cohort.cohort_specs("smoke"))):
        layout, renderer = _renderer("smoke", index)
        corner = _window_of(renderer, layout, lesions.DCIS, 1024)
        if corner is None:
            continue
        x, y = corner
        grid = cohort.Grid(x, y, (256, 256), 4)
        st = renderer.structure(grid)
        kinds, _ = renderer.lesions(grid)
        tumour = renderer.tumour(grid)
        assert (st.kind[kinds == lesions.DCIS] == MYOEPITHELIAL).mean() > 0.02
        assert not (st.kind[tumour] == MYOEPITHELIAL).any()
        return
    pytest.fail("no smoke slide has a DCIS window")


@pytest.mark.parametrize("index", [0, 3])
def test_label_maps_derive_from_one_layout(index):
    layout, renderer = _renderer("tiny", index)
    width, height = layout.size
    grid = cohort.Grid(0, 0, (height // 16, width // 16), 16)
    binary = renderer.tumour(grid)
    labels, bach = renderer.labels(grid), renderer.bach_labels(grid)
    regions = renderer.regions(grid)
    assert np.array_equal(labels == cohort.LABEL_TUMOUR, binary)
    assert np.array_equal(bach == cohort.BACH_INVASIVE, binary)
    assert np.array_equal(bach == cohort.BACH_IN_SITU, regions == lesions.DCIS)
    benign_lesion = np.isin(regions, [lesions.ADENOSIS, lesions.SCLEROSING, lesions.NODULE])
    assert np.array_equal(bach == cohort.BACH_BENIGN, benign_lesion)
    assert (labels[benign_lesion | (regions == lesions.DCIS)] == cohort.LABEL_BENIGN).all()
    assert set(np.unique(bach)) <= {1, 2, 3, 4}


def test_bach_manifest_and_files(tiny_cohort):
    from h2g.io.manifest import load_manifest

    root = Path(tiny_cohort).parent
    manifest = load_manifest(root / cohort.BACH_MANIFEST_NAME)
    assert manifest.classes.names == ("normal", "benign", "in_situ", "invasive")
    for record in manifest:
        import tifffile

        bach = tifffile.imread(record.annotation_path)
        mask = tifffile.imread(root / f"cohort/masks/{record.slide_id}_mask.tiff")
        assert bach.shape == mask.shape
        assert np.array_equal(bach == cohort.BACH_INVASIVE, mask == 255)


def test_standard_preset_is_real_scale_with_realistic_tumour_shares():
    specs = cohort.cohort_specs("standard")
    assert {s.split for s in specs} == {"train", "val", "test"} and {s.grade for s in specs} == {1, 2, 3}
    shares = []
    for spec in specs:
        layout = cohort.slide_layout("standard", spec, 0)
        assert min(layout.size) >= 30_000
        renderer = cohort.SlideRenderer(layout, (0, spec.index))
        width, height = layout.size
        regions = renderer.regions(cohort.Grid(0, 0, (height // 256, width // 256), 256))
        shares.append((regions == cohort.INVASIVE_R).sum() / (regions != cohort.GLASS_R).sum())
    assert 0.005 <= min(shares) and max(shares) <= 0.35, shares
    assert max(shares) - min(shares) > 0.1  # the share varies across slides


def _slide_with(preset: str, attribute: str):
    for index in range(len(cohort.cohort_specs(preset))):
        layout, renderer = _renderer(preset, index)
        if getattr(layout.look, attribute):
            return layout, renderer
    pytest.fail(f"no {preset} slide has {attribute}")


def _pen_point(layout, margin: int = 600) -> tuple[int, int]:
    """A point of the pen stroke at least ``margin`` px inside the slide."""
    cx, cy, radius = layout.look.pen[:3]
    width, height = layout.size
    for angle in np.linspace(0, 2 * np.pi, 73):
        x, y = cx + radius * np.cos(angle), cy + radius * np.sin(angle)
        if margin <= x <= width - margin and margin <= y <= height - margin:
            return int(x), int(y)
    pytest.fail("the pen stroke lies outside the slide")


@pytest.mark.parametrize("attribute", ["blur", "fold", "pen"])
def test_artefacts_render_as_a_pure_function_of_position(attribute):
    layout, renderer = _slide_with("smoke", attribute)
    look = layout.look
    if attribute == "blur":
        cx, cy, _ = look.blur[0]
    elif attribute == "fold":
        cx, cy = look.fold[:2]
    else:
        cx, cy = _pen_point(layout)
    x, y = int(cx) - 200, int(cy) - 150
    whole = renderer.render(x, y, 400, 300)
    pieces = np.concatenate([np.concatenate([renderer.render(x + i, y + j, 200, 150) for i in (0, 200)], 1)
                             for j in (0, 150)], 0)
    assert np.array_equal(whole, pieces)
    plain = renderer.stained(x, y, 400, 300)
    if attribute != "fold":  # blur and pen act on top of the stained section
        assert not np.array_equal(whole, plain)


def test_slides_differ_in_stain_colour_and_the_same_seed_repeats_it():
    luts = [cohort.slide_layout("smoke", s, 0).look.lut() for s in cohort.cohort_specs("smoke")[:4]]
    assert all(not np.array_equal(luts[0], other) for other in luts[1:])
    again = cohort.slide_layout("smoke", cohort.cohort_specs("smoke")[0], 0).look
    assert np.array_equal(again.lut(), luts[0])


def test_pen_ink_is_found_on_glass_and_never_on_rendered_tissue():
    found = None
    for index in range(len(cohort.cohort_specs("smoke"))):
        layout, renderer = _renderer("smoke", index)
        if layout.look.pen is None:
            continue
        cx, cy, radius = layout.look.pen[:3]
        width, height = layout.size
        for angle in np.linspace(0, 2 * np.pi, 73):
            px, py = int(cx + radius * np.cos(angle)), int(cy + radius * np.sin(angle))
            if (600 <= px <= width - 600 and 600 <= py <= height - 600
                    and renderer.regions(cohort.Grid(px - 400, py - 200, (4, 8), 100)).max() == cohort.GLASS_R):
                found = layout, renderer, px, py
                break
        if found:
            break
    assert found, "no smoke slide has its pen stroke on glass"
    layout, renderer, px, py = found
    x, y = px - 400, py - 200  # a window of the stroke on glass
    rgb = renderer.render(x, y, 800, 400)
    alpha = layout.look.pen_alpha(x, y, 800, 400, lambda: np.full((400, 800), 0.0))
    ink = pen_ink(rgb)
    glass = renderer.regions(cohort.Grid(x, y, (400, 800), 1)) == cohort.GLASS_R
    assert ink[(alpha > 0.5) & glass].mean() > 0.95
    tissue_rgb = []
    for index in range(6):
        lay, ren = _renderer("smoke", index)
        corner = _window_of(ren, lay, cohort.INVASIVE_R, 512)
        if corner is not None and lay.look.pen is None:
            tissue_rgb.append(ren.render(*corner, 512, 512))
    assert tissue_rgb and not any(pen_ink(t).any() for t in tissue_rgb)


def test_pen_ink_is_never_found_on_real_h_and_e(real_data):
    patches = sorted((real_data / "camelyon16_patches").rglob("*.png"))
    assert patches
    for path in patches:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        stained = saturation(rgb) > 20
        assert pen_ink(rgb)[stained].mean() < 0.001, path.name


def test_committed_bach_manifest_is_what_the_smoke_preset_writes():
    from h2g.io.classes import sidecar_path

    repo = Path(__file__).resolve().parents[1]
    path = repo / cohort.BACH_MANIFEST_NAME
    assert path.read_text() == cohort.manifest_text("smoke", bach=True)
    assert sidecar_path(path).read_text() == cohort.classes_text(bach=True)
