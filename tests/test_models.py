"""h2g.models: tiny versions of every architecture run and round-trip through .keras;
full-size parameter counts match the paper's figures (and hand-computed ones); the
attention modules match numpy implementations of their formulas; ImageNet weights load
from Keras' cache or fail with a ModelError; tools/model_summary.py reports the counts."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from scipy.special import softmax

from h2g import models
from h2g.core.errors import ConfigError, ModelError
from h2g.models.blocks import ChannelAttention, PositionAttention

# Small but non-degenerate: the dual-attention bottleneck of DAGU-Net is 2x2 at 256.
TINY = {
    "mobilenetv2": dict(alpha=0.35, input_size=64),
    "inceptionv3": dict(width=0.125, input_size=75),
    "unet": dict(width=0.25, input_size=256),
    "unet_lr": dict(width=0.25, input_size=256, n_classes=3),
    "agunet": dict(width=0.25, input_size=128),
    "dagunet": dict(width=0.25, input_size=256),
    "doubleunet": dict(width=0.25, input_size=256),
}
REPO = Path(__file__).resolve().parents[1]
DEEP = {"agunet": [f"deep_{k}" for k in range(6, 0, -1)],
        "dagunet": [f"deep_{k}" for k in range(6, 0, -1)],
        "doubleunet": ["first_unet"]}


def randomize(model: keras.Model, seed: int = 0) -> None:
    """Random weights everywhere (the attention gammas start at zero, and a fresh
    network's outputs are nearly constant), positive batch-norm variances."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        value = rng.uniform(0.5, 1.5, shape) if "moving_variance" in v.path else rng.normal(0, 0.3, shape)
        v.assign(value.astype("float32"))


def inputs_for(model: keras.Model, batch: int = 2, seed: int = 1):
    """Random inputs in [0, 1]: a dict by input name, or the array of a classifier
    (whose single input is not a list)."""
    rng = np.random.default_rng(seed)
    feeds = {t.name: rng.random((batch, *t.shape[1:]), dtype=np.float32) for t in model.inputs}
    return feeds if isinstance(model.input, list) else feeds[model.inputs[0].name]


@functools.lru_cache(maxsize=None)
def tiny(name: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = models.build(name, **TINY[name])
    randomize(model)
    return model


# --------------------------------------------------------------------------- forward passes
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.slow
def test_tiny_forward_gives_softmax_of_the_right_shape(name):
    model = tiny(name)
    x = inputs_for(model)
    out = np.asarray(model(x, training=False))
    size, n_classes = TINY[name]["input_size"], TINY[name].get("n_classes", 2)
    if name in models.CLASSIFIERS:
        assert [t.name for t in model.inputs] == ["image"]
        assert out.shape == (2, n_classes)
    else:
        assert [t.name for t in model.inputs] == (["image"] if name == "unet_lr" else ["image", "heatmap"])
        assert out.shape == (2, size, size, n_classes)
    assert np.all(out >= 0) and np.allclose(out.sum(-1), 1.0, atol=1e-5)
    assert out.std() > 1e-3  # the inputs change the output: not a constant map


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.slow
def test_keras_save_reload_round_trip(name, tmp_path):
    model = tiny(name)
    x = inputs_for(model, seed=2)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [t.name for t in loaded.inputs] == [t.name for t in model.inputs]
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(DEEP))
@pytest.mark.slow
def test_deep_supervision_outputs_and_inference_model(name):
    keras.utils.set_random_seed(0)
    size = TINY[name]["input_size"]
    model = models.build(name, **TINY[name], deep_supervision=True)
    assert list(model.output_names) == ["segmentation", *DEEP[name]]
    assert all(tuple(o.shape) == (None, size, size, 2) for o in model.outputs)
    single = models.inference_model(model)
    assert single.output_names == ["segmentation"]
    assert len(single.inputs) == 2 and all(a is b for a, b in zip(single.inputs, model.inputs))
    assert models.inference_model(tiny(name)) is tiny(name)
    if name == "doubleunet":  # its first output exists without deep supervision too
        assert model.count_params() == tiny(name).count_params()
        return
    # the auxiliary heads, 1x1 convolutions on decoder levels 7..2, are the only extra
    decoder = [64, 32, 32, 16, 8, 4]  # width 0.25
    assert model.count_params() - tiny(name).count_params() == sum(f * 2 + 2 for f in decoder)
    randomize(model)
    x = inputs_for(model)
    outs = [np.asarray(o) for o in model(x, training=False)]
    for out in outs:  # bilinear resizing keeps the probabilities summing to one
        assert np.all(out >= 0) and np.allclose(out.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(single(x, training=False)), outs[0], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_same_seed_same_weights():
    def weights():
        keras.utils.set_random_seed(5)
        return [w.numpy() for w in models.build("unet_lr", **TINY["unet_lr"]).weights]

    assert all(np.array_equal(u, v) for u, v in zip(weights(), weights()))


# --------------------------------------------------------------------------- parameter counts
def unet_params(in_channels: int, n_classes: int = 2) -> int:
    """By hand: 3x3 convs with bias, BN with 4 numbers per channel, 8 poolings, a
    512-filter bottleneck, a symmetric decoder on [skip, upsampled], 1x1 head."""
    filters = [8, 16, 32, 64, 128, 128, 256, 256, 512]

    def block(cin, f):
        return (9 * cin * f + f) + 4 * f + (9 * f * f + f) + 4 * f

    total, cin = 0, in_channels
    for f in filters:
        total += block(cin, f)
        cin = f
    for f in reversed(filters[:-1]):
        total += block(cin + f, f)
        cin = f
    return total + cin * n_classes + n_classes


@functools.lru_cache(maxsize=None)
def full(name: str) -> keras.Model:
    """Full-width model.  The refinement nets are fully convolutional: their parameter
    count does not depend on the input size, so they are built at the smallest size their
    poolings allow; the classifiers at their default 256."""
    small = {"unet": 256, "unet_lr": 256, "agunet": 128, "dagunet": 128, "doubleunet": 256}
    return models.build(name, **({"input_size": small[name]} if name in small else {}))


@pytest.mark.parametrize("name", [*models.PAPER_PARAMS, "unet_lr"])  # H2G-Net's (DMMN's paper gives no counts)
@pytest.mark.slow
def test_full_size_parameter_counts_within_5_percent_of_the_paper(name):
    params = full(name).count_params()
    paper = models.PAPER_PARAMS.get(name, models.PAPER_PARAMS["unet"])  # UNet-LR: U-Net's figure
    assert abs(params - paper) / paper < 0.05, (name, params, paper)
    if name == "unet":
        assert params == unet_params(4)
    if name == "unet_lr":
        assert params == unet_params(3)


@pytest.mark.parametrize("name", models.CLASSIFIERS)
@pytest.mark.slow
def test_classifier_scales_to_minus1_1_and_has_the_paper_head(name):
    model = tiny(name)
    scale = model.get_layer("to_minus1_1")
    np.testing.assert_allclose(np.asarray(scale(np.array([[0.0, 0.25, 1.0]], "float32"))), [[-1.0, -0.5, 1.0]])
    after_backbone = model.layers[model.layers.index(model.get_layer("backbone")) + 1:]
    head = [(type(layer).__name__, layer.get_config()) for layer in after_backbone]
    assert [kind for kind, _ in head] == ["GlobalAveragePooling2D", "Dense", "Dropout", "ReLU",
                                          "BatchNormalization", "Dense"]
    assert head[1][1]["units"] == 100 and head[2][1]["rate"] == 0.5
    assert head[5][1]["units"] == 2 and head[5][1]["activation"] == "softmax"


def test_inceptionv3_width_narrows_every_convolution():
    wide = full("inceptionv3").get_layer("backbone")  # keras.applications' model as is
    narrow = tiny("inceptionv3").get_layer("backbone")
    full_convs = [layer.filters for layer in wide.layers if isinstance(layer, keras.layers.Conv2D)]
    narrow_convs = [layer.filters for layer in narrow.layers if isinstance(layer, keras.layers.Conv2D)]
    assert narrow_convs == [max(1, round(f * 0.125)) for f in full_convs]
    assert len(narrow.layers) == len(wide.layers)


# --------------------------------------------------------------------------- attention modules
def test_position_attention_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 16)).astype("float32")
    layer = PositionAttention()
    layer.build(x.shape)
    wq, wk, wv = (rng.normal(size=(16, c)).astype("float32") for c in (2, 2, 16))
    bq, bk, bv = (rng.normal(size=c).astype("float32") for c in (2, 2, 16))
    for conv, w, b in ((layer.query, wq, bq), (layer.key, wk, bk), (layer.value, wv, bv)):
        conv.kernel.assign(w[None, None])
        conv.bias.assign(b)
    layer.gamma.assign(0.7)

    a = x.reshape(2, 12, 16)
    q, k, v = a @ wq + bq, a @ wk + bk, a @ wv + bv
    attention = softmax(q @ k.transpose(0, 2, 1), axis=-1)  # (B, N, N)
    expected = x + 0.7 * (attention @ v).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)


