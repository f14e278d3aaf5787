"""h2g.data.dataset's sample_dataset (named views + class or pixel targets), the shared
reader pool (ReadAhead), and the non-stalling tf.data pipeline (stateless reads)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from synthetic import cell_colour, make_slide

from h2g.core.errors import ConfigError, SamplerError
from h2g.data.dataset import each_view, patch_dataset, read_samples, sample_dataset
from h2g.data.readers import IGNORE, ReadAhead, reader_pool
from h2g.data.sampler import HierarchicalSampler, SampleSource
from h2g.data.views import View

CELL = 512  # 20x checker: a 512 px cell is one 256 px patch at 10x


def grid(coords, labels):
    return SimpleNamespace(coords=np.asarray(coords, np.int64), labels=np.asarray(labels, np.int8),
                           magnification=10.0, patch_size=256)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    checker = make_slide(folder / "checker.tiff", (2048, 1536), mpp=0.5, pattern="checker", cell=CELL,
                         downsamples=(1, 4), compression="zlib")
    noise = make_slide(folder / "noise.tiff", (2048, 1536), mpp=0.25, pattern="noise",
                       downsamples=(1, 4), compression="zlib", seed=5)
    cells = [(x, y) for y in range(0, 1536, CELL) for x in range(0, 2048, CELL)]
    noise_coords = [(x, y) for y in (0, 512) for x in (0, 1024)]
    return [
        SampleSource("checker", checker, grid(cells, np.arange(12) % 2), None, {"grade": 1, "split": "train"}),
        SampleSource("noise", noise, grid(noise_coords, np.arange(4) % 2), None, {"grade": 2, "split": "train"}),
    ]


def cell_labels():
    """A label map (downsample 4) of the checker: cell (r, c) has class (4 r + c) % 3."""
    rows, cols = np.mgrid[0:384, 0:512]
    return (((rows // 128) * 4 + cols // 128) % 3).astype(np.uint8)


def batches(dataset):
    return [(x, y) for x, y in dataset]


# ---------------------------------------------------------------------------- views and targets
def test_views_are_centred_on_the_drawn_patch(sources):
    sampler = HierarchicalSampler(sources[:1], stages=("slide", "class", "patch"), seed=4)
    # each view spans 256 level-0 px of the 20x slide around the cell's centre: one colour
    views = [View("a", 10, 128), View("b", 20, 256), View("c", 5, 64, "white")]
    data = sample_dataset(sampler, views, batch_size=5, n_batches=2, readers=2)
    for b, (inputs, labels) in enumerate(data):
        assert sorted(inputs) == ["a", "b", "c"]
        assert inputs["b"].shape == (5, 256, 256, 3) and inputs["c"].shape == (5, 64, 64, 3)
        assert inputs["a"].dtype.name == "float32" and labels.shape == (5, 2)
        for i, (_, x, y, label) in enumerate(sampler.draw_batch(b, 5)):
            colour = np.array(cell_colour(y // CELL, x // CELL)) / 255.0
            for name in "abc":
                np.testing.assert_allclose(inputs[name][i].numpy(), np.broadcast_to(colour, inputs[name][i].shape),
                                           atol=1e-6, err_msg=name)
            np.testing.assert_array_equal(labels[i].numpy(), np.eye(2)[label])


def test_pixel_target_is_the_label_map_of_the_target_view(sources):
    sampler = HierarchicalSampler(sources[:1], stages=("slide", "patch"), seed=1)
    annotation = SimpleNamespace(labels=cell_labels(), downsample=4.0)
    views = [View("x20", 20, 64), View("x5", 5, 32)]
    data = sample_dataset(sampler, views, target="pixels", target_view="x20", batch_size=4, n_batches=2,
                          readers=2, annotations={"checker": annotation})
    for b, (inputs, target) in enumerate(data):
        assert target.shape == (4, 64, 64) and target.dtype.name == "int32"
        for i, (_, x, y, _) in enumerate(sampler.draw_batch(b, 4)):
            expected = ((y // CELL) * 4 + x // CELL) % 3
            assert (target[i].numpy() == expected).all()
    # a 5x view of the corner cell reaches beyond the slide: those target pixels are ignored
    wide = read_samples(HierarchicalSampler([SampleSource("checker", sources[0].slide_path,
                                                          grid([(0, 0), (0, 0)], [1, 0]), None, {})],
                                            stages=("slide", "patch")),
                        0, 1, [View("x5", 5, 256)], target="pixels", readers=1,
                        annotations={"checker": annotation})[1][0]
    # 5x, 256 px: 1024 level-0 px around centre 256: [-256, 768); the first 64 px are beyond the slide
    assert (wide[:64] == IGNORE).all() and (wide[:, :64] == IGNORE).all()
    assert (wide[64:192, 64:192] == 0).all() and (wide[64:192, 192:] == 1).all()


def test_missing_annotation_and_bad_targets_are_errors(sources):
    sampler = HierarchicalSampler(sources, seed=0)
    views = [View("a", 10, 32), View("b", 5, 32)]
    with pytest.raises(SamplerError, match=r"slide (checker|noise) .*annotation"):
        read_samples(sampler, 0, 2, views, target="pixels", target_view="a", readers=1)
    with pytest.raises(ConfigError, match="target must be one of"):
        sample_dataset(sampler, views, target="mask", batch_size=2, n_batches=1)
    with pytest.raises(ConfigError, match="needs target_view"):
        sample_dataset(sampler, views, target="pixels", batch_size=2, n_batches=1)
    with pytest.raises(ConfigError, match="class target has none"):
        sample_dataset(sampler, views, target_view="a", batch_size=2, n_batches=1)
    with pytest.raises(ConfigError, match="unique"):
        sample_dataset(sampler, [views[0], views[0]], batch_size=2, n_batches=1)
    with pytest.raises(ConfigError, match="validation dataset needs n_batches"):
        sample_dataset(sampler, views, batch_size=2, training=False)


# ---------------------------------------------------------------------------- determinism
def test_same_batches_whatever_the_readers_and_views_share_the_seed(sources):
    from h2g.data.augment import classifier_augmenter

    sampler = HierarchicalSampler(sources, seed=7)
    views = [View("p", 10, 64), View("q", 10, 64), View("ctx", 5, 32)]
    augment = each_view(classifier_augmenter())
    one = batches(sample_dataset(sampler, views, batch_size=6, n_batches=3, readers=1, augment=augment))
    three = batches(sample_dataset(sampler, views, batch_size=6, n_batches=3, readers=3, augment=augment))
    plain = batches(sample_dataset(sampler, views, batch_size=6, n_batches=3, readers=3))
    for (x1, y1), (x3, y3), (xp, _) in zip(one, three, plain):
        for name in ("p", "q", "ctx"):
            np.testing.assert_array_equal(x1[name].numpy(), x3[name].numpy())
        np.testing.assert_array_equal(y1.numpy(), y3.numpy())
        np.testing.assert_array_equal(x1["p"].numpy(), x1["q"].numpy())  # same view, same seed
    assert not np.array_equal(one[0][0]["p"].numpy(), plain[0][0]["p"].numpy()), "augmentation changed nothing"


def test_patch_dataset_is_the_white_patch_view_of_sample_dataset(sources):
    """H2G-Net's batches through the general path: same patches, augmentation, labels."""
    from h2g.data.augment import classifier_augmenter

    sampler = HierarchicalSampler(sources, seed=3)
    augment = classifier_augmenter()
    patches = batches(patch_dataset(sampler, batch_size=4, n_batches=2, readers=2, augment=augment))
    samples = batches(sample_dataset(sampler, [View("image", 10, 256, "white")], batch_size=4, n_batches=2,
                                     readers=2, augment=each_view(augment)))
    for (images, labels), (inputs, one_hot) in zip(patches, samples):
        np.testing.assert_array_equal(images.numpy(), inputs["image"].numpy())
        np.testing.assert_array_equal(labels.numpy(), one_hot.numpy())


