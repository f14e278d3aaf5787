"""The hierarchical sampler (paper Section 2.3) and its tf.data pipeline.

Frequency tests run on sources built from hand-made patch grids (no slides) and compare
draw counts with probabilities computed by hand from the tree (chi-square); the pipeline
tests read two small lossless synthetic slides and compare with OpenSlide's own pixels
or the known cell colours; build_sources runs on synthetic slides with known tissue and
tumour rectangles.
"""
from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np
import openslide
import pytest
from scipy.stats import binomtest, chisquare

from h2g.core.errors import ConfigError, SamplerError
from h2g.data.dataset import patch_dataset
from h2g.data.sampler import (
    TRAIN_STREAM,
    VALIDATION_STREAM,
    HierarchicalSampler,
    SampleSource,
)

P_MIN = 1e-3  # chi-square tolerance: a correct sampler fails 1 in 1000 seeds


def fake_grid(n_non_tumour: int, n_tumour: int, n_unlabelled: int = 0, offset: int = 0):
    """A patch grid stand-in: ``coords`` / ``labels`` as :class:`h2g.tiling.grid.PatchGrid`
    has them; x = (offset + patch number) * 256 makes every patch of a cohort unique."""
    labels = np.array([0] * n_non_tumour + [1] * n_tumour + [-1] * n_unlabelled, np.int8)
    x = (offset + np.arange(len(labels))) * 256
    return SimpleNamespace(coords=np.stack([x, np.zeros_like(x)], 1).astype(np.int64), labels=labels)


def fake_sources(spec, split="train"):
    """Sources from ``[(slide_id, attributes, n_non_tumour, n_tumour), ...]``."""
    sources, offset = [], 0
    for slide_id, attributes, n0, n1 in spec:
        grid = fake_grid(n0, n1, n_unlabelled=2, offset=offset)
        offset += len(grid.labels)
        sources.append(SampleSource(slide_id, f"/nowhere/{slide_id}.tiff", grid, None,
                                    {"split": split, **attributes}))
    return sources


# Unequal slides per grade (3, 1, 2; grade 2 absent) and patches per class; slide "c" has
# tumour patches only, "e" non-tumour only.
COHORT = [
    ("a", {"grade": 1, "site": "x"}, 3, 2),
    ("b", {"grade": 1, "site": "y"}, 1, 4),
    ("c", {"grade": 1, "site": "x"}, 0, 3),
    ("d", {"grade": 3, "site": "x"}, 2, 1),
    ("e", {"grade": 4, "site": "x"}, 5, 0),
    ("f", {"grade": 4, "site": "x"}, 2, 2),
]


def expected_patch_probabilities(spec, stage="grade"):
    """P(slide, patch) by hand: 1/#groups * 1/#slides in group * 1/#classes of slide *
    1/#patches of that class (``stage=None``: no group stage)."""
    groups = Counter(attrs[stage] if stage else None for _, attrs, _, _ in spec)
    probabilities = {}
    for slide_id, attrs, n0, n1 in spec:
        p_slide = 1 / len(groups) / groups[attrs[stage] if stage else None]
        classes = [n for n in (n0, n1) if n]
        for label, n in enumerate((n0, n1)):
            for k in range(n):
                probabilities[(slide_id, label, k)] = p_slide / len(classes) / n
    return probabilities


def patch_key(draw, sources):
    """(slide_id, label, k-th patch of that class) of a draw."""
    slide_id, x, _, label = draw
    grid = next(s.grid for s in sources if s.slide_id == slide_id)
    position = int(np.flatnonzero(grid.coords[:, 0] == x)[0])
    return slide_id, label, int(np.sum(grid.labels[:position] == label))


def check_frequencies(draws, sources, expected):
    counts = Counter(patch_key(d, sources) for d in draws)
    assert set(counts) <= set(expected), "drew a patch the tree cannot reach (unlabelled?)"
    keys = sorted(expected)
    observed = np.array([counts[k] for k in keys])
    result = chisquare(observed, np.array([expected[k] for k in keys]) * len(draws))
    assert result.pvalue > P_MIN, result