def test_channel_attention_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    layer = ChannelAttention()
    layer.build(x.shape)
    layer.gamma.assign(-0.4)

    a = x.reshape(2, 12, 5)
    energy = a.transpose(0, 2, 1) @ a  # (B, C, C)
    attention = softmax(energy.max(-1, keepdims=True) - energy, axis=-1)
    expected = x - 0.4 * (a @ attention.transpose(0, 2, 1)).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("name, kw, message", [
    ("unet", dict(input_size=300), "multiple of 256"),
    ("agunet", dict(input_size=192), "multiple of 128"),
    ("doubleunet", dict(input_size=128), "multiple of 256"),
    ("dagunet", dict(n_classes=1), "n_classes"),
    ("unet", dict(n_classes=2.5), "n_classes"),
    ("unet", dict(input_size="1024"), "input_size"),
    ("doubleunet", dict(aspp_filters=0), "aspp_filters"),
    ("unet_lr", dict(width=0), "width"),
    ("mobilenetv2", dict(input_size=16), "input_size"),
    ("mobilenetv2", dict(alpha=0.2, weights="imagenet"), "alpha"),
    ("inceptionv3", dict(width=0.5, weights="imagenet"), "width=1"),
    ("inceptionv3", dict(weights="imagenet.h5"), "weights"),
    ("unet", dict(alpha=0.5), "no argument"),
    ("vgg", {}, "unknown architecture"),
])
def test_bad_options_are_config_errors(name, kw, message):
    with pytest.raises(ConfigError, match=message):
        models.build(name, **kw)


