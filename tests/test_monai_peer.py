"""The MONAI peer (h2g.export.monai_peer): MONAI's sliding_window_inference over a slide read
through monai.data.WSIReader, with an ONNX Runtime predictor, gives our sliding-window
probabilities where the formulations meet, and runs the same windows.

The model is a tiny three-view network (x20, x10, x5) written with onnx.helper: a 3 x 3
convolution of each view, summed, softmax; it depends on every view's pixels at every
position, so a context view cropped one pixel off, or a window in the wrong place, shows.
Skipped with a message when MONAI (the ``peers`` extra) is not installed."""
from __future__ import annotations

import numpy as np
import pytest
from synthetic import make_slide

from h2g.data.views import View
from h2g.tiling.tissue import TissueMask

pytest.importorskip("monai", reason="MONAI is not installed: pip install 'h2g[peers]' (the MONAI peer's tests)")
pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'h2g[peers]'")

SIZE = 32  # every view's side (px)
CLASSES = 3
VIEWS = (View("x20", 20.0, SIZE), View("x10", 10.0, SIZE), View("x5", 5.0, SIZE))


def three_view_onnx(path):
    """softmax(sum over views of conv3x3(view)), NHWC in and out, dynamic batch, with
    DMMN-like metadata (views x20 / x10 / x5, target x20)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from h2g.inference.metadata import ModelMetadata, embed_onnx

    rng = np.random.default_rng(3)
    nodes, inits, inputs = [], [], []
    for v in VIEWS:
        inputs.append(helper.make_tensor_value_info(v.name, TensorProto.FLOAT, ["n", SIZE, SIZE, 3]))
        inits.append(numpy_helper.from_array(rng.normal(0, 2, (CLASSES, 3, 3, 3)).astype(np.float32), f"w_{v.name}"))
        nodes += [helper.make_node("Transpose", [v.name], [f"{v.name}_nchw"], perm=[0, 3, 1, 2]),
                  helper.make_node("Conv", [f"{v.name}_nchw", f"w_{v.name}"], [f"{v.name}_conv"], pads=[1, 1, 1, 1])]
    nodes += [helper.make_node("Sum", [f"{v.name}_conv" for v in VIEWS], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs_nchw"], axis=1),
              helper.make_node("Transpose", ["probs_nchw"], ["segmentation"], perm=[0, 2, 3, 1])]
    output = helper.make_tensor_value_info("segmentation", TensorProto.FLOAT, ["n", SIZE, SIZE, CLASSES])
    graph = helper.make_graph(nodes, "three_views", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    meta = ModelMetadata(system="dmmn", design="tiny", role="segmentation", views=VIEWS,
                         classes=[{"name": n} for n in ("a", "b", "c")], output="pixel_probs",
                         extras={"target": "x20"})
    return embed_onnx(path, meta)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model, a 40x noise slide of 640 x 512 px with a level at every view's magnification
    (downsamples 1, 2, 4, 8) and one with the cohort's pyramid (1, 4, 16: 20x and 5x are
    shrunk from levels 0 and 1)."""
    root = tmp_path_factory.mktemp("monai_peer")
    model = three_view_onnx(root / "tiny.onnx")
    every = make_slide(root / "every_level.tiff", size=(640, 512), pattern="noise", compression=None,
                       downsamples=(1, 2, 4, 8))
    cohort = make_slide(root / "cohort_levels.tiff", size=(640, 512), pattern="noise", compression=None,
                        downsamples=(1, 4, 16))
    return model, every, cohort


def ours(slide_path, model, tissue, **kw):
    from h2g.inference.backends import make_backend
    from h2g.inference.sliding import sliding_segmentation
    from h2g.io.slide import Slide

    with Slide(slide_path) as slide:
        return sliding_segmentation(slide, make_backend(model, threads=1), VIEWS, target="x20", tissue=tissue,
                                    batch_size=8, progress=False, **kw)


def everywhere(shape=(16, 20)):
    return TissueMask(np.ones(shape, bool), 32.0)


@pytest.mark.parametrize("blend,stride,chunk,backend", [("centre", None, 4, "openslide"), ("centre", 16, 3, "openslide"),
                                                         ("tent", 16, 0, "openslide"), ("centre", None, 4, "tifffile")])