def test_patch_frequencies_follow_the_uniform_tree():
    sources = fake_sources(COHORT)
    draws = HierarchicalSampler(sources, seed=3).draw(40_000, np.random.default_rng(11))
    check_frequencies(draws, sources, expected_patch_probabilities(COHORT))
    # stage by stage: grades 1, 3, 4 a third each; grade 2 has no slides and is never drawn
    grade_of = {slide_id: attrs["grade"] for slide_id, attrs, _, _ in COHORT}
    grades = Counter(grade_of[d[0]] for d in draws)
    assert set(grades) == {1, 3, 4}
    assert chisquare([grades[g] for g in (1, 3, 4)]).pvalue > P_MIN
    # a slide with patches of one class only is only ever asked for that class
    assert {d[3] for d in draws if d[0] == "c"} == {1}
    assert {d[3] for d in draws if d[0] == "e"} == {0}


def test_batches_follow_the_tree_too():
    sources = fake_sources(COHORT)
    sampler = HierarchicalSampler(sources, seed=5)
    draws = [d for b in range(500) for d in sampler.draw_batch(b, 64)]
    check_frequencies(draws, sources, expected_patch_probabilities(COHORT))


def test_grade_without_slides_is_not_drawn():
    spec = [("a", {"grade": 1}, 2, 2), ("b", {"grade": 1}, 2, 2), ("c", {"grade": 3}, 2, 2)]
    draws = HierarchicalSampler(fake_sources(spec)).draw(4000, np.random.default_rng(0))
    n_grade_3 = sum(d[0] == "c" for d in draws)
    assert binomtest(n_grade_3, len(draws), 0.5).pvalue > P_MIN  # 1/2, not 1/3


def test_stages_are_configurable():
    sources = fake_sources(COHORT)
    rng = np.random.default_rng(2)
    # no grade stage: slides uniform
    draws = HierarchicalSampler(sources, stages=("slide", "class", "patch")).draw(30_000, rng)
    check_frequencies(draws, sources, expected_patch_probabilities(COHORT, stage=None))
    # balance on another attribute
    draws = HierarchicalSampler(sources, stages=("site", "slide", "class", "patch")).draw(30_000, rng)
    check_frequencies(draws, sources, expected_patch_probabilities(COHORT, stage="site"))
    # no class stage: a patch uniformly among the slide's labelled patches
    draws = HierarchicalSampler(sources, stages=("slide", "patch")).draw(30_000, rng)
    expected = {}
    for slide_id, _, n0, n1 in COHORT:
        for label, n in enumerate((n0, n1)):
            expected.update({(slide_id, label, k): 1 / len(COHORT) / (n0 + n1) for k in range(n)})
    check_frequencies(draws, sources, expected)


def test_same_seed_same_batches_other_batches_differ():
    sampler = HierarchicalSampler(fake_sources(COHORT), seed=7)
    again = HierarchicalSampler(fake_sources(COHORT), seed=7)
    assert sampler.draw_batch(4, 32) == again.draw_batch(4, 32)
    assert sampler.draw_batch(4, 32) != sampler.draw_batch(5, 32)
    assert sampler.draw_batch(4, 32) != sampler.draw_batch(4, 32, stream=VALIDATION_STREAM)
    assert sampler.draw_batch(4, 32) != HierarchicalSampler(fake_sources(COHORT), seed=8).draw_batch(4, 32)
    arrays = sampler.batch_arrays(4, 32, TRAIN_STREAM)
    as_tuples = [(sampler.sources[s].slide_id, int(x), int(y), int(label))
                 for s, (x, y), label in zip(arrays.slide_index, arrays.coords, arrays.labels)]
    assert as_tuples == sampler.draw_batch(4, 32)
    assert len(set(arrays.seeds.tolist())) > 1


