"""DMMN's four architectures (h2g.models.dmmn): shapes and names, the authors' building
blocks, the geometry of the multi-magnification crops, one training step and ONNX parity.

The geometry test needs no trust in the code under test: with "pointwise" weights
(every 3x3 convolution reduced to its centre tap, every transposed convolution to a
nearest-neighbour 2x upsampling, all positive, no biases) a network only mixes what lies
in the same pixel footprint at each scale, so where a one-pixel change of an input shows
up in the output follows from the views' geometry alone: pixel p of the view at zoom k
(x10: 2, x5: 4) lies at x20 pixel (p - S/2) * k + S/2.
"""
from __future__ import annotations

import numpy as np
import pytest

from h2g import models
from h2g.core.errors import ConfigError

S = 64  # tiny input size: a multiple of 32 as MS and M3 need
WIDTH = 0.125  # 4-8-16-32-64 filters
N_CLASSES = 3
NAMES = ("dsmn_s2", "dmmn_ms", "dmmn_m2s", "dmmn_m3")
MULTI = NAMES[1:]
ZOOM = {"x20": 1, "x10": 2, "x5": 4}
DEEPEST = 16  # 2**4 px of a view: a bottleneck pixel's footprint


def views_of(name: str) -> tuple[str, ...]:
    return ("x20",) if name == "dsmn_s2" else ("x20", "x10", "x5")


