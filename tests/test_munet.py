"""m-UNet: merge geometry, loss against numpy, pseudo-labels, IHC rendering, the
multi-stain manifest, and the system end to end on the tiny cohort (tiny encoders)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from conftest import REPO, tiny_config
from helpers import run_script

IGNORE = 255
TINY = "w0.25d0.1"


def munet_config(seed: int = 0):
    c = tiny_config(seed)
    return c.replace(munet=dataclasses.replace(
        c.munet, size=64, magnifications=(10.0, 5.0), base_encoder=TINY, master_encoder=TINY, decoder_width=0.125,
        merge_filters=(16, 8), final_filters=8, batch_size=4, train_batches=3, val_batches=1, base_epochs=1,
        thresholds=(0.34,), learning_rates=(1e-3,), epochs=(1,), dynamic_weights=(True,),
        augment=("basic+heavy+noise+hsv+jitter",), stride=64, inference_batch=32, auc_pixels=5000))


# ---------------------------------------------------------------------- merge geometry
def _crop_resize(array: np.ndarray, ratio: int, interpolation: str) -> np.ndarray:
    import keras

    from h2g.models.munet import centre_crop_resize

    inp = keras.Input(array.shape)
    model = keras.Model(inp, centre_crop_resize(inp, ratio, "t", interpolation=interpolation))
    return np.asarray(model(array[None].astype("float32")))[0]


def test_a_feature_at_the_low_resolution_centre_lands_on_the_right_high_resolution_pixels():
    """A 32 px low-resolution map, ratio 4: the high view's field is low pixels 12..19
    (its centre 8 px), so low pixel (row 15, col 16) covers high pixels rows 12..15,
    cols 16..19 of the 32 px high map (nearest), and its bilinear footprint is centred
    on high pixel (13.5, 17.5).  A crop or resize off by one pixel moves both."""
    low = np.zeros((32, 32, 1))
    low[15, 16] = 1.0
    nearest = _crop_resize(low, 4, "nearest")[..., 0]
    expected = np.zeros((32, 32))
    expected[12:16, 16:20] = 1.0
    np.testing.assert_array_equal(nearest, expected)

    bilinear = _crop_resize(low, 4, "bilinear")[..., 0]
    rows, cols = np.mgrid[0:32, 0:32]
    total = bilinear.sum()
    assert total == pytest.approx(16.0, rel=1e-5)
    assert (rows * bilinear).sum() / total == pytest.approx(13.5, abs=1e-4)
    assert (cols * bilinear).sum() / total == pytest.approx(17.5, abs=1e-4)


def test_the_views_the_merge_assumes_are_co_centred(tiny_cohort):
    """The centre 1/ratio of the low view is the high view's field: the low view's centre
    crop matches the high view shrunk by the ratio far better than the crop moved by one
    low-resolution pixel does."""
    from PIL import Image

    from h2g.data.views import View, read_views
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import open_slide

    record = load_manifest(tiny_cohort).records[0]
    slide = open_slide(record.slide_path)
    hi, lo = View("x_hi", 10.0, 128), View("x_lo", 2.5, 128)
    w, h = slide.dimensions
    views = read_views(slide, (w / 2, h / 2), (hi, lo))
    shrunk = np.asarray(Image.fromarray(views["x_hi"]).resize((32, 32), Image.BOX), np.float64)
    low = views["x_lo"].astype(np.float64)

    def error(dy, dx):
        return np.abs(low[48 + dy:80 + dy, 48 + dx:80 + dx] - shrunk).mean()

    assert error(0, 0) < 0.6 * min(error(1, 0), error(0, 1), error(-1, 0), error(0, -1))


# ---------------------------------------------------------------------- loss vs numpy
def _numpy_weights(labels, n):
    lab = labels[labels != IGNORE]
    counts = np.bincount(lab, minlength=n)[:n].astype(np.float64)
    w = 1 - counts / max(counts.sum(), 1)
    return w / w.sum()


def _numpy_loss(labels, probs, weights, smooth=1.0, eps=1e-7):
    n = probs.shape[-1]
    mask = labels != IGNORE
    lab = labels[mask]
    p = probs[mask]
    w = np.asarray(weights, np.float64) / np.sum(weights)
    wce = np.sum(w[lab] * -np.log(np.clip(p[np.arange(len(lab)), lab], eps, 1 - eps))) / max(len(lab), 1)
    onehot = np.eye(n)[lab]
    dice = (2 * (onehot * p).sum(0) + smooth) / (onehot.sum(0) + p.sum(0) + smooth)
    return wce + 1 - np.sum(w * dice)


def _batch(seed=0, n=3):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 0, 0, 1, 2, IGNORE], size=(2, 8, 8)).astype(np.int32)
    logits = rng.normal(size=(2, 8, 8, n))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return labels, probs.astype(np.float32)


def test_dynamic_weights_are_one_minus_the_batch_share_normalised():
    from h2g.training.losses import dynamic_class_weights

    labels, _ = _batch()
    got = np.asarray(dynamic_class_weights(labels, 3))
    np.testing.assert_allclose(got, _numpy_weights(labels, 3), rtol=1e-6)
    # by hand: counts 3:1:1 of labelled pixels -> 1 - (.6, .2, .2) = (.4, .8, .8) -> / 2
    by_hand = np.array([[0, 0, 0, 1, 2, IGNORE]], np.int32)
    np.testing.assert_allclose(np.asarray(dynamic_class_weights(by_hand, 3)), [0.2, 0.4, 0.4], rtol=1e-6)


@pytest.mark.parametrize("static", [None, [0.2, 0.9, 0.6]])
def test_weighted_ce_dice_matches_numpy(static):
    from h2g.training.losses import WeightedCEDice

    labels, probs = _batch(1)
    weights = _numpy_weights(labels, 3) if static is None else static
    got = float(WeightedCEDice(static)(labels, probs))
    assert got == pytest.approx(_numpy_loss(labels, probs, weights), rel=1e-5)
    assert float(WeightedCEDice(static, scale=0.5)(labels, probs)) == pytest.approx(got / 2, rel=1e-6)


def test_pseudo_labels_below_the_threshold_are_ignored_by_the_loss():
    """Pixels whose top probability is below the threshold become 255; changing the
    prediction there changes neither the loss nor its gradient elsewhere, and they get
    no gradient."""
    import tensorflow as tf

    from h2g.systems.munet.pipeline import pseudo_labels
    from h2g.training.losses import WeightedCEDice

    _, teacher = _batch(2)
    covered = np.ones(teacher.shape[1:3], bool)
    covered[0, 0] = False
    labels = np.stack([pseudo_labels((t, covered), 0.6) for t in teacher])
    low = (teacher.max(-1) < 0.6) | ~covered[None]
    assert low.any() and (~low).any()
    assert (labels[low] == IGNORE).all() and (labels[~low] == teacher.argmax(-1)[~low]).all()

    _, student = _batch(3)
    other = student.copy()
    other[low] = student[low][:, ::-1]  # another prediction where the pseudo-label is ignored
    for dynamic in (None, [0.3, 0.3, 0.4]):
        loss = WeightedCEDice(dynamic)
        assert float(loss(labels, student)) == pytest.approx(float(loss(labels, other)), rel=1e-6)
        x = tf.Variable(student)
        with tf.GradientTape() as tape:
            value = loss(labels, x)
        grad = tape.gradient(value, x).numpy()
        assert np.abs(grad[low]).max() == 0.0 and np.abs(grad[~low]).max() > 0


def test_imagenet_weights_that_are_not_cached_are_a_clear_error(tmp_path, monkeypatch):
    from h2g.core.errors import ConfigError
    from h2g.models.munet import build_unet_effnet

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="not cached"):
        build_unet_effnet(3, 64, "b0", weights="imagenet")
    with pytest.raises(ConfigError, match="unknown EfficientNet encoder"):
        build_unet_effnet(3, 64, "b9")


# ---------------------------------------------------------------------- multi-stain rendering
def _spec(stain):
    from h2g.data import multistain as ms

    return dataclasses.replace(ms.stain_specs("tiny")[0], stain=stain)  # slide t01 (grade 1, tumour)


@pytest.mark.parametrize("stain", ["er", "her2"])
def test_ihc_has_dab_in_tumour_only_in_the_positive_fraction(stain):
    """DAB only within a nucleus canvas of the tumour annotation; inside it, the nuclear
    stain colours about the slide's positive fraction of tumour nuclei; HER2 puts DAB
    on rings (around nuclei, not on them)."""
    from h2g.data import cohort
    from h2g.data import multistain as ms

    spec = _spec(stain)
    r = ms.renderer_for("tiny", spec, 0)
    w, h = r.layout.size
    x, y, size = w // 2 - 768, h // 2 - 768, 1536
    mask = r.render_mask(x // 4, y // 4, size // 4, size // 4) > 0
    assert mask.any() and (~mask).any(), "the test region must hold tumour and non-tumour"
    haem, dab = r.stain_amounts(x, y, size, size)
    from scipy import ndimage

    near = ndimage.binary_dilation(mask, iterations=cohort.CANVAS // 8).repeat(4, 0).repeat(4, 1)
    assert dab[~near].max() == 0, "DAB outside the tumour"
    assert (dab[near] > 0).mean() > 0.005, "no DAB in the tumour"
    nuclei = r._nuclei(x, y, size, size) > 40
    if stain == "her2":
        assert (dab[nuclei] > 0).mean() < 0.05 < (dab[~nuclei & near] > 0).mean() * 10
    else:  # count nuclei on the grid: positive tumour nuclei / tumour nuclei ~ positive fraction
        points = cohort.Grid(x, y, (size // cohort.CELL, size // cohort.CELL), cohort.CELL)
        st = r.structure(points)
        all_idx = r._sprite_index(st, x // cohort.CELL, y // cohort.CELL)
        r._positive_only = True
        pos_idx = r._sprite_index(st, x // cohort.CELL, y // cohort.CELL)
        r._positive_only = False
        lo, hi = r.tumour_sprites
        tumour_nuclei = ((all_idx >= lo) & (all_idx < hi)).sum()
        assert tumour_nuclei > 30
        assert (pos_idx > 0).sum() / tumour_nuclei == pytest.approx(r.positive, abs=0.12)
    rgb = r.render(x, y, size, size).astype(int)
    brown = dab > 100
    assert (rgb[brown][:, 0] - rgb[brown][:, 2]).mean() > 20, "DAB pixels are not brown"


def test_multistain_manifest_is_committed_and_classes_club_the_label_values():
    from h2g.data import multistain as ms
    from h2g.io.manifest import load_manifest

    path = REPO / ms.MULTISTAIN_MANIFEST_NAME
    assert path.read_text() == ms.manifest_text("smoke")
    assert (REPO / "data_manifest_multistain.classes.csv").read_text() == ms.classes_text()
    manifest = load_manifest(path, check_files=False)
    assert manifest.classes.names == ("normal", "tumour", "other")
    assert manifest.classes.value_map()[3] == 0 and manifest.classes.value_map()[2] == 2
    stains = {r.attributes["stain"] for r in manifest.split("train")}
    assert stains == {"er", "pr", "ki67", "her2"}
    test = manifest.split("test")
    assert {r.attributes["stain"] for r in test} >= {"he"} and len({r.attributes["scanner"] for r in test}) > 1


@pytest.mark.slow
def test_same_seed_same_ihc_bytes(tmp_path):
    from h2g.data import multistain as ms

    spec = _spec("ki67")
    digests = []
    for run in ("a", "b"):
        ms.write_stain_slide(tmp_path / run, "tiny", dataclasses.replace(spec, scanner="scanner_c"), 0)
        digests.append(hashlib.sha256((tmp_path / run / spec.slide_path).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def multistain_manifest(tiny_cohort):
    from h2g.data.multistain import make_multistain

    return make_multistain(tiny_cohort.parent, "tiny", 0, progress=False)


@pytest.fixture(scope="module")
def munet_run(multistain_manifest, tmp_path_factory):
    from h2g.systems.registry import resolve, run

    out = tmp_path_factory.mktemp("munet_runs")
    return out, run(resolve(system="munet"), multistain_manifest, out, munet_config())


@pytest.mark.slow
def test_both_designs_run_through_the_registry(munet_run):
    out, results = munet_run
    assert list(results) == ["unet_b0", "munet_b4"]
    for name, m in results.items():
        assert m["system"] == "munet" and m["n_test_slides"] == 4
        assert sorted(m["classes"]) == ["normal", "other", "tumour"]
        for key in ("recall_mean", "precision_mean", "dice_mean"):  # rows join Table 1
            assert 0.0 <= m[key] <= 1.0
        assert {"stain=he", "stain=er", "stain=pr"} <= set(m["groups"])
        assert 0.0 <= m["classes"]["tumour"]["auc"] <= 1.0
        assert len(m["classes"]["tumour"]["thresholds"]["precision"]) == 9
        assert (out / name / "iou_by_stain_scanner.png").is_file()
    assert [r["round"] for r in results["munet_b4"]["rounds"]] == [0, 1]
    assert results["munet_b4"]["rounds"][0]["mean_iou"] == pytest.approx(results["unet_b0"]["mean_iou"])
    meta = json.loads((out / "munet_b4" / "models" / "segmenter.meta.json").read_text())
    assert [v["name"] for v in meta["views"]] == ["x_hi", "x_lo"]
    assert [v["magnification"] for v in meta["views"]] == [10.0, 5.0]


@pytest.mark.slow
def test_the_master_trains_with_a_loss_per_output(munet_run):
    """The session run's round-1 master (tiny encoders, 64 px) logged a finite loss for
    each of its three outputs every epoch, and training moved its weights away from the
    seeded initialisation (rebuilt here as the round builds it: seed + 1)."""
    import csv

    import keras

    from h2g import models

    out, _ = munet_run
    (stage,) = [d for d in (out / "_cache").glob("munet_round1-*") if (d / "done.json").is_file()]
    rows = list(csv.DictReader((stage / "log.csv").open()))
    assert rows
    for name in ("segmentation", "high", "low"):
        values = [float(r[f"{name}_loss"]) for r in rows]
        assert all(np.isfinite(v) and v > 0 for v in values), (name, values)
    c = munet_config().munet
    keras.utils.set_random_seed(0 + 1)
    model = models.build("munet", n_classes=3, input_size=c.size, encoder=c.master_encoder, weights=c.weights,
                         decoder_width=c.decoder_width, ratio=2, merge_filters=tuple(c.merge_filters),
                         final_filters=c.final_filters)
    assert [o.shape[1:] for o in model.outputs] == [(64, 64, 3)] * 3
    initial = model.get_weights()
    model.load_weights(stage / "full.weights.h5")
    moved = sum(not np.array_equal(a, b) for a, b in zip(initial, model.get_weights()))
    assert moved > len(initial) // 2, (moved, len(initial))


@pytest.mark.slow
def test_munet_exports_with_parity_and_deploys_like_the_pipeline(munet_run, multistain_manifest, tmp_path):
    from PIL import Image

    from h2g.export.conversion import convert_model
    from h2g.io.slide import Slide
    from h2g.systems.munet.pipeline import Pipeline

    out, _ = munet_run
    model = out / "munet_b4" / "models" / "segmenter.keras"
    pipe = Pipeline(multistain_manifest, out, munet_config())
    record = pipe.records("test")[0]
    with Slide(record.slide_path) as slide:
        entry = convert_model(model, tmp_path / "exported", slide)
    parity = entry["parity"]
    assert parity["passed"] and not parity["constant_output"], parity
    assert parity["onnxruntime"]["max_abs_diff"] <= 1e-4 and parity["openvino_f32"]["max_abs_diff"] <= 1e-4
    assert set(entry["inputs"]) == {"x_hi", "x_lo"}
    done = run_script("segment_slide.py", entry["onnx"], "--slide", record.slide_path, "--out", tmp_path / "seg",
                      "--engine", "onnxruntime", "--quiet", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    deployed = np.asarray(Image.open(tmp_path / "seg" / "labels.png")).astype(np.int64) - 1
    reference = pipe.segment(model, record, both=True).label_map(fill=-1)
    assert deployed.shape == reference.shape and np.mean(deployed == reference) > 0.99


def test_targeted_hsv_changes_stained_pixels_only():
    """Brown (DAB) and blue (haematoxylin) pixels move in saturation / value within the
    Table 6 ranges; unstained pink, white and grey pixels are untouched."""
    import cv2

    from h2g.data.augment import targeted_hsv

    colours = {"brown": (150, 90, 40), "blue": (70, 60, 170), "pink": (235, 160, 200), "white": (245, 245, 247),
               "grey": (128, 128, 128)}
    image = np.concatenate([np.full((4, 8, 3), c, np.uint8) for c in colours.values()])
    before = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(int)
    changed = set()
    for seed in range(5):
        out = targeted_hsv([image], np.random.default_rng(seed))[0]
        after = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(int)
        for i, name in enumerate(colours):
            rows = slice(4 * i, 4 * i + 4)
            if not np.array_equal(out[rows], image[rows]):
                changed.add(name)
            ds = after[rows, :, 1] - before[rows, :, 1]
            assert ds.min() >= -40 - 2 and ds.max() <= 81 + 2
    assert changed == {"brown", "blue"}


@pytest.mark.slow
def test_two_target_views_read_the_label_map_of_each(multistain_manifest):
    """sample_dataset's several target views: each is the label map one target view alone gives."""
    from h2g.data.dataset import read_samples
    from h2g.systems.munet.pipeline import Pipeline

    pipe = Pipeline(multistain_manifest, multistain_manifest.parent / "unused", munet_config())
    records = pipe._annotated("train")
    sampler = pipe.munet_sampler("train", records, True)
    annotations = {r.slide_id: pipe.annotation(r) for r in records}
    views = pipe.views(True)
    _, both = read_samples(sampler, 0, 4, views, target="pixels", target_view=("x_hi", "x_lo"),
                           annotations=annotations)
    for name in ("x_hi", "x_lo"):
        _, one = read_samples(sampler, 0, 4, views, target="pixels", target_view=name, annotations=annotations)
        np.testing.assert_array_equal(both[name], one)
    assert not np.array_equal(both["x_hi"], both["x_lo"])