def test_binary_draws_are_those_of_the_binary_only_sampler():
    """Recorded from the sampler before it learnt N classes (same seeds, same cohort):
    the default binary draws must not change by a single number."""
    sampler = HierarchicalSampler(fake_sources(COHORT), seed=7)
    assert sampler.n_classes == 2 and sampler.class_names == ("non-tumour", "tumour")
    assert sampler.draw_batch(3, 10) == [
        ("d", 4864, 0, 0), ("f", 8192, 0, 0), ("d", 5376, 0, 1), ("f", 8192, 0, 0), ("d", 4864, 0, 0),
        ("f", 8192, 0, 0), ("d", 5120, 0, 0), ("c", 3584, 0, 1), ("c", 3840, 0, 1), ("a", 256, 0, 0)]
    assert sampler.batch_arrays(3, 10).seeds.tolist() == [
        1439886236, 1646124753, 2100706512, 1418880584, 711664530, 104005979, 1214145979,
        1266804489, 1938835317, 1961754670]
    assert sampler.draw(8, np.random.default_rng(123)) == [
        ("b", 1792, 0, 0), ("e", 6656, 0, 0), ("d", 5376, 0, 1), ("b", 2304, 0, 1), ("f", 8448, 0, 1),
        ("b", 2048, 0, 1), ("c", 4096, 0, 1), ("b", 1792, 0, 0)]
    flat = HierarchicalSampler(fake_sources(COHORT), stages=("slide", "patch"), seed=7)
    assert flat.draw_batch(0, 8) == [
        ("f", 7936, 0, 0), ("d", 4864, 0, 0), ("e", 6400, 0, 0), ("f", 8704, 0, 1), ("d", 5376, 0, 1),
        ("e", 6144, 0, 0), ("f", 8192, 0, 0), ("b", 2816, 0, 1)]
    by_site = HierarchicalSampler(fake_sources(COHORT), stages=("site", "slide", "class", "patch"), seed=2)
    assert by_site.draw_batch(1, 8, stream=1) == [
        ("a", 1024, 0, 1), ("c", 3840, 0, 1), ("c", 3840, 0, 1), ("d", 5376, 0, 1), ("b", 1792, 0, 0),
        ("b", 2048, 0, 1), ("e", 6400, 0, 0), ("b", 2816, 0, 1)]


# -- N classes ----------------------------------------------------------------------------

def three_classes():
    from h2g.io.classes import ClassTable

    return ClassTable.of([("normal", 0), ("tumour", 1), ("other", 2)])


def multi_sources(spec):
    """Sources from ``[(slide_id, {label: n_patches})]`` (labels 0..2, plus 2 unlabelled)."""
    sources, offset = [], 0
    for slide_id, per_class in spec:
        labels = np.array([c for c, n in sorted(per_class.items()) for _ in range(n)] + [-1, -1], np.int8)
        x = (offset + np.arange(len(labels))) * 256
        offset += len(labels)
        grid = SimpleNamespace(coords=np.stack([x, np.zeros_like(x)], 1).astype(np.int64), labels=labels)
        sources.append(SampleSource(slide_id, f"/nowhere/{slide_id}.tiff", grid, None, {"split": "train"}))
    return sources


MULTI = [("p", {0: 3, 1: 2, 2: 1}), ("q", {1: 4}), ("r", {0: 2, 2: 5})]


def expected_multi(spec, weights):
    """P(slide, label, k) by hand: 1/#slides * w_label / (sum of w over the slide's classes)
    * 1/#patches of that class."""
    out = {}
    for slide_id, per_class in spec:
        total = sum(weights[c] for c in per_class)
        for c, n in per_class.items():
            for k in range(n):
                out[(slide_id, c, k)] = 1 / len(spec) * weights[c] / total / n
    return out


@pytest.mark.parametrize("weights, by_index", [
    (None, (1, 1, 1)),
    ({"tumour": 2, "normal": 1, "other": 1}, (1, 2, 1)),  # m-UNet's 2:1:1
    ((0.5, 3.0, 0.0), (0.5, 3.0, 0.0)),  # "other" never drawn
])
def test_class_stage_with_n_classes_and_weights(weights, by_index):
    sources = multi_sources(MULTI)
    sampler = HierarchicalSampler(sources, stages=("slide", "class", "patch"), seed=4,
                                  classes=three_classes(), class_weights=weights)
    assert sampler.n_classes == 3 and sampler.class_names == ("normal", "tumour", "other")
    draws = [d for b in range(400) for d in sampler.draw_batch(b, 64)]
    expected = {k: v for k, v in expected_multi(MULTI, by_index).items() if v > 0}
    check_frequencies(draws, sources, expected)


def test_class_table_mismatches_are_errors():
    with pytest.raises(SamplerError, match="labels beyond the 2 classes"):
        HierarchicalSampler(multi_sources(MULTI), stages=("slide", "class", "patch"))
    with pytest.raises(ConfigError, match="unknown: cancer"):
        HierarchicalSampler(multi_sources(MULTI), stages=("slide", "class", "patch"), classes=three_classes(),
                            class_weights={"cancer": 1, "normal": 1, "other": 1, "tumour": 1})
    with pytest.raises(ConfigError, match="need the sampler's 'class' stage"):
        HierarchicalSampler(multi_sources(MULTI), stages=("slide", "patch"), classes=three_classes(),
                            class_weights=(1, 1, 1))
    with pytest.raises(SamplerError, match="q have patches only of classes of weight 0"):
        HierarchicalSampler(multi_sources(MULTI), stages=("slide", "class", "patch"), classes=three_classes(),
                            class_weights=(1, 0, 1))
    with pytest.raises(SamplerError, match="no slide has other patches"):
        HierarchicalSampler(multi_sources([("q", {1: 4}), ("s", {0: 1})]), stages=("slide", "class", "patch"),
                            classes=three_classes())


