"""Tiny models, fake backends and known-answer slides shared by several test modules.

Every expected value these give is known independently of the package: a "model" whose
tumour probability is a known function of a patch's mean colour, a refiner that thresholds
its heatmap input, segmenters whose class map is the dominant colour channel, and a
backend that records what it is fed.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from h2g.data.views import View
from h2g.inference.backends import _BackendBase
from h2g.inference.metadata import ModelMetadata
from h2g.inference.raster import raster_shape
from h2g.io.pyramid import write_pyramid

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- patch models (H2G-Net)
PATCH = 32  # patch size at 10x in these tests: 128 level-0 px on a 40x (0.25 um/px) slide
CELL = 4 * PATCH  # checker cell = one patch
W_RGB = (4.0, -2.0, 0.0)  # tumour logit = 4 R - 2 G - 1 (R, G, B mean colour in [0, 1])
BIAS = -1.0


def colour_probability(rgb01) -> np.ndarray:
    """The colour model's tumour probability for mean colours ``rgb01`` (..., 3)."""
    logit = np.asarray(rgb01, np.float64) @ np.array(W_RGB) + BIAS
    return 1.0 / (1.0 + np.exp(-logit))


def colour_model(size: int = PATCH):
    """Keras classifier: mean colour -> softmax([0, 4 R - 2 G - 1])."""
    import keras

    image = keras.Input((size, size, 3), name="image")
    mean = keras.layers.GlobalAveragePooling2D()(image)
    dense = keras.layers.Dense(2, activation="softmax", name="classification")
    out = dense(mean)
    dense.set_weights([np.array([[0, W_RGB[0]], [0, W_RGB[1]], [0, W_RGB[2]]], np.float32),
                       np.array([0, BIAS], np.float32)])
    return keras.Model(image, out, name="colour_model")


def threshold_refiner(size: int):
    """Keras refinement net: softmax([0, 20 (heatmap - 0.5)]) -> tumour where heat > 0.5."""
    import keras

    image = keras.Input((size, size, 3), name="image")
    heat = keras.Input((size, size, 1), name="heatmap")
    conv = keras.layers.Conv2D(2, 1, activation="softmax", name="segmentation")
    out = conv(keras.layers.Concatenate()([image, heat]))
    kernel = np.zeros((1, 1, 4, 2), np.float32)
    kernel[0, 0, 3, 1] = 20.0
    conv.set_weights([kernel, np.array([0.0, -10.0], np.float32)])
    return keras.Model({"image": image, "heatmap": heat}, out, name="threshold_refiner")


# ---------------------------------------------------------------------------- sliding-window models
BLOCK = 128  # level-0 px per colour block
COLOURS = np.array([(220, 60, 60), (60, 200, 60), (60, 60, 220)], np.uint8)  # class i = channel i
BLOCKS = (12, 20)  # colour blocks (rows, cols); then a glass band
GLASS = 512  # level-0 width of the glass band on the right
SIZE = (BLOCKS[1] * BLOCK + GLASS, BLOCKS[0] * BLOCK)  # (w, h) = (3072, 1536): not square
WINDOW = 64  # window / view side at 10x = 256 level-0 px


def block_labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, BLOCKS)


def make_block_slide(path, seed: int = 0):
    labels = block_labels(seed)
    image = np.full((SIZE[1], SIZE[0], 3), 255, np.uint8)
    image[:, :BLOCKS[1] * BLOCK] = np.repeat(np.repeat(COLOURS[labels], BLOCK, 0), BLOCK, 1)
    return write_pyramid(path, image, mpp=0.25, downsamples=[1, 4, 16], compression=None)


def expected_labels(downsample: float, seed: int = 0) -> np.ndarray:
    """The class of every raster pixel at ``downsample`` (-1 over glass), from the blocks."""
    rows, cols = raster_shape(SIZE, downsample)
    r = (np.arange(rows) * downsample) // BLOCK
    c = (np.arange(cols) * downsample) // BLOCK
    out = np.full((rows, cols), -1)
    inside = c < BLOCKS[1]
    out[:, inside] = block_labels(seed)[r.astype(int)][:, c[inside].astype(int)]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def colour_segmenter(size: int = WINDOW):
    """Per-pixel softmax(20 * RGB): the class map is the dominant colour channel."""
    import keras

    image = keras.Input((size, size, 3), name="image")
    conv = keras.layers.Conv2D(3, 1, activation="softmax", name="classes")
    out = conv(image)
    conv.set_weights([20.0 * np.eye(3, dtype=np.float32)[None, None], np.zeros(3, np.float32)])
    return keras.Model(image, out, name="colour_segmenter")