def test_n_classes_widens_the_one_hot(sources):
    sampler = HierarchicalSampler(sources, seed=0)
    _, labels = next(iter(sample_dataset(sampler, [View("a", 10, 16)], batch_size=3, n_batches=1,
                                         readers=1, n_classes=4)))
    assert labels.shape == (3, 4)
    np.testing.assert_array_equal(labels.numpy()[:, 2:], 0)


# ---------------------------------------------------------------------------- the pipeline
_CONCURRENCY_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    import tensorflow as tf
    from h2g.data import dataset as ds
    tf.config.experimental.enable_op_determinism()
    active, peak, lock = [0], [0], threading.Lock()
    def slow(sampler, batch_index, batch_size, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.4)
        with lock:
            active[0] -= 1
        return np.full((batch_size, 8, 8, 3), batch_index, np.uint8), np.zeros(batch_size, np.int32)
    ds.read_batch = slow
    sampler = type("S", (), {"n_classes": 2})()
    data = ds.patch_dataset(sampler, batch_size=2, n_batches=6, patch_size=8, readers=1)
    values = [int(x.numpy()[0, 0, 0, 0] * 255 + 0.5) for x, _ in data]
    print(peak[0], values)
""")


@pytest.mark.slow
def test_batches_are_read_in_parallel_under_op_determinism():
    """A stateful tf.numpy_function makes tf.data read one batch after another under op
    determinism; the readers are stateless, so two batches are read at once, in order."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _CONCURRENCY_SCRIPT], capture_output=True, text=True, check=False,
                         cwd=root, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    peak, values = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert values == str(list(range(6)))
    assert int(peak) == 2, f"at most {peak} batch(es) read at once"