def test_no_sources_is_an_error():
    with pytest.raises(SamplerError, match="no slides"):
        HierarchicalSampler([])


def test_split_with_a_missing_class_is_an_error():
    spec = [("a", {"grade": 1}, 4, 0), ("b", {"grade": 2}, 3, 0)]
    with pytest.raises(SamplerError, match=r"split val: no slide has tumour patches"):
        HierarchicalSampler(fake_sources(spec, split="val"))


def test_unknown_stage_and_bad_stages_are_errors():
    with pytest.raises(SamplerError, match="unknown sampler stage 'scanner'.*known: grade, site, split"):
        HierarchicalSampler(fake_sources(COHORT), stages=("scanner", "slide", "class", "patch"))
    with pytest.raises(SamplerError, match="must be attribute names followed by"):
        HierarchicalSampler(fake_sources(COHORT), stages=("grade", "class", "patch"))


def test_source_without_labelled_patches_is_an_error():
    sources = fake_sources(COHORT) + fake_sources([("z", {"grade": 1}, 0, 0)])
    with pytest.raises(SamplerError, match="z have no labelled patches"):
        HierarchicalSampler(sources)


# -- the tf.data pipeline on synthetic slides -------------------------------------------

def alternating_labels(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int8) % 2  # 0, 1, 0, 1, ...


@pytest.fixture(scope="module")
def slide_sources(tmp_path_factory):
    """Two lossless slides read at 10x: a 40x noise slide (level 1 is 10x exactly) and a
    20x checker slide (10x is level 0 halved) whose 512 px cells are 256 px patches."""
    from synthetic import make_slide

    folder = tmp_path_factory.mktemp("sampling")
    noise = make_slide(folder / "noise.tiff", (2048, 1536), mpp=0.25, pattern="noise",
                       downsamples=(1, 4), compression="zlib", seed=1)
    checker = make_slide(folder / "checker.tiff", (2048, 1536), mpp=0.5, pattern="checker",
                         cell=512, downsamples=(1, 4), compression="zlib")
    noise_coords = np.array([[x, y] for y in (0, 500, 1012) for x in (0, 384, 1020)], np.int64)
    checker_coords = np.array([[x, y] for y in range(0, 1536, 512) for x in range(0, 2048, 512)], np.int64)
    return [
        SampleSource("noise", noise, SimpleNamespace(coords=noise_coords, labels=alternating_labels(9)),
                     None, {"grade": 1, "split": "train"}),
        SampleSource("checker", checker, SimpleNamespace(coords=checker_coords, labels=alternating_labels(12)),
                     None, {"grade": 2, "split": "train"}),
    ]


