"""RAZN's networks and zoom geometry: ResNet18 facts, the policy's cost, the split /
stitch / enlarge geometry (Keras and numpy twins, and on a slide), ONNX / OpenVINO parity."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from h2g.inference import zoom
from h2g.models import razn


def test_resnet18_fcn_has_resnet18_weights_and_output_stride_8():
    model = razn.build_resnet18_fcn(5, 256, 1.0)
    # torchvision's ResNet18 has 11,689,512 parameters, 513,000 of them in its 1000-class
    # fc: the backbone 11,176,512 (dilation changes no weight); plus a 1x1 classifier to 5
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == 11_176_512 + 512 * 5 + 5
    assert model.output.shape == (None, 256, 256, 5)
    convs = {layer.name: layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)}
    assert len([n for n in convs if not n.endswith("proj_conv")]) == 17 + 1  # ResNet18's 17 convs + classifier
    assert convs["conv1_conv"].strides == (2, 2) and convs["conv1_conv"].kernel_size == (7, 7)
    for first in ("conv3_1_1_conv", "conv4_1_1_conv"):  # no downsampling in conv3_1 / conv4_1: dilated
        assert convs[first].strides == (1, 1) and convs[first].dilation_rate[0] > 1
    assert convs["conv3_1_2_conv"].dilation_rate == (2, 2) and convs["conv4_2_2_conv"].dilation_rate == (4, 4)
    assert convs["conv5_1_1_conv"].strides == (2, 2)
    assert model.get_layer("classifier").output.shape[1] == 256 // 8  # stem /4, conv5_1 /2


def test_policy_cost_by_hand_and_relative_cost_reported(capsys):
    hand = (2 * 128 ** 2 * 49 * 3 * 64 + 2 * 64 ** 2 * 9 * 64 * 64 + 2 * 32 ** 2 * 9 * 64 * 128
            + 2 * 16 ** 2 * 9 * 128 * 256 + 2 * 8 ** 2 * 9 * 256 * 512 + 2 * 512)
    assert razn.flops(razn.build_policy(256, 1.0)) == hand
    fcn = razn.flops(razn.build_resnet18_fcn(4, 256, 1.0))
    stem_and_conv2 = 2 * 128 ** 2 * 49 * 3 * 64 + 4 * 2 * 64 ** 2 * 9 * 64 * 64
    assert fcn > stem_and_conv2
    ratio = razn.relative_cost(256, 1.0, 4)
    with capsys.disabled():
        print(f"\npolicy / segmentation FCN FLOPs at 256 px, full width: {100 * ratio:.2f} % (paper: 7.1 %)")
    assert ratio == pytest.approx(hand / fcn)


def test_split_puts_quadrant_ij_at_index_4b_plus_2i_plus_j():
    rng = np.random.default_rng(0)
    x = rng.random((2, 8, 8, 3)).astype(np.float32)
    patches = zoom.split_zoom(x)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(patches[4 * b + 2 * i + j], x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4])
    np.testing.assert_array_equal(zoom.stitch_zoom(patches), x)
    np.testing.assert_array_equal(np.asarray(razn.split_zoom(x)), patches)  # the Keras twin
    np.testing.assert_array_equal(np.asarray(razn.stitch_zoom(patches)), x)
    coarse = rng.random((1, 4, 4, 2)).astype(np.float32)
    fine = zoom.enlarge(coarse)
    for u in range(4):
        for v in range(4):
            assert (fine[0, 2 * u:2 * u + 2, 2 * v:2 * v + 2] == coarse[0, u, v]).all()
    np.testing.assert_array_equal(np.asarray(razn.enlarge(coarse)), fine)


class _Identity:
    """A backend that returns its input: the 'segmentation' is the image itself."""

    def __init__(self, name):
        self.source, self.metadata, self.input_names = name, None, ("image",)

    def predict(self, x):
        return np.asarray(x, np.float32)


class _Policy(_Identity):
    """Zooms regions whose red mean is above the median of a fixed list."""

    def predict(self, x):
        return (np.asarray(x)[..., 0].mean(axis=(1, 2)) > 0.5).astype(np.float32)[:, None] * 0.8 + 0.1


def test_zoom_read_and_stitch_land_where_the_slide_has_them(tmp_path):
    """Identity networks on a noise slide (2 px blocks at 10x): the raster at 10x equals
    the slide's 10x level pixel for pixel in zoomed regions, and the coarse regions equal
    its 2x2 block means (the 5x view); shifting the expectation by one pixel fails."""
    from synthetic import make_slide

    from h2g.io.slide import Slide
    from h2g.tiling.tissue import TissueMask

    path = make_slide(tmp_path / "noise.tiff", size=(1024, 768), pattern="noise", compression=None,
                      downsamples=(1, 4, 16))
    with Slide(path) as slide:
        tissue = TissueMask(np.ones((24, 32), bool), 32.0)
        raster, stats = zoom.zoom_segmentation(slide, _Policy("p"), _Identity("c"), _Identity("f"), size=16,
                                               magnification=5.0, tissue=tissue, batch_size=5, progress=False)
        level = slide.read_level(1).astype(np.float32) / 255  # 10x, 256 x 192
    assert 0 < stats.zoom_fraction < 1 and raster.downsample == 4
    h, w = level.shape[:2]
    assert raster.covered[:h, :w].all()
    blocks = level.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    coarse = np.repeat(np.repeat(blocks, 2, 0), 2, 1)
    zoomed = np.zeros((h, w), bool)
    for k, (r, c) in enumerate(np.asarray(raster_grid(slide_shape=(w, h)))):
        zoomed[r:r + 32, c:c + 32] = stats.zoomed[k]
    probs = raster.probs[:h, :w]
    np.testing.assert_allclose(probs[zoomed], level[zoomed], atol=1e-6)  # x * (1/255) vs x / 255
    np.testing.assert_allclose(probs[~zoomed], coarse[~zoomed], atol=1 / 255 + 1e-6)
    for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        shifted = np.roll(level, (dr, dc), axis=(0, 1))
        assert np.abs(probs[zoomed] - shifted[zoomed]).mean() > 0.05


def raster_grid(slide_shape):
    """Top-left (row, col) of the 32 px regions at 10x, in the order window_grid lists
    them (row-major over a slide whose every region has tissue)."""
    w, h = slide_shape
    return [(r, c) for r in range(0, -(-h // 32) * 32, 32) for c in range(0, -(-w // 32) * 32, 32)]


@pytest.fixture(scope="module")
def trained_nets():
    """Tiny RAZN networks after two training steps (non-degenerate outputs)."""
    from h2g.systems.razn.training import RaznTrainer

    keras.utils.set_random_seed(1)
    nets = (razn.build_policy(32, 0.125), razn.build_resnet18_fcn(5, 32, 0.125, name="coarse"),
            razn.build_resnet18_fcn(5, 32, 0.125, name="fine"))
    trainer = RaznTrainer(*nets, lr=0.01)
    rng = np.random.default_rng(0)
    for step in range(2):
        trainer.step(rng.random((4, 32, 32, 3), np.float32), rng.random((4, 64, 64, 3), np.float32),
                     rng.integers(0, 5, (4, 64, 64)).astype(np.int32), step)
    return nets


@pytest.mark.slow
def test_tiny_networks_export_with_parity(trained_nets, tiny_cohort, tmp_path):
    from h2g.data.views import View
    from h2g.export.conversion import export_model
    from h2g.inference.metadata import ModelMetadata
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import Slide

    record = load_manifest(tiny_cohort).records[0]
    x0, x1 = zoom.zoom_views(32, 2.5)
    keras.utils.set_random_seed(2)
    attention = razn.unit_model("attention", razn.build_resnet18_fcn(5, 32, 0.125), attention_width=4)
    models = {
        "policy": (trained_nets[0], ModelMetadata(system="razn", role="policy", views=(x0,))),
        "coarse": (trained_nets[1], ModelMetadata(system="razn", role="coarse", views=(x0,),
                                                  output="pixel_probs")),
        "fine": (trained_nets[2], ModelMetadata(system="razn", role="fine", views=(View("x1_patch", 5.0, 32),),
                                                output="pixel_probs")),
        "attention": (attention, ModelMetadata(system="razn", role="segmentation", views=(x0, x1),
                                               output="pixel_probs", extras={"target": "x1"})),
    }
    with Slide(record.slide_path) as slide:
        for stem, (model, meta) in models.items():
            entry = export_model(model, tmp_path, stem, slide, metadata=meta)
            parity = entry["parity"]
            assert parity["passed"], (stem, parity)
            assert parity["onnxruntime"]["max_abs_diff"] <= 1e-4
            assert parity["openvino_f32"]["max_abs_diff"] <= 1e-4
            if stem != "attention":
                assert not parity["constant_output"], stem


def test_weighted_iou_by_hand():
    """Truth: 6 px of class 0, 2 px of class 1, none of class 2 (predicted once)."""
    from h2g.evaluation.metrics import ClassScores, weighted_iou

    confusion = np.array([[5, 0, 1],   # class 0: 5 right, 1 called class 2
                          [1, 1, 0],   # class 1: 1 right, 1 called class 0
                          [0, 0, 0]])
    scores = ClassScores.from_confusion(confusion, ["a", "b", "c"])
    iou_a, iou_b = 5 / (5 + 1 + 1), 1 / (1 + 0 + 1)
    assert weighted_iou(scores, "frequency") == pytest.approx(0.75 * iou_a + 0.25 * iou_b)
    assert weighted_iou(scores, "inverse") == pytest.approx(0.25 * iou_a + 0.75 * iou_b)  # 1/6 : 1/2
    assert scores.mean_iou == pytest.approx((iou_a + iou_b + 0.0) / 3)  # class c present (predicted)


def test_zoom_map_marks_each_region():
    stats = zoom.ZoomStats(np.array([0.9, 0.1], np.float32), np.array([True, False]), np.array([[0, 0], [0, 4]]), 4)
    m = stats.zoom_map((4, 10))
    assert (m[:, :4] == 1).all() and (m[:, 4:8] == 0).all() and np.isnan(m[:, 8:]).all()