def context_segmenter(size: int = WINDOW):
    """A 3-class two-input model: ``hi`` (10x) and ``ctx`` (2.5x, 4x the area).  Its class
    map comes from the part of ``ctx`` that covers ``hi`` (the central quarter, upsampled
    x4) with weight 20, plus ``hi`` with weight 1: right only if the views are co-centred."""
    import keras

    hi = keras.Input((size, size, 3), name="hi")
    ctx = keras.Input((size, size, 3), name="ctx")
    centre = keras.layers.Cropping2D(3 * size // 8)(ctx)
    up = keras.layers.UpSampling2D(4)(centre)
    conv = keras.layers.Conv2D(3, 1, activation="softmax", name="classes")
    out = conv(keras.layers.Concatenate()([up, hi]))
    kernel = np.concatenate([20.0 * np.eye(3), 1.0 * np.eye(3)]).astype(np.float32)[None, None]
    conv.set_weights([kernel, np.zeros(3, np.float32)])
    return keras.Model({"hi": hi, "ctx": ctx}, out, name="context_segmenter")


CONTEXT_VIEWS = (View("hi", 10.0, WINDOW), View("ctx", 2.5, WINDOW))


class Recorder(_BackendBase):
    """A backend that records its feeds and predicts class 0 everywhere."""

    name, source = "recorder", "recorder"

    def __init__(self, names, out_size: int, classes: int = 2):
        self.input_names, self.out_size, self.classes, self.feeds = tuple(names), out_size, classes, []

    def predict(self, inputs):
        self.feeds.append(inputs)
        first = inputs if isinstance(inputs, np.ndarray) else next(iter(inputs.values()))
        out = np.zeros((len(first), self.out_size, self.out_size, self.classes), np.float32)
        out[..., 0] = 1.0
        return out


CLASSES = ({"name": "Red", "colour": [255, 0, 0]}, {"name": "Green", "colour": [0, 255, 0]},
           {"name": "Blue", "colour": [0, 0, 255]})


def context_metadata() -> ModelMetadata:
    return ModelMetadata(system="dmmn", design="context", role="segmentation", views=CONTEXT_VIEWS,
                         classes=CLASSES, output="pixel_probs", extras={"target": "hi"})


# ---------------------------------------------------------------------------- running the tools
REFINE_SIZE = 64


def run_script(script: str, *args, block_tensorflow: bool = True, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``export/<script>`` in a fresh interpreter; with ``block_tensorflow`` an import
    of tensorflow or keras fails there, as in a deployment venv without them."""
    env = dict(os.environ)
    if block_tensorflow:
        blocker = tmp_path / "no_tensorflow"
        blocker.mkdir(exist_ok=True)
        for name in ("tensorflow", "keras", "tf2onnx"):
            (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(REPO)])
    return subprocess.run([sys.executable, str(REPO / "export" / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def run_tool(name: str, *args, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``python tools/NAME.py ARGS`` from the repository root, as the README runs it; its
    exit code must be 0 and its stderr free of tracebacks."""
    proc = subprocess.run([sys.executable, f"tools/{name}.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{name} {args}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def load_cli(name: str, folder: str = "export"):
    """``<folder>/<name>.py`` as a module (its ``main`` runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"cli_{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dice(pred, truth) -> float:
    """2|P & T| / (|P| + |T|) of two boolean masks (1.0 when both are empty), written out here
    rather than taken from h2g.evaluation."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def centres_inside(rings_list, shape, downsample):
    """Independent truth for rasterised polygons: pixel centres of a ``shape`` grid at
    ``downsample`` level-0 px per pixel inside a polygon's exterior and outside its holes
    (matplotlib's point-in-polygon), over ``rings_list`` (one ``[exterior, hole, ...]``
    per polygon)."""
    from matplotlib.path import Path as MplPath

    rows, cols = shape
    ys, xs = np.mgrid[0:rows, 0:cols]
    points = np.c_[(xs.ravel() + 0.5) * downsample, (ys.ravel() + 0.5) * downsample]
    inside = np.zeros(len(points), bool)
    for rings in rings_list:
        hit = MplPath(np.asarray(rings[0], float)).contains_points(points)
        for hole in rings[1:]:
            hit &= ~MplPath(np.asarray(hole, float)).contains_points(points)
        inside |= hit
    return inside.reshape(rows, cols)