def expected_patch(source, x, y):
    """The 10x patch computed without h2g.io.slide: OpenSlide's level 1 for the 40x slide
    (white beyond the slide's edge), the cell's flat colour for the checker."""
    from synthetic import cell_colour

    if source.slide_id == "noise":
        with openslide.OpenSlide(str(source.slide_path)) as osr:
            rgba = np.asarray(osr.read_region((x, y), 1, (256, 256)))
        assert set(np.unique(rgba[..., 3])) <= {0, 255}
        return np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)  # beyond the edge: glass
    return np.broadcast_to(np.array(cell_colour(y // 512, x // 512), np.uint8), (256, 256, 3))


def as_arrays(dataset):
    batches = [(images.numpy(), labels.numpy()) for images, labels in dataset]
    return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])


def test_pipeline_reads_the_drawn_patches(slide_sources):
    sampler = HierarchicalSampler(slide_sources, seed=1)
    images, labels = as_arrays(patch_dataset(sampler, batch_size=6, n_batches=3, readers=2))
    assert images.shape == (3, 6, 256, 256, 3) and images.dtype == np.float32
    assert labels.shape == (3, 6, 2) and labels.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    by_id = {s.slide_id: s for s in slide_sources}
    for b in range(3):
        for i, (slide_id, x, y, label) in enumerate(sampler.draw_batch(b, 6)):
            pixels = np.rint(images[b, i] * 255).astype(np.uint8)
            np.testing.assert_array_equal(pixels, expected_patch(by_id[slide_id], x, y))
            np.testing.assert_array_equal(labels[b, i], np.eye(2)[label])


def test_same_batches_whatever_the_readers(slide_sources):
    from h2g.data.augment import classifier_augmenter

    augment = classifier_augmenter()
    sampler = HierarchicalSampler(slide_sources, seed=2)
    one = as_arrays(patch_dataset(sampler, batch_size=8, n_batches=3, readers=1, augment=augment))
    four = as_arrays(patch_dataset(sampler, batch_size=8, n_batches=3, readers=4, augment=augment))
    np.testing.assert_array_equal(one[0], four[0])
    np.testing.assert_array_equal(one[1], four[1])
    plain = as_arrays(patch_dataset(sampler, batch_size=8, n_batches=3, readers=4))
    assert not np.array_equal(one[0], plain[0]), "augmentation changed nothing"
    assert not np.array_equal(one[0][0], one[0][1]), "consecutive batches are identical"


def test_resume_and_validation_batches(slide_sources):
    sampler = HierarchicalSampler(slide_sources, seed=3)
    stream = patch_dataset(sampler, batch_size=4, readers=2)  # infinite training stream
    first = [images.numpy() for images, _ in stream.take(3)]
    resumed = next(iter(patch_dataset(sampler, batch_size=4, start_batch=2, readers=2)))[0].numpy()
    np.testing.assert_array_equal(resumed, first[2])

    validation = patch_dataset(sampler, batch_size=4, training=False, n_batches=2, readers=2)
    epoch_1, epoch_2 = as_arrays(validation), as_arrays(validation)
    np.testing.assert_array_equal(epoch_1[0], epoch_2[0])
    assert not np.array_equal(epoch_1[0][0], first[0]), "validation repeats the training batches"
    with pytest.raises(ConfigError, match="validation dataset needs n_batches"):
        patch_dataset(sampler, batch_size=4, training=False)


def test_unreadable_slide_fails_loudly_naming_it(tmp_path):
    import tensorflow as tf

    missing = tmp_path / "gone.tiff"
    source = SampleSource("gone", missing, fake_grid(2, 2), None, {"grade": 1, "split": "train"})
    dataset = patch_dataset(HierarchicalSampler([source]), batch_size=2, n_batches=1, readers=2)
    with pytest.raises(tf.errors.OpError, match=rf"{missing}: file not found"):
        next(iter(dataset))


# -- sources from manifest records ------------------------------------------------------

def test_build_sources_leaves_out_unusable_slides_once(tmp_path, caplog):
    from synthetic import make_mask, make_slide

    from h2g.data.sampler import build_sources
    from h2g.io.manifest import SlideRecord

    size = (4096, 3072)  # 40x: 4 x 3 patches of 256 px at 10x, 1024 level-0 px a side
    tissue = (0, 0, 4096, 2048)  # the top two patch rows
    tumour_mask = make_mask(tmp_path / "good_mask.png", size, [(1024, 0, 1024, 1024)])
    records = [
        SlideRecord("good", make_slide(tmp_path / "good.tiff", size, tissue=tissue), tumour_mask, 2, "train"),
        SlideRecord("blank", make_slide(tmp_path / "blank.tiff", size, tissue=(0, 0, 0, 0)),
                    make_mask(tmp_path / "blank_mask.png", size, []), 1, "train"),
        SlideRecord("unannotated", make_slide(tmp_path / "unannotated.tiff", size, tissue=tissue),
                    None, 3, "train"),
    ]
    with caplog.at_level(logging.WARNING, logger="h2g.data.sampler"):
        sources = build_sources(records, progress=False)
    assert [s.slide_id for s in sources] == ["good"]
    reports = [r.getMessage() for r in caplog.records if r.name == "h2g.data.sampler"]
    assert len(reports) == 1
    assert "blank (no tissue patches)" in reports[0] and "unannotated (no annotation)" in reports[0]

    good = sources[0]
    assert good.attributes == {"grade": 2, "split": "train"} and good.mpp is None
    assert good.slide_path == records[0].slide_path
    tumour = {tuple(c) for c in good.grid.coords[good.grid.labels == 1]}
    non_tumour = {tuple(c) for c in good.grid.coords[good.grid.labels == 0]}
    assert tumour == {(1024, 0)}
    assert non_tumour == {(x, y) for x in range(0, 4096, 1024) for y in (0, 1024)} - tumour
    draws = HierarchicalSampler(sources).draw(200, np.random.default_rng(0))
    assert {(x, y) for _, x, y, label in draws if label == 1} == tumour