def tiny(name: str, n_classes: int = N_CLASSES, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    return models.build(name, n_classes=n_classes, input_size=S, width=WIDTH)


def feed_for(name: str, batch: int = 2, seed: int = 0) -> dict:
    from h2g.export.conversion import smooth_random

    return {v: smooth_random((batch, S, S, 3), seed=seed + i) for i, v in enumerate(views_of(name))}


def conv_layers(model):
    import keras

    return [layer for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", NAMES)
def test_inputs_outputs_and_building_blocks(name):
    import keras

    model = models.build(name, n_classes=4, input_size=S, width=WIDTH)
    assert [t.name for t in model.inputs] == list(views_of(name))
    assert all(tuple(t.shape) == (None, S, S, 3) for t in model.inputs)
    assert len(model.outputs) == 1 and tuple(model.output.shape) == (None, S, S, 4)
    assert model.layers[-1].name == "segmentation" and isinstance(model.layers[-1], keras.layers.Softmax)
    assert models.batchnorm_layers(model) == []
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = conv_layers(model)
    assert all(isinstance(c.kernel_initializer, keras.initializers.HeNormal) for c in convs)
    # no convolution narrower than one filter, 3x3 everywhere but the 1x1 logits
    assert all(c.filters >= 1 for c in convs)
    assert [c.name for c in convs if c.kernel_size != (3, 3)] == ["segmentation_logits"]
    ups = [c for c in convs if isinstance(c, keras.layers.Conv2DTranspose)]
    assert ups and all(c.strides == (2, 2) and c.padding == "same" for c in ups)
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 4 * len(views_of(name))
    # CONV_FINAL: 3x3 convolution + ReLU (first level's filters), 1x1 convolution
    final = model.get_layer("final_conv")
    assert final.filters == 4 and final.get_config()["activation"] == "relu"
    out = np.asarray(model(feed_for(name, batch=1), training=False))
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


def test_width_scales_the_authors_filters_and_sizes_are_checked():
    s2 = models.build("dsmn_s2", input_size=32, width=1.0)
    widths = [s2.get_layer(f"x20_enc{level}_1").filters for level in range(1, 5)]
    assert widths + [s2.get_layer("x20_bottleneck_1").filters] == [32, 64, 128, 256, 512]
    assert [s2.get_layer(f"x20_dec{level}_up").filters for level in range(1, 5)] == [32, 64, 128, 256]
    thin = models.build("dmmn_m3", input_size=32, width=0.01)
    assert min(c.filters for c in conv_layers(thin) if c.name != "segmentation_logits") == 1
    for name in NAMES:
        with pytest.raises(ConfigError):
            models.build(name, input_size=40)
        with pytest.raises(ConfigError):
            models.build(name, n_classes=1, input_size=S)
        with pytest.raises(ConfigError):
            models.build(name, input_size=S, width=0)
    for name in ("dmmn_ms", "dmmn_m3"):  # their deepest crops need a multiple of 32
        with pytest.raises(ConfigError, match="multiple of 32"):
            models.build(name, input_size=48)
    assert models.build("dmmn_m2s", input_size=48, width=WIDTH).output.shape[1] == 48
    with pytest.raises(ConfigError, match="takes no argument"):
        models.build("dmmn_m3", deep_supervision=True)


# --------------------------------------------------------------------------- geometry
def make_pointwise(model, seed: int = 0) -> None:
    """Positive weights that keep every feature in its pixel footprint: 3x3 kernels keep
    their centre tap only, transposed convolutions copy each input pixel to its 2x2
    children (the same matrix on taps (0..1, 0..1), zero on row / column 2), the logits
    are class 0 = mean of the last features, others 0; biases zero."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in conv_layers(model):
        kernel = np.zeros(tuple(layer.kernel.shape), np.float32)
        if isinstance(layer, keras.layers.Conv2DTranspose):  # (kh, kw, out, in)
            kernel[:2, :2] = rng.uniform(0.5, 1.5, kernel.shape[2:]) / kernel.shape[3]
        elif layer.name == "segmentation_logits":
            kernel[0, 0, :, 0] = 1.0 / kernel.shape[2]
        else:
            kernel[1, 1] = rng.uniform(0.5, 1.5, kernel.shape[2:]) / kernel.shape[2]
        layer.kernel.assign(kernel)
        layer.bias.assign(np.zeros(tuple(layer.bias.shape), np.float32))


def changes(model, view: str, pixels) -> list[np.ndarray]:
    """Per pixel: |output(that one pixel of ``view`` bright) - output(all zeros)| summed
    over classes (one batch: the all-zero sample first, then one per pixel)."""
    feed = {t.name: np.zeros((len(pixels) + 1, S, S, 3), np.float32) for t in model.inputs}
    for i, (y, x) in enumerate(pixels, start=1):
        feed[view][i, y, x] = 1.0
    out = np.asarray(model(feed, training=False))
    return list(np.abs(out[1:] - out[:1]).sum(-1))


def x20_box(view: str, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The x20 pixels covering ``view`` pixels [lo, hi), clipped to x20's field."""
    k = ZOOM[view]
    return np.clip((lo - S / 2) * k + S / 2, 0, S).astype(int), np.clip((hi - S / 2) * k + S / 2, 0, S).astype(int)


def box_mask(lo, hi) -> np.ndarray:
    mask = np.zeros((S, S), bool)
    mask[lo[0]:hi[0], lo[1]:hi[1]] = True
    return mask


@pytest.mark.parametrize("name", NAMES)
def test_each_view_lands_on_its_centre_crop(name):
    """A pixel of x10 / x5 inside x20's field changes the output most on exactly the x20
    pixels it covers (k x k, at the centre for the centre pixel), and nowhere outside its
    bottleneck footprint; a pixel outside the field changes it less, or not at all when
    its whole bottleneck footprint is outside the field (cropped away)."""
    model = tiny(name)
    make_pointwise(model)
    for view in views_of(name):
        k = ZOOM[view]
        first, last = S // 2 - S // (2 * k), S // 2 + S // (2 * k) - 1  # x20's field in this view
        inside = [(S // 2, S // 2), (S // 2 - 1, S // 2 - 1), (first, last), (last, first + 3)]
        ring, corner = (S // 2, first - 1), (1, 2)  # outside; the corner's bottleneck pixel too
        deltas = changes(model, view, inside + ([ring, corner] if k > 1 else []))
        for p, delta in zip(map(np.array, inside), deltas):
            assert delta.max() > 1e-4, (view, p)
            top = delta >= delta.max() * (1 - 1e-5)
            np.testing.assert_array_equal(top, box_mask(*x20_box(view, p, p + 1)), err_msg=f"{name} {view} {p}")
            deep_lo = p // DEEPEST * DEEPEST  # the bottleneck pixel holding p
            np.testing.assert_array_equal(delta > 0, box_mask(*x20_box(view, deep_lo, deep_lo + DEEPEST)),
                                          err_msg=f"{name} {view} {p}: support")
        if k == 1:
            continue
        # the view's centre pixel (S/2, S/2) is the k x k block starting at the output centre
        centre = deltas[0]
        assert np.array_equal(np.argwhere(centre == centre.max()).min(0), [S // 2, S // 2])
        peak = min(d.max() for d in deltas[:len(inside)])
        assert deltas[-2].max() < 0.5 * peak, (name, view, "ring", deltas[-2].max(), peak)
        assert deltas[-1].max() == 0.0, (name, view, "corner")


def test_random_weights_context_outside_the_field_matters_less_for_m2s():
    """With the initial (random) weights too: a bright x5 spot outside x20's field changes
    the M2S output much less than the same spot at x5's centre."""
    model = tiny("dmmn_m2s")
    spots = [(S // 2 - 1, S // 2 - 1), (2, 2), (S // 2 - 1, 4)]  # x5's centre, corner, left edge
    feed = {v: np.zeros((len(spots) + 1, S, S, 3), np.float32) for v in ("x20", "x10", "x5")}
    for i, (y, x) in enumerate(spots, start=1):
        feed["x5"][i, y:y + 2, x:x + 2] = 1.0  # a 2 x 2 spot
    out = np.asarray(model(feed, training=False))
    centre, corner, edge = np.abs(out[1:] - out[:1]).sum(axis=(1, 2, 3))
    assert centre > 0 and corner < 0.2 * centre and edge < 0.5 * centre, (centre, corner, edge)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_one_training_step(name):
    import keras

    model = tiny(name)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  run_eagerly=True)  # no graph tracing: seconds, not tens of seconds, on 2 cores
    before = [w.numpy().copy() for w in model.trainable_weights]
    x = feed_for(name, batch=2, seed=3)
    y = np.random.default_rng(0).integers(0, N_CLASSES, (2, S, S)).astype("int32")
    history = model.fit([x[v] for v in views_of(name)], y, batch_size=2, epochs=1, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss) and loss > 0
    after = [w.numpy() for w in model.trainable_weights]
    changed = sum(not np.array_equal(a, b) for a, b in zip(before, after))
    assert changed == len(before), f"{name}: {len(before) - changed} weights did not move"


# --------------------------------------------------------------------------- export
def nondegenerate(model, feed: dict) -> np.ndarray:
    """Scale the logits kernel up until the class-0 probability spans >= 0.2 over ``feed``
    (a fresh network gives nearly constant probabilities); returns the Keras output."""
    layer = model.get_layer("segmentation_logits")
    for _ in range(10):
        out = np.asarray(model(feed, training=False))
        if np.ptp(out[..., 0]) >= 0.2:
            return out
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 4.0, bias])
    raise AssertionError("outputs stay nearly constant")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_onnx_parity(name, tmp_path):
    import onnx
    import onnxruntime as ort

    from h2g.data.views import View
    from h2g.export.conversion import TOLERANCE, signature, to_onnx
    from h2g.inference.metadata import ModelMetadata

    model = tiny(name)
    feed = feed_for(name, batch=2, seed=5)
    expected = nondegenerate(model, feed)
    metadata = ModelMetadata(system="dmmn", design=name, role="segmenter", output="class_probs",
                             views=tuple(View(v, 20.0 / ZOOM[v], S) for v in views_of(name)),
                             extras={"target": "x20"})
    sig = signature(model, name, metadata)
    path = to_onnx(model, sig, tmp_path / f"{name}.onnx")
    exported = [i.name for i in onnx.load(str(path)).graph.input]
    # a one-input model is exported as ``image`` (the package's convention), the others by view
    assert exported == (["image"] if name == "dsmn_s2" else ["x20", "x10", "x5"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_feed = {"image": feed["x20"]} if name == "dsmn_s2" else feed
    (got,) = session.run(None, onnx_feed)
    assert got.shape == (2, S, S, N_CLASSES)
    assert TOLERANCE == 1e-4 and np.abs(got - expected).max() <= TOLERANCE