# --------------------------------------------------------------------------- ImageNet weights
MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"


def write_legacy_weights(path, model: keras.Model) -> list[np.ndarray]:
    """Write ``model``'s weights in the Keras 2 HDF5 layout of keras-applications'
    files (root attribute layer_names; per layer weight_names, trainable first)."""
    values = []
    with h5py.File(path, "w") as f:
        names = []
        for layer in model.layers:
            weights = layer.trainable_weights + layer.non_trainable_weights
            group = f.create_group(layer.name)
            group.attrs["weight_names"] = np.array([f"w{i}".encode() for i in range(len(weights))])
            for i, w in enumerate(weights):
                group.create_dataset(f"w{i}", data=w.numpy())
                values.append(w.numpy())
            names.append(layer.name.encode())
        f.attrs["layer_names"] = np.array(names)
    return values


def test_imagenet_weights_missing_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    if any((d / MOBILENET_FILE).exists() for d in models.classifiers.keras_cache_dirs()):
        pytest.skip("the weights file is in Keras' fallback cache folder")
    with pytest.raises(ModelError, match=MOBILENET_FILE) as err:
        models.build("mobilenetv2", alpha=0.35, input_size=96, weights="imagenet")
    assert str(tmp_path / "models") in str(err.value)


@pytest.mark.slow
def test_imagenet_weights_load_from_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None)
    randomize(source, seed=3)
    expected = write_legacy_weights(tmp_path / "models" / MOBILENET_FILE, source)
    model = models.build("mobilenetv2", alpha=0.35, input_size=96, weights="imagenet")
    backbone = model.get_layer("backbone")
    loaded = [w.numpy() for layer in backbone.layers for w in layer.trainable_weights + layer.non_trainable_weights]
    assert len(loaded) == len(expected)
    assert all(np.array_equal(u, v) for u, v in zip(loaded, expected))