def test_dynamic_batch_takes_dict_inputs(sources):
    import keras
    import tensorflow as tf

    from h2g.training.fit import dynamic_batch

    sampler = HierarchicalSampler(sources, seed=0)
    views = [View("x10", 10, 16), View("x5", 5, 8)]
    data = dynamic_batch(sample_dataset(sampler, views, batch_size=3, n_batches=2, readers=2))
    spec_inputs, spec_labels = data.element_spec
    assert spec_inputs["x10"].shape.as_list() == [None, 16, 16, 3] and spec_labels.shape.as_list() == [None, 2]
    a, b = keras.Input((16, 16, 3), name="x10"), keras.Input((8, 8, 3), name="x5")
    pooled = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(a),
                                         keras.layers.GlobalAveragePooling2D()(b)])
    model = keras.Model({"x10": a, "x5": b}, keras.layers.Dense(2, activation="softmax")(pooled))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert isinstance(next(iter(data))[0], dict) and tf.is_tensor(next(iter(data))[1])


# ---------------------------------------------------------------------------- the reader pool
def test_read_ahead_is_ordered_bounded_and_on_the_shared_pool():
    assert reader_pool(3) is reader_pool(3)
    started, names = [], set()

    def work(i):
        started.append(i)
        names.add(threading.current_thread().name)
        time.sleep(0.01)
        return i * i

    with ReadAhead(work, range(20), readers=3, depth=4) as reader:
        out = []
        for value in reader:
            assert reader.pending <= 4
            assert len(started) <= len(out) + 1 + 4  # never more than depth ahead of the consumer
            out.append(value)
    assert out == [i * i for i in range(20)]
    assert names and all(n.startswith("h2g-reader3") for n in names)
    assert reader.busy_seconds >= 20 * 0.01 * 0.9


def test_read_ahead_reraises_and_close_stops_reading():
    def work(i):
        if i == 3:
            raise ValueError("bad item 3")
        return i

    with pytest.raises(ValueError, match="bad item 3"):
        with ReadAhead(work, range(100), readers=2, depth=2) as reader:
            list(reader)
    calls = []

    def slow(i):
        calls.append(i)
        time.sleep(0.02)
        return i

    reader = ReadAhead(slow, range(1000), readers=2, depth=3)
    assert next(reader) == 0
    reader.close()
    n = len(calls)
    time.sleep(0.1)
    assert len(calls) == n <= 5  # nothing read after close returned
    with pytest.raises(ConfigError):
        ReadAhead(slow, range(3), readers=2, depth=0)
