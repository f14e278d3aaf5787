"""The slide-inference core: backends, patch reading, stitching geometry, refinement inputs.

Expected values are computed independently of the code under test: a "model" whose
tumour probability is a known function of a patch's mean colour, run over a slide whose
cells have known colours, gives a heatmap that can be written down cell by cell.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from synthetic import cell_colour, make_slide
from helpers import CELL, PATCH, colour_model, colour_probability, threshold_refiner

from h2g.core.errors import ConfigError, ExportError
from h2g.inference.backends import (
    KerasBackend,
    OnnxRuntimeBackend,
    OpenVINOBackend,
    make_backend,
)
from h2g.inference.heatmap import Heatmap, PatchReader, slide_heatmap
from h2g.inference.lowres import heatmap_raster, lowres_level, refine, refinement_inputs
from h2g.io.slide import Slide
from h2g.tiling.tissue import TissueMask, detect_tissue

@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> Slide:
    """A 40x checker slide, 4.5 x 3.25 cells (a partial last column and row), pixel-exact."""
    path = tmp_path_factory.mktemp("slides") / "checker.tiff"
    make_slide(path, size=(4 * CELL + CELL // 2, 3 * CELL + CELL // 4), pattern="checker",
               cell=CELL, compression=None, downsamples=(1, 4))
    with Slide(path) as slide:
        yield slide


def expected_heatmap(slide: Slide, coords: np.ndarray, step: int) -> np.ndarray:
    """The colour model's heatmap over ``coords``, from the checker's known colours: the
    patch at cell (r, c) is the cell's colour, mixed with white glass where it runs past
    the slide's edge."""
    width, height = slide.dimensions
    rows, cols = -(-height // step), -(-width // step)
    heat = np.zeros((rows, cols))
    for x, y in coords:
        r, c = y // step, x // step
        inside = (min(width - x, step) / step) * (min(height - y, step) / step)
        rgb = inside * np.array(cell_colour(r, c)) / 255.0 + (1 - inside) * 1.0
        heat[r, c] = colour_probability(rgb)
    return heat


@pytest.fixture(scope="module")
def colour_files(tmp_path_factory):
    """The colour model as .keras, ONNX and OpenVINO IR (converted once)."""
    from h2g.export.conversion import signature, to_onnx, to_openvino

    folder = tmp_path_factory.mktemp("colour")
    model = colour_model()
    onnx_path = to_onnx(model, signature(model, "colour"), folder / "colour.onnx")
    return model, onnx_path, to_openvino(onnx_path, folder / "colour.xml")


# ---------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("engine", ["keras", "onnxruntime", "openvino", "openvino-throughput"])
def test_heatmap_cells_land_where_patches_were_read(checker, colour_files, engine):
    model, onnx_path, xml_path = colour_files
    backend = {"keras": lambda: KerasBackend(model),
               "onnxruntime": lambda: OnnxRuntimeBackend(onnx_path),
               "openvino": lambda: OpenVINOBackend(xml_path, precision="f32"),
               "openvino-throughput": lambda: OpenVINOBackend(xml_path, precision="f32", threads=2,
                                                              hint="throughput")}[engine]()
    timings: dict = {}
    heat = slide_heatmap(checker, backend, patch_size=PATCH, batch_size=3, readers=2,
                         progress=False, timings=timings)
    from h2g.tiling.grid import build_patch_grid

    grid = build_patch_grid(checker, tissue=heat.tissue, patch_size=PATCH)
    assert heat.step == CELL and heat.grid_shape == (4, 5)
    assert len(grid.coords) >= 12  # every full cell is tissue
    np.testing.assert_allclose(heat.probs, expected_heatmap(checker, grid.coords, CELL), atol=1e-5)
    assert timings["patches"] == heat.n_patches == len(grid.coords)
    for stage in ("tissue", "reading", "inference", "waiting", "patch_pipeline", "stitching"):
        assert timings[stage] >= 0


def test_half_stride_centres_one_patch_on_each_finer_cell(checker, colour_files):
    """Stride PATCH/2: cells half a patch wide, each valued by the patch centred on it,
    which straddles up to four checker cells (and white glass past the edge); the
    expected value is the colour model on the area-weighted mean colour of that
    footprint, computed here from the checker's colours."""
    from h2g.tiling.grid import build_patch_grid

    heat = slide_heatmap(checker, KerasBackend(colour_files[0]), patch_size=PATCH, stride=PATCH // 2,
                         batch_size=5, progress=False)
    step = CELL // 2
    width, height = checker.dimensions
    assert heat.step == step and heat.grid_shape == (-(-height // step), -(-width // step))
    cells = build_patch_grid(checker, tissue=heat.tissue, patch_size=PATCH // 2)
    assert heat.n_patches == len(cells.coords) > 40
    expected = np.zeros(heat.grid_shape)
    for x, y in cells.coords:
        left, top = x + step // 2 - CELL // 2, y + step // 2 - CELL // 2  # the centred patch
        total = np.zeros(3)
        for r in range(-1, 5):
            for c in range(-1, 6):  # overlap of the footprint with each checker cell (and glass)
                x0, x1 = max(left, c * CELL), min(left + CELL, (c + 1) * CELL)
                y0, y1 = max(top, r * CELL), min(top + CELL, (r + 1) * CELL)
                if x1 <= x0 or y1 <= y0:
                    continue
                on_slide = 0 <= r and 0 <= c and (c * CELL < width) and (r * CELL < height)
                # the part of this checker cell inside the slide, the rest is glass
                sx1, sy1 = min(x1, width), min(y1, height)
                inside = max(0, sx1 - x0) * max(0, sy1 - y0) if on_slide else 0
                rgb = np.array(cell_colour(r, c)) / 255.0 if on_slide else np.ones(3)
                total += inside * rgb + ((x1 - x0) * (y1 - y0) - inside) * np.ones(3)
        expected[y // step, x // step] = colour_probability(total / CELL ** 2)
    np.testing.assert_allclose(heat.probs, expected, atol=1e-5)


def test_a_stride_equal_to_the_patch_is_the_papers_grid_and_bad_strides_are_refused(checker, colour_files):
    backend = KerasBackend(colour_files[0])
    a = slide_heatmap(checker, backend, patch_size=PATCH, progress=False)
    b = slide_heatmap(checker, backend, patch_size=PATCH, stride=PATCH, progress=False)
    assert a.step == b.step and np.array_equal(a.probs, b.probs)
    for bad in (0, PATCH + 1, 2.5):
        with pytest.raises(ConfigError, match="stride"):
            slide_heatmap(checker, backend, patch_size=PATCH, stride=bad, progress=False)


def test_cells_outside_the_tissue_mask_stay_zero(checker, colour_files):
    model = colour_files[0]
    full = detect_tissue(checker)
    half = full.mask.copy()
    half[:, : half.shape[1] // 2] = False  # tissue on the right half only
    heat = slide_heatmap(checker, KerasBackend(model), tissue=TissueMask(half, full.downsample),
                         patch_size=PATCH, progress=False)
    cols = heat.grid_shape[1]
    left = int(np.floor(half.shape[1] / 2 * full.downsample / CELL))
    assert np.all(heat.probs[:, :left] == 0)
    assert np.all(heat.probs[:3, cols - 2] > 0)


def test_heatmap_is_the_same_whatever_the_batch_size_and_reader_count(checker, colour_files):
    backend = OnnxRuntimeBackend(colour_files[1])
    a = slide_heatmap(checker, backend, patch_size=PATCH, batch_size=1, readers=1, progress=False)
    b = slide_heatmap(checker, backend, patch_size=PATCH, batch_size=7, readers=3, progress=False)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)  # batch size changes summation order only


def test_patch_reader_queue_is_bounded_and_covers_every_patch(checker):
    coords = np.array([[x, y] for y in range(0, 3 * CELL, CELL) for x in range(0, 4 * CELL, CELL)])
    with PatchReader(checker, coords, magnification=10, patch_size=PATCH, batch_size=5,
                     readers=2, depth=1) as reader:
        seen = {}
        for start, batch in reader:
            assert reader.pending <= 1  # read or being read, not yet handed out
            assert batch.dtype == np.float32 and batch.shape[1:] == (PATCH, PATCH, 3)
            seen[start] = batch
    assert sorted(seen) == list(range(0, len(coords), 5))
    first = seen[0][0]
    np.testing.assert_allclose(first[0, 0], np.array(cell_colour(0, 0)) / 255.0, atol=1e-6)


class _Recording:
    """A slide that records which threads read it."""

    def __init__(self, slide):
        self._slide, self.threads = slide, set()

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_region(self, *args):
        import threading

        self.threads.add(threading.current_thread().name)
        return self._slide.read_region(*args)


def test_patch_reader_reads_on_the_shared_pool_the_patches_of_read_region(checker):
    from h2g.data.readers import reader_pool

    coords = np.array([[x, y] for y in range(0, 3 * CELL, CELL) for x in range(0, 5 * CELL, CELL)])
    slide = _Recording(checker)
    with PatchReader(slide, coords, magnification=10, patch_size=PATCH, batch_size=4, readers=3) as reader:
        got = dict(reader)
    assert reader.read_seconds > 0
    assert slide.threads and all(name.startswith("h2g-reader3") for name in slide.threads)
    assert {t.name for t in reader_pool(3)._threads} >= slide.threads  # the training readers' pool
    for start, batch in got.items():
        for i, (x, y) in enumerate(coords[start:start + 4]):
            expected = checker.read_region((int(x), int(y)), (PATCH, PATCH), 10) * np.float32(1 / 255)
            np.testing.assert_array_equal(batch[i], expected)
    assert sorted(got) == list(range(0, len(coords), 4))


def test_patch_reader_stops_reading_when_closed_early(checker):
    coords = np.zeros((400, 2), np.int64)
    slide = _Recording(checker)
    with PatchReader(slide, coords, magnification=10, patch_size=PATCH, batch_size=1, readers=2,
                     depth=2) as reader:
        next(iter(reader))
    assert reader.pending == 0


def test_reader_errors_reach_the_consumer(checker):
    coords = np.array([[0, 0], [10 ** 7, 10 ** 7]])  # the second lies outside the slide
    with pytest.raises(Exception, match="outside the slide"):
        with PatchReader(checker, coords, magnification=10, patch_size=PATCH, batch_size=1) as reader:
            list(reader)


# ---------------------------------------------------------------------------- refinement inputs
def test_heatmap_raster_places_cells_on_the_level0_extent():
    # one row of two cells of 1000 px on a 2500 x 1000 slide: the third, partial column
    # is not covered (0); output pixel centres are at (i + 0.5) * 50 level-0 px
    heat = Heatmap(probs=np.array([[1.0, 1.0]], np.float32), step=1000)
    out = heatmap_raster(heat, (2500, 1000), 50)
    x = (np.arange(50) + 0.5) * 50
    # linear between the cell centres 1500 (value 1) and 2500 (value 0), flat before
    expected = np.clip(1.0 - (x - 1500) / 1000, 0, 1)
    assert out.shape == (50, 50)
    np.testing.assert_allclose(out, np.broadcast_to(expected, (50, 50)), atol=1e-5)


def test_heatmap_raster_keeps_rows_and_columns_apart():
    probs = np.zeros((2, 2), np.float32)
    probs[1, 0] = 1.0  # bottom-left cell
    out = heatmap_raster(Heatmap(probs=probs, step=100), (200, 200), 4)
    # each output pixel is the centre of one quadrant of its cell: bilinear weights 3/4, 1/4
    expected = np.array([[0, 0, 0, 0], [0.25, 0.1875, 0.0625, 0], [0.75, 0.5625, 0.1875, 0], [1, 0.75, 0.25, 0]])
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_refinement_image_is_the_lowest_level_with_enough_pixels(tmp_path):
    path = make_slide(tmp_path / "noise.tiff", size=(2048, 2048), pattern="noise",
                      compression=None, downsamples=(1, 4, 16))
    with Slide(path) as slide:
        assert lowres_level(slide, 128) == 2 and lowres_level(slide, 256) == 1
        assert lowres_level(slide, 4096) == 0
        for size, level in ((512, 1), (128, 2)):
            image, heat = refinement_inputs(slide, None, size=size)
            assert image.shape == (size, size, 3) and image.dtype == np.float32
            np.testing.assert_allclose(image, slide.read_level(level) / 255.0, atol=1e-6)
            assert heat.shape == (size, size, 1) and not heat.any()
        image, _ = refinement_inputs(slide, None, size=256)
        level1 = slide.read_level(1).astype(np.float32) / 255.0
        resized = np.stack([np.asarray(Image.fromarray(level1[..., c], "F").resize((256, 256), Image.BILINEAR))
                            for c in range(3)], -1)
        np.testing.assert_allclose(image, resized, atol=1e-6)


def test_refine_feeds_image_and_heatmap_by_name(checker):
    size = 64
    backend = KerasBackend(threshold_refiner(size))
    image = np.zeros((size, size, 3), np.float32)
    heat = np.zeros((size, size, 1), np.float32)
    heat[10:20, 30:40] = 1.0
    prob = refine(backend, image, heat)
    assert prob.shape == (size, size)
    np.testing.assert_array_equal(prob > 0.5, heat[..., 0] > 0.5)


# ---------------------------------------------------------------------------- backends
def test_backends_report_what_they_run_with(colour_files):
    model, onnx_path, xml_path = colour_files
    ort = make_backend(onnx_path, threads=1)
    assert ort.info() | {"model": ""} == {"engine": "onnxruntime", "version": ort.version, "device": "CPU",
                                          "threads": 1, "precision": "f32", "model": "", "inputs": ["image"],
                                          "hint": "latency", "streams": 1, "sub_batch": None,
                                          "providers": ["CPUExecutionProvider"]}
    ov = make_backend(xml_path, precision="f32", threads=1)
    assert (ov.name, ov.device, ov.precision, ov.threads) == ("openvino", "CPU", "f32", 1)
    default = OpenVINOBackend(onnx_path)  # OpenVINO reads ONNX too; it picks its precision
    assert default.precision in ("f32", "bf16", "f16")
    keras_backend = make_backend(model)
    assert (keras_backend.name, keras_backend.precision, keras_backend.input_names) == ("keras", "f32", ("image",))


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_throughput_hint_splits_batches_over_streams_in_order(colour_files, engine):
    """Sub-batches run concurrently on the streams; every row comes back in its place."""
    path = colour_files[2] if engine == "openvino" else colour_files[1]
    precision = "f32" if engine == "openvino" else None
    backend = make_backend(path, engine=engine, precision=precision, threads=2, hint="throughput")
    info = backend.info()
    assert (info["hint"], info["streams"], info["sub_batch"]) == ("throughput", 2, 1)  # 11 sub-batches of 1
    rng = np.random.default_rng(1)
    means = rng.random((11, 3), np.float32)  # one flat colour per patch: 11 different answers
    batch = np.broadcast_to(means[:, None, None, :], (11, PATCH, PATCH, 3)).copy()
    for n in (11, 1):
        np.testing.assert_allclose(backend.predict(batch[:n])[:, 1], colour_probability(means[:n]), atol=1e-5)
    cls = OpenVINOBackend if engine == "openvino" else OnnxRuntimeBackend
    fives = cls(path, threads=2, precision=precision, hint="throughput", sub_batch=5)
    np.testing.assert_allclose(fives.predict(batch)[:, 1], colour_probability(means), atol=1e-5)
    latency = make_backend(path, engine=engine, threads=2)
    assert (latency.info()["hint"], latency.streams, latency.info()["sub_batch"]) == ("latency", 1, None)
    with pytest.raises(ConfigError, match="hint must be one of latency, throughput"):
        make_backend(path, engine=engine, hint="fast")
    with pytest.raises(ConfigError, match="sub_batch must be >= 1"):
        cls(path, hint="throughput", sub_batch=0)


def test_the_main_networks_sub_batch_is_an_engine_option_and_a_cli_flag(colour_files):
    """``--patch-sub-batch N`` reaches the main network's backend (throughput hint) and no
    other; a size below 1, or one with the latency hint (which has no sub-batches), is
    refused in one line.  Any size gives the same per-patch answers."""
    import argparse

    from h2g.export.deploy import add_deploy_arguments, deployment
    from h2g.inference.segmenter import EngineOptions

    _, _, xml_path = colour_files
    options = EngineOptions(precision="f32", threads=2, sub_batch=4)
    main, other = options.backend(xml_path, main=True), options.backend(xml_path)
    assert (main.info()["hint"], main.info()["sub_batch"]) == ("throughput", 4)
    assert (other.info()["hint"], other.info()["sub_batch"]) == ("latency", None)
    assert EngineOptions(precision="f32", threads=2).backend(xml_path, main=True).info()["sub_batch"] == 1
    rng = np.random.default_rng(2)
    means = rng.random((9, 3), np.float32)
    batch = np.broadcast_to(means[:, None, None, :], (9, PATCH, PATCH, 3)).copy()
    np.testing.assert_allclose(main.predict(batch)[:, 1], colour_probability(means), atol=1e-5)
    with pytest.raises(ConfigError, match="sub_batch must be >= 1, got 0"):
        EngineOptions(sub_batch=0)
    with pytest.raises(ConfigError, match="applies to the throughput hint"):
        EngineOptions(hint="latency", sub_batch=4)

    parser = argparse.ArgumentParser()
    add_deploy_arguments(parser)
    plan = deployment(parser.parse_args(["--patch-sub-batch", "8"]), [xml_path])
    assert plan.engine.sub_batch == 8 and plan.engine.to_dict()["sub_batch"] == 8
    assert deployment(parser.parse_args([]), [xml_path]).engine.sub_batch is None


def test_backends_agree_on_real_patches(real_data, colour_files):
    model, onnx_path, xml_path = colour_files
    paths = sorted((real_data / "camelyon16_patches" / "tumor").glob("*.png"))[:6]
    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((PATCH, PATCH))) for p in paths])
    batch = batch.astype(np.float32) / 255.0
    expected = colour_probability(batch.mean(axis=(1, 2)))
    for backend in (KerasBackend(model), OnnxRuntimeBackend(onnx_path), OpenVINOBackend(xml_path, precision="f32")):
        np.testing.assert_allclose(backend.predict(batch)[:, 1], expected, atol=1e-5)


def test_bad_inputs_give_clear_errors(tmp_path, colour_files, monkeypatch):
    model, onnx_path, xml_path = colour_files
    with pytest.raises(ExportError, match="model file not found"):
        make_backend(tmp_path / "missing.onnx")
    with pytest.raises(ExportError, match="expected a .onnx"):
        OnnxRuntimeBackend(xml_path)
    lone_xml = tmp_path / "lone.xml"
    lone_xml.write_text(xml_path.read_text())
    with pytest.raises(ExportError, match="weights file lone.bin is missing"):
        OpenVINOBackend(lone_xml)
    with pytest.raises(ConfigError, match="never AUTO"):
        OpenVINOBackend(xml_path, device="AUTO")
    with pytest.raises(ConfigError, match="engine must be one of"):
        make_backend(onnx_path, engine="tensorrt")
    with pytest.raises(ExportError, match="not a model file"):
        make_backend(tmp_path / "model.pt")
    with pytest.raises(ExportError, match="has inputs \\['image'\\], but was given \\['heatmap'\\]"):
        OnnxRuntimeBackend(onnx_path).predict({"heatmap": np.zeros((1, PATCH, PATCH, 3), np.float32)})
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="ONNX Runtime cannot load"):
        OnnxRuntimeBackend(corrupt)
    with pytest.raises(ExportError, match="no CUDA or TensorRT execution provider"):
        OnnxRuntimeBackend(onnx_path, device="GPU")
    with pytest.raises(ExportError, match="provider tensorrt requested but ONNX Runtime has no TensorrtExecutionProvider"):
        OnnxRuntimeBackend(onnx_path, device="GPU", provider="tensorrt")
    with pytest.raises(ConfigError, match="use it with device GPU"):
        OnnxRuntimeBackend(onnx_path, provider="cuda")
    with pytest.raises(ConfigError, match="needs engine onnxruntime, not openvino"):
        make_backend(xml_path, provider="cuda")


def test_tensorrt_batches_are_padded_to_the_largest_seen(colour_files):
    """With TensorRT first among the providers, a smaller batch is padded with zeros to
    the largest batch seen (one engine for every batch), and only its own rows come back:
    the same probabilities as unpadded (run here on the CPU provider)."""
    _, onnx_path, _ = colour_files
    plain = OnnxRuntimeBackend(onnx_path, threads=1)
    trt = OnnxRuntimeBackend(onnx_path, threads=1)
    trt.providers = ("TensorrtExecutionProvider", "CPUExecutionProvider")
    seen = []
    run = trt._run
    trt._run = lambda feed: seen.append(len(feed["image"])) or run(feed)
    batches = [np.random.default_rng(k).random((n, PATCH, PATCH, 3), np.float32) for k, n in enumerate((4, 3, 1, 4))]
    for batch in batches:
        np.testing.assert_allclose(trt.predict(batch), plain.predict(batch), atol=1e-6)
    assert seen == [4, 4, 4, 4]


def test_gpu_providers_by_name(tmp_path, monkeypatch):
    """Which ONNX Runtime providers each --provider asks for, from a list of available
    ones (no GPU needed): TensorRT comes with CUDA behind it and its engine cache."""
    from h2g.inference.backends import gpu_providers

    monkeypatch.setenv("H2G_TRT_CACHE", str(tmp_path / "trt"))
    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt"),
                                         "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path / "trt")})
    assert gpu_providers(both) == gpu_providers(both, "auto") == [trt, "CUDAExecutionProvider"]
    assert gpu_providers(both, "tensorrt") == [trt, "CUDAExecutionProvider"]
    assert gpu_providers(both, "cuda") == ["CUDAExecutionProvider"]
    assert gpu_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "auto") == ["CUDAExecutionProvider"]
    assert (tmp_path / "trt").is_dir()
    with pytest.raises(ExportError, match="no TensorrtExecutionProvider \\(available: CUDAExecutionProvider"):
        gpu_providers(["CUDAExecutionProvider"], "tensorrt")
    with pytest.raises(ExportError, match="no CUDA or TensorRT"):
        gpu_providers(["CPUExecutionProvider"], "auto")
    with pytest.raises(ConfigError, match="provider must be one of auto, tensorrt, cuda"):
        gpu_providers(both, "rocm")