def test_corrupt_cached_weights_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / MOBILENET_FILE).write_bytes(b"not an hdf5 file")
    with pytest.raises(ModelError, match="cannot load"):
        models.build("mobilenetv2", alpha=0.35, input_size=96, weights="imagenet")


# --------------------------------------------------------------------------- tools/model_summary.py
def load_tool():
    spec = importlib.util.spec_from_file_location("model_summary", REPO / "tools" / "model_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_model_summary_json_and_table(capsys):
    tool = load_tool()
    assert tool.main(["--json", "unet_lr"]) == 0
    assert json.loads(capsys.readouterr().out) == {"unet_lr": {"params": unet_params(3), "paper_params": None}}
    rows = {"unet_lr": {"params": unet_params(3), "paper_params": None},
            "unet": {"params": unet_params(4), "paper_params": 11_580_000}}
    lines = tool.table(rows).splitlines()
    assert lines[1].split() == ["unet_lr", f"{unet_params(3):,}", "-", "-"]
    assert lines[2].split() == ["unet", f"{unet_params(4):,}", "11,580,000", "-0.06%"]


def test_model_summary_unknown_name_exits_2(capsys):
    from h2g.core.cli import run_cli

    assert run_cli(load_tool().main, ["resnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet" in err[0]


@pytest.mark.slow
def test_model_summary_saves_seeded_untrained_models(tmp_path, capsys):
    """--save writes loadable full-size models; the same seed gives the same weights."""

    tool = load_tool()
    for folder in ("a", "b"):
        assert tool.main(["--json", "mobilenetv2", "--save", str(tmp_path / folder), "--seed", "3"]) == 0
        row = json.loads(capsys.readouterr().out)["mobilenetv2"]
        assert row["saved"] == [str(tmp_path / folder / "mobilenetv2.keras")] and "sidecars" not in row
    a, b = (keras.saving.load_model(tmp_path / f / "mobilenetv2.keras") for f in ("a", "b"))
    assert a.count_params() == row["params"] and a.input_shape == (None, 256, 256, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


def test_model_summary_counts_without_weights_what_built_models_hold(capsys):
    """Without --save the tool counts parameters from shapes alone (no weights
    initialised); the counts equal those of the same models built with their weights,
    for a classifier, the refinement U-Net, DMMN's three-view net and RAZN's FCN (the
    tiny stand-ins: the same code paths in seconds; m-UNet's EfficientNet U-Nets would
    add 6 s, and the full-size table of every architecture was compared by hand: the
    same JSON byte for byte)."""
    from h2g import models

    tool = load_tool()
    names = ["mobilenetv2", "unet", "dmmn_m3", "resnet18_fcn"]
    assert tool.main(["--json", "--tiny", *names]) == 0
    rows = json.loads(capsys.readouterr().out)
    for name in names:
        built = models.build(name, **tool.PAPER_ARGUMENTS.get(name, {}), **tool.TINY[name])
        assert built.count_params() == sum(int(np.prod(w.shape)) for w in built.get_weights()) > 0
        assert rows[name]["params"] == built.count_params(), name
        keras.backend.clear_session()


def test_model_summary_save_onto_a_file_exits_2(tmp_path, capsys):
    from h2g.core.cli import run_cli

    target = tmp_path / "file"
    target.write_text("")
    assert run_cli(load_tool().main, ["unet", "--save", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_model_summary_tiny_dmmn_stand_in_carries_its_views(tmp_path, capsys):
    """--tiny --save dmmn_m3: the small stand-in (64 px views, width 1/8) with a sidecar
    naming DMMN's three views at 20x / 10x / 5x and the target x20, so that export and
    the sliding-window benchmark know what to read; no paper figure for a stand-in."""
    from h2g.inference.metadata import read_sidecar

    tool = load_tool()
    assert tool.main(["--json", "dmmn_m3", "--tiny", "--save", str(tmp_path)]) == 0
    row = json.loads(capsys.readouterr().out)["dmmn_m3"]
    assert row["paper_params"] is None and row["sidecars"] == [str(tmp_path / "dmmn_m3.meta.json")]
    meta = read_sidecar(tmp_path / "dmmn_m3.keras")
    assert (meta.system, meta.design, meta.role, meta.output) == ("dmmn", "dmmn_m3", "segmentation", "pixel_probs")
    assert [(v.name, v.magnification, v.size) for v in meta.views] == [("x20", 20.0, 64), ("x10", 10.0, 64),
                                                                       ("x5", 5.0, 64)]
    assert meta.view().name == "x20" and meta.extras["stride"] == 64
    from h2g.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--tiny has stand-ins"):
        tool.main(["unet_lr", "--tiny"])


@pytest.mark.slow
def test_model_summary_munet_and_razn_stand_ins_deploy_as_their_systems(tmp_path, capsys):
    """--tiny --save munet razn_policy resnet18_fcn: m-UNet's two views (10x and 2.5x, the
    paper's levels 1 and 3 of a 40x scan) and RAZN's three networks (the FCN saved twice,
    as coarse and fine) with the metadata their deployed segmenters need: the m-UNet file
    is a sliding window over x_hi, the three RAZN files are RAZN's conditional zoom with
    256 px-style regions (here the stand-in's 64 px) at 20x, zoomed x2 to 40x."""
    from h2g.inference.metadata import read_sidecar
    from h2g.inference.segmenter import SlidingSegmenter
    from h2g.systems.razn.segmenter import ZoomSegmenter, geometry
    from h2g.systems.registry import segmenter_class

    tool = load_tool()
    assert tool.main(["--json", "munet", "razn_policy", "resnet18_fcn", "--tiny", "--save", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["resnet18_fcn"]["saved"] == [str(tmp_path / "razn_coarse.keras"), str(tmp_path / "razn_fine.keras")]
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["munet.keras", "razn_coarse.keras", "razn_fine.keras",
                                                                 "razn_policy.keras"]
    munet = read_sidecar(tmp_path / "munet.keras")
    assert (munet.system, munet.role, munet.output) == ("munet", "segmentation", "pixel_probs")
    assert [(v.name, v.magnification, v.size) for v in munet.views] == [("x_hi", 10.0, 128), ("x_lo", 2.5, 128)]
    assert munet.view().name == "x_hi" and munet.extras["stride"] == 128 and munet.extras["untrained"]
    model = keras.saving.load_model(tmp_path / "munet.keras")
    assert [i.name for i in model.inputs] == ["x_hi", "x_lo"]  # what the views feed
    assert segmenter_class({"segmentation": munet}) is SlidingSegmenter

    razn = {role: read_sidecar(tmp_path / f"razn_{role}.keras") for role in ("policy", "coarse", "fine")}
    assert {role: m.role for role, m in razn.items()} == {"policy": "policy", "coarse": "coarse", "fine": "fine"}
    assert segmenter_class(razn) is ZoomSegmenter
    assert geometry(razn["coarse"]) == (64, 20.0, 0.5)
    assert [(v.name, v.magnification, v.size) for v in razn["fine"].views] == [("x1_patch", 40.0, 64)]
    assert razn["policy"].output == "class_probs" and razn["coarse"].extras["zoom_rate"] == 2
    coarse, fine = (keras.saving.load_model(tmp_path / f"razn_{r}.keras") for r in ("coarse", "fine"))
    assert all(np.array_equal(a, b) for a, b in zip(coarse.get_weights(), fine.get_weights()))