def test_same_windows_same_probabilities_where_every_view_is_a_level(files, blend, stride, chunk, backend):
    """Every view read from a pyramid level of its own: the same pixels on both sides, so
    the same probabilities (float tolerance: batches differ), for blend centre (with and
    without overlap, several chunks) and tent (the whole slide in one call), through
    WSIReader's OpenSlide and tifffile backends."""
    from h2g.export.monai_peer import monai_segmentation

    model, slide, _ = files
    want = ours(slide, model, everywhere(), stride=stride, blend=blend)
    got = monai_segmentation(slide, model, tissue=everywhere(), stride=stride, blend=blend, chunk=chunk,
                             batch_size=5, threads=1, backend=backend)
    assert got.shape == want.shape == (256, 320) and got.downsample == want.downsample == 2
    np.testing.assert_array_equal(got.covered, want.covered)
    np.testing.assert_allclose(got.probs, want.probs, atol=2e-6)
    assert want.probs.std() > 0.1  # the model's output varies: the comparison means something


def test_only_tissue_windows_run_and_cells_without_tissue_stay_uncovered(files):
    """Tissue on the left 30 % only: the peer runs exactly our windows (it raises if the
    count differs from the grid's) and covers the same pixels with the same values."""
    from h2g.export.monai_peer import MonaiSlidingWindow

    model, slide, _ = files
    mask = np.zeros((16, 20), bool)
    mask[:, :6] = True
    tissue = TissueMask(mask, 32.0)
    want = ours(slide, model, tissue)
    timings: dict = {}
    got = MonaiSlidingWindow(slide, model, chunk=5, threads=1).segment(tissue=tissue, timings=timings)
    # tissue on level-0 x < 6 * 32 = 192: cells of 64 level-0 px (32 px at 20x) in columns 0..2, 8 rows
    assert timings["windows"] == 3 * 8
    np.testing.assert_array_equal(got.covered, want.covered)
    assert 0 < got.covered.mean() < 0.5
    np.testing.assert_allclose(got.probs[got.covered], want.probs[want.covered], atol=2e-6)
    assert not got.probs[~got.covered].any()


def test_shrunk_views_differ_only_by_rounding(files):
    """The cohort's pyramid has no 20x or 5x level: both sides area-shrink, ours rounds to
    uint8 first, MONAI keeps float means (the documented difference): close, not equal."""
    from h2g.export.monai_peer import monai_segmentation

    model, _, slide = files
    want = ours(slide, model, everywhere())
    got = monai_segmentation(slide, model, tissue=everywhere(), chunk=8, threads=1)
    np.testing.assert_array_equal(got.covered, want.covered)
    diff = np.abs(got.probs - want.probs)
    assert 0 < diff.max() < 0.05 and diff.mean() < 2e-3
    assert (got.probs.argmax(-1) == want.probs.argmax(-1)).mean() > 0.99


def test_peer_result_and_refusals(files, monkeypatch):
    from h2g.core.errors import ConfigError
    from h2g.export import monai_peer

    model, slide, _ = files
    result = monai_peer.monai_peer(slide, model, repeats=1, chunk=8, threads=1)
    assert result["name"] == "monai" and result["repeats"] == 1 and len(result["runs"]) == 1
    assert result["engine"] == "MONAI sliding_window_inference + ONNX Runtime" and "monai 1." in result["version"]
    assert set(result["stages"]) == set(monai_peer.STAGES)
    run = result["runs"][0]
    assert result["windows_per_second"]["mean"] == pytest.approx(run["windows"] / (run["total"] - run["tissue"]))
    with pytest.raises(ConfigError, match="keep 8 has no MONAI counterpart"):
        monai_peer.MonaiSlidingWindow(slide, model, stride=16, keep=8)
    with pytest.raises(ConfigError, match="backend must be one of"):
        monai_peer.MonaiSlidingWindow(slide, model, backend="cucim")
    monkeypatch.setattr(monai_peer, "monai_available", lambda: "MONAI cannot be imported (test)")
    assert monai_peer.monai_peer(slide, model) == {"name": "monai", "skipped": "MONAI cannot be imported (test)"}