def test_models_with_other_input_names_are_refused(tmp_path, checker, colour_files):
    from dataclasses import replace

    from h2g.export.conversion import signature, to_onnx

    model = colour_files[0]
    foreign = to_onnx(model, replace(signature(model, "m"), names=("pixels",)), tmp_path / "foreign.onnx")
    backend = OnnxRuntimeBackend(foreign)
    assert backend.input_names == ("pixels",)
    with pytest.raises(ExportError, match="wrong input names \\['pixels'\\] for a patch classifier"):
        slide_heatmap(checker, backend, patch_size=PATCH, progress=False)
    with pytest.raises(ExportError, match="wrong input names .* for a refinement network"):
        refine(backend, np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 1), np.float32))


def test_missing_engine_is_a_clear_error(monkeypatch, colour_files):
    import builtins

    real_import = builtins.__import__

    def no_engines(name, *args, **kwargs):
        if name in ("onnxruntime", "openvino"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_engines)
    with pytest.raises(ExportError, match="engine onnxruntime is not installed"):
        OnnxRuntimeBackend(colour_files[1])
    with pytest.raises(ExportError, match="engine openvino is not installed"):
        OpenVINOBackend(colour_files[2])


@pytest.mark.slow
def test_backends_report_the_fixed_image_size_of_a_model(tmp_path):
    """segment_slide/benchmark take the refinement resolution from the model itself."""
    import keras

    from h2g import models
    from h2g.inference.backends import KerasBackend, OnnxRuntimeBackend

    refiner = models.build("unet", input_size=256, width=0.05)
    assert KerasBackend(refiner).image_size == 256
    inputs = keras.Input((None, None, 3), name="image")
    flexible = keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="softmax")(inputs))
    assert KerasBackend(flexible).image_size is None
    from h2g.export.conversion import signature, to_onnx

    path = to_onnx(refiner, signature(refiner, tmp_path / "r.keras"), tmp_path / "r.onnx")
    assert OnnxRuntimeBackend(path).image_size == 256
