"""Export: Keras -> ONNX / OpenVINO with parity, the TensorFlow-free deployment CLI, the
GeoJSON outline, the runtime benchmark and the FAST pipeline.

Tiny versions of every architecture are converted after :func:`make_nondegenerate`, so
that their outputs depend on the input (a randomly initialised network outputs ~0.5
everywhere, which would make parity trivially true).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, REPO
from PIL import Image
from synthetic import make_slide
from helpers import PATCH, REFINE_SIZE, Recorder, colour_model, context_metadata, context_segmenter, expected_labels, make_block_slide, run_script, threshold_refiner

from h2g.core.cli import run_cli
from h2g.core.errors import ConfigError, ExportError
from h2g.export.conversion import (
    convert_model,
    export_model,
    parity_inputs,
    signature,
    to_onnx,
    to_openvino,
)
from h2g.inference.backends import KerasBackend
from h2g.inference.heatmap import slide_heatmap
from h2g.inference.lowres import refinement_inputs
from h2g.io.slide import Slide

TINY = {
    "mobilenetv2": dict(input_size=64, alpha=0.35),
    "inceptionv3": dict(input_size=75, width=0.1),
    "unet": dict(input_size=256, width=1 / 16),
    "unet_lr": dict(input_size=256, width=1 / 16),
    "agunet": dict(input_size=256, width=1 / 16),
    "dagunet": dict(input_size=256, width=1 / 16),
    "doubleunet": dict(input_size=256, width=1 / 16, aspp_filters=4),
}
def keras_args(model, feed: dict):
    """``feed`` in the structure ``model`` is called with."""
    if isinstance(model.input, dict):
        return feed
    if isinstance(model.input, list):
        return [feed[t.name] for t in model.inputs] if len(model.inputs) > 1 else [feed["image"]]
    return feed["image"]


def make_nondegenerate(model, feed: dict) -> None:
    """Give a randomly initialised ``model`` outputs that depend on ``feed`` while keeping
    it well conditioned: BatchNorm means from ``feed`` (variances from ``feed`` plus 1,
    so no channel is amplified), then the output layer's kernel scaled up until the
    tumour probabilities over ``feed`` span at least 0.2."""
    import keras

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(keras_args(model, feed), training=True)
    for layer in norms:
        layer.momentum = 0.99
        weights = layer.get_weights()
        weights[-1] = weights[-1] + 1.0  # moving variance
        layer.set_weights(weights)
    last = [layer for layer in model._flatten_layers() if getattr(layer, "kernel", None) is not None][-1]
    for _ in range(8):
        probs = np.asarray(model(keras_args(model, feed), training=False))[..., 1]
        if np.ptp(probs) >= 0.2:
            return
        weights = last.get_weights()
        weights[0] = weights[0] * 4.0
        last.set_weights(weights)


@pytest.fixture(scope="module")
def parity_slide(tmp_path_factory):
    """The real CMU slide when present, else a synthetic textured slide."""
    real = REAL_DATA / "slides" / "cmu_small_region.svs"
    path = real if real.is_file() else make_slide(tmp_path_factory.mktemp("parity") / "noise.tiff",
                                                  size=(4096, 3072), pattern="noise")
    with Slide(path) as slide:
        yield slide


# ---------------------------------------------------------------------------- conversion
def _check_onnx_file(path: Path, names: list[str], opset: int) -> None:
    import onnx

    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == names
    for tensor in model.graph.input:  # dynamic batch: no fixed first dimension
        assert not tensor.type.tensor_type.shape.dim[0].HasField("dim_value")
    assert any(op.domain in ("", "ai.onnx") and op.version == opset for op in model.opset_import)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.slow
def test_every_architecture_converts_with_parity(name, parity_slide, tmp_path):
    import keras

    from h2g import models

    keras.utils.set_random_seed(0)
    model = models.build(name, **TINY[name])
    feed, _ = parity_inputs(signature(model, name), parity_slide)
    make_nondegenerate(model, feed)
    entry = export_model(model, tmp_path, name, parity_slide)  # (saving and loading: the CLI tests)
    parity = entry["parity"]
    low, high = parity["keras_output_range"]
    assert high - low > 0.05 and not parity["constant_output"], "degenerate outputs make parity meaningless"
    assert parity["passed"], parity
    assert parity["onnxruntime"]["max_abs_diff"] <= 1e-4
    assert parity["openvino_f32"]["max_abs_diff"] <= 1e-4 and parity["openvino_f32"]["precision"] == "f32"
    assert parity["openvino_default"]["max_abs_diff"] is not None
    expected_inputs = ["image", "heatmap"] if name in ("unet", "agunet", "dagunet", "doubleunet") else ["image"]
    assert list(entry["inputs"]) == expected_inputs
    _check_onnx_file(Path(entry["onnx"]), expected_inputs, 17)
    assert Path(entry["openvino"]).is_file() and Path(entry["openvino"]).with_suffix(".bin").is_file()


@pytest.mark.slow
def test_cluster_model_converts_with_identical_ids(parity_slide, tmp_path):
    import keras

    from h2g.export.conversion import parity_patches
    from h2g.training.clustering import build_cluster_model, fit_stats

    keras.utils.set_random_seed(0)
    patches = keras.Input((64, 64, 3), name="patches")
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(patches)
    extractor = keras.Model(patches, keras.layers.GlobalAveragePooling2D()(x), name="tiny_features")
    sample = parity_patches(parity_slide, 64)  # the parity inputs: every cluster has one of them
    stats = fit_stats(extractor.predict(sample, verbose=0), n_clusters=3, seed=0, n_init=2)
    build_cluster_model(stats, extractor).save(tmp_path / "cluster.keras")
    entry = convert_model(tmp_path / "cluster.keras", tmp_path, parity_slide)
    assert entry["kind"] == "cluster" and entry["output"] == "clusters"
    parity = entry["parity"]
    assert parity["keras_output_range"][1] > parity["keras_output_range"][0], "a single cluster proves nothing"
    assert parity["passed"], parity
    for engine in ("onnxruntime", "openvino_f32"):
        assert parity[engine]["mismatches"] == 0


@pytest.mark.slow
def test_convert_cli_on_a_run_folder(parity_slide, tmp_path, capsys):
    from convert import main as convert_main  # export/ is put on sys.path below

    run = tmp_path / "run"
    (run / "classifier").mkdir(parents=True)
    colour_model().save(run / "classifier" / "model.keras")
    threshold_refiner(REFINE_SIZE).save(run / "refiner.keras")
    out = tmp_path / "exported"
    argv = [run, "--out", out, "--fp16", "--opset", 13, "--slide", parity_slide.path, "--quiet"]
    assert run_cli(convert_main, list(map(str, argv))) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] and report["opset"] == 13 and len(report["models"]) == 2
    kinds = {Path(m["keras"]).name: m for m in report["models"]}
    assert kinds["model.keras"]["kind"] == "classifier" and kinds["refiner.keras"]["kind"] == "refinement"
    for suffix in (".onnx", ".xml", ".bin", "_fp16.xml", "_fp16.bin"):
        assert (out / "classifier" / f"model{suffix}").is_file()
        assert (out / f"refiner{suffix}").is_file()
    _check_onnx_file(out / "refiner.onnx", ["image", "heatmap"], 13)
    fp16 = kinds["refiner.keras"]["parity"]["openvino_fp16_ir"]
    assert fp16["max_abs_diff"] is not None
    assert "report:" in capsys.readouterr().out

    # a parity failure is loud: exit 2, one line naming the models and the report
    code = run_cli(convert_main, list(map(str, [run / "refiner.keras", "--slide", parity_slide.path,
                                                "--tolerance", "-1", "--quiet"])))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: parity check failed") and "refiner.keras" in err
    assert "\n" not in err
    assert json.loads((run / "conversion_report.json").read_text())["passed"] is False


def test_convert_refuses_bad_inputs(parity_slide, tmp_path, capsys):
    import keras
    from convert import main as convert_main

    assert run_cli(convert_main, [str(tmp_path / "nothing"), "--slide", str(parity_slide.path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli(convert_main, [str(tmp_path / "empty"), "--slide", str(parity_slide.path)]) == 2
    assert "no .keras models found" in capsys.readouterr().err
    img, heat = keras.Input((8, 8, 3), name="img"), keras.Input((8, 8, 1), name="heat")
    out = keras.layers.Conv2D(2, 1, activation="softmax")(keras.layers.Concatenate()([img, heat]))
    keras.Model([img, heat], out).save(tmp_path / "badnames.keras")
    with pytest.raises(ExportError, match="wrong input names"):
        convert_model(tmp_path / "badnames.keras", tmp_path, parity_slide)
    (tmp_path / "corrupt.keras").write_bytes(b"not a zip")
    assert run_cli(convert_main, [str(tmp_path / "corrupt.keras"), "--slide", str(parity_slide.path)]) == 2
    assert "cannot load the Keras model" in capsys.readouterr().err


# ---------------------------------------------------------------------------- deployment
def _valid_ring(ring, width, height) -> bool:
    pts = np.asarray(ring, float)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]))
    return (len(ring) >= 4 and ring[0] == ring[-1] and area > 0
            and x.min() >= 0 and y.min() >= 0 and x.max() <= width and y.max() <= height)


def _polygons(geojson: dict) -> list:
    polys = []
    for feature in geojson["features"]:
        geometry = feature["geometry"]
        polys += [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return polys


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_segment_slide_runs_without_tensorflow_and_matches_keras(engine, checker_path, deploy_models, tmp_path):
    patch_model, patch_onnx, patch_xml = deploy_models["patch"]
    refine_onnx, refine_xml = deploy_models["refine"][1:]
    models = (patch_onnx, refine_onnx) if engine == "onnxruntime" else (patch_xml, refine_xml)
    out = tmp_path / "out"
    extra = ["--precision", "f32"] if engine == "openvino" else []
    extra += ["--geojson-origin", "bounds"] if engine == "openvino" else []  # the checker slide has no bounds
    done = run_script("segment_slide.py", checker_path, "--patch-model", models[0], "--refine-model", models[1],
                      "--engine", engine, "--device", "CPU", "--out", out, "--patch-size", PATCH,
                      "--size", REFINE_SIZE, "--batch-size", 4, "--quiet", *extra, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "no_tensorflow")})
    assert "tensorflow is not installed here" in probe.stderr

    with Slide(checker_path) as slide:
        expected = slide_heatmap(slide, KerasBackend(patch_model), patch_size=PATCH, progress=False)
        _, heat = refinement_inputs(slide, expected, size=REFINE_SIZE)
        width, height = slide.dimensions
        mpp = slide.mpp
    np.testing.assert_allclose(np.load(out / "heatmap.npy"), expected.probs, atol=1e-4)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["backends"]["patch_classifier"]["engine"] == engine and summary["patches"] == expected.n_patches
    mask = np.asarray(Image.open(out / "segmentation.png")) > 127
    assert mask.shape == (REFINE_SIZE, REFINE_SIZE)
    np.testing.assert_array_equal(mask, heat[..., 0] > 0.5)  # the threshold refiner's segmentation
    assert 0 < mask.mean() < 1

    geojson = json.loads((out / "tumour.geojson").read_text())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == 1
    feature = geojson["features"][0]
    assert feature["properties"]["classification"]["name"] == "Tumor"
    assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
    polygons = _polygons(geojson)
    assert polygons and all(_valid_ring(r, width, height) for p in polygons for r in p)
    assert feature["properties"]["coordinateOrigin"] == "level0" and "originOffset" not in feature["properties"]
    # the QuPath round trip: tumour.geojson read back as an annotation is the segmentation again
    from h2g.io.annotation import load_annotation

    with Slide(checker_path) as slide:
        back = load_annotation(out / "tumour.geojson", slide).sample(
            0, 0, width / REFINE_SIZE, height / REFINE_SIZE, REFINE_SIZE, REFINE_SIZE) == 1
    assert (back & mask).sum() / (back | mask).sum() >= 0.99

    for name in ("heatmap.tiff", "segmentation.tiff"):
        with Slide(out / name) as overlay:  # OpenSlide opens it; aspect ratio of the slide
            w, h = overlay.dimensions
            assert max(w, h) == REFINE_SIZE and abs(w / h - width / height) < 0.02
            assert overlay.mpp == pytest.approx(mpp * width / w, rel=0.01)


@pytest.mark.slow
def test_refiner_metadata_carries_the_heatmap_stride_to_deployment(checker_path, deploy_models, tmp_path):
    """A refinement net trained on half-stride heatmaps records the stride; segment_slide.py
    then cuts the heatmap at that stride unless --heatmap-stride overrides it (a warning)."""
    import shutil

    from h2g.inference.metadata import embed_onnx, h2g_refinement_metadata

    patch_model, patch_onnx, _ = deploy_models["patch"]
    refine_onnx = tmp_path / "refine_stride.onnx"
    shutil.copy(deploy_models["refine"][1], refine_onnx)
    meta = h2g_refinement_metadata(REFINE_SIZE, design="mob_pw_unet", heatmap_stride=PATCH // 2)
    assert meta.extras["heatmap_stride"] == PATCH // 2
    assert "heatmap_stride" not in h2g_refinement_metadata(REFINE_SIZE, heatmap=False, heatmap_stride=8).extras
    embed_onnx(refine_onnx, meta)
    common = ("--patch-model", patch_onnx, "--refine-model", refine_onnx, "--engine", "onnxruntime",
              "--patch-size", PATCH, "--batch-size", 4, "--quiet")
    with Slide(checker_path) as slide:
        fine = slide_heatmap(slide, KerasBackend(patch_model), patch_size=PATCH, stride=PATCH // 2, progress=False)
        coarse = slide_heatmap(slide, KerasBackend(patch_model), patch_size=PATCH, progress=False)
    assert fine.grid_shape[0] > coarse.grid_shape[0]
    done = run_script("segment_slide.py", checker_path, *common, "--out", tmp_path / "a", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "a" / "heatmap.npy"), fine.probs, atol=1e-4)
    done = run_script("segment_slide.py", checker_path, *common, "--heatmap-stride", PATCH, "--out", tmp_path / "b",
                      tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "heatmap stride 32 overrides the 16 the refinement network was trained on" in done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "b" / "heatmap.npy"), coarse.probs, atol=1e-4)
    # the benchmark times the pipeline as deployed: the refiner's stride, every one of its patches
    bench = tmp_path / "bench.json"
    done = run_script("benchmark.py", "--slide", checker_path, *common[:-1], "--repeats", 1, "--json", bench,
                      tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(bench.read_text())
    assert result["heatmap_stride"] == PATCH // 2 and result["patches"] == fine.n_patches


@pytest.mark.slow
def test_segment_slide_reports_bad_input_in_one_line(checker_path, deploy_models, tmp_path):
    patch_onnx, patch_xml = deploy_models["patch"][1:]
    missing = run_script("segment_slide.py", checker_path, "--patch-model", tmp_path / "nope.onnx",
                         "--refine-model", patch_onnx, "--engine", "onnxruntime", "--out", tmp_path / "o",
                         tmp_path=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nope.onnx: model file not found")
    swapped = run_script("segment_slide.py", checker_path, "--patch-model", patch_onnx, "--refine-model",
                         patch_onnx, "--engine", "onnxruntime", "--out", tmp_path / "o", "--patch-size", PATCH,
                         "--size", PATCH, "--quiet", tmp_path=tmp_path)  # a classifier as the refinement net
    assert swapped.returncode == 2 and "an image-only network (UNet-LR) takes no patch classifier" in swapped.stderr
    assert len(swapped.stderr.strip().splitlines()) == 1
    wrong_size = run_script("segment_slide.py", checker_path, "--patch-model", patch_onnx, "--refine-model",
                            deploy_models["refine"][1], "--engine", "onnxruntime", "--out", tmp_path / "o",
                            "--patch-size", PATCH, "--size", 2 * REFINE_SIZE, "--quiet", tmp_path=tmp_path)
    assert wrong_size.returncode == 2 and "refinement size 128 differs from the 64" in wrong_size.stderr
    assert len(wrong_size.stderr.strip().splitlines()) == 1
    window_options = run_script("segment_slide.py", checker_path, "--patch-model", patch_onnx, "--refine-model",
                                deploy_models["refine"][1], "--engine", "onnxruntime", "--out", tmp_path / "o",
                                "--stride", 64, "--quiet", tmp_path=tmp_path)
    assert window_options.returncode == 2
    assert window_options.stderr.strip().endswith("--stride does not apply to H2G-Net")
    xml_with_ort = run_script("segment_slide.py", checker_path, "--patch-model", patch_xml, "--refine-model",
                              patch_xml, "--engine", "onnxruntime", "--out", tmp_path / "o", tmp_path=tmp_path)
    assert xml_with_ort.returncode == 2 and "expected a .onnx model file" in xml_with_ort.stderr
    gpu = run_script("segment_slide.py", checker_path, "--patch-model", patch_onnx, "--refine-model",
                     patch_onnx, "--engine", "onnxruntime", "--device", "GPU", "--out", tmp_path / "o",
                     tmp_path=tmp_path)
    assert gpu.returncode == 2 and "device GPU requested" in gpu.stderr and "Traceback" not in gpu.stderr
    ov_gpu = run_script("segment_slide.py", checker_path, "--patch-model", patch_xml, "--refine-model",
                        patch_xml, "--engine", "openvino", "--device", "GPU", "--out", tmp_path / "o",
                        tmp_path=tmp_path)  # without TensorFlow: OpenVINO may probe GPUs safely
    assert ov_gpu.returncode == 2 and "OpenVINO cannot use a GPU" in ov_gpu.stderr
    assert len(ov_gpu.stderr.strip().splitlines()) == 1


def test_geojson_outlines_regions_holes_and_single_pixels():
    from h2g.io.geojson import tumour_geojson

    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:8] = True
    mask[4:6, 4:6] = False  # a hole
    mask[15, 15] = True  # a single pixel
    mask[18, 2:11] = True  # a one-pixel line
    geojson = json.loads(json.dumps(tumour_geojson(mask, (2000, 4000))))  # 100 x 200 level-0 px per pixel
    assert geojson["features"][0]["geometry"]["type"] == "MultiPolygon"
    polygons = _polygons(geojson)
    assert len(polygons) == 3
    assert all(_valid_ring(r, 2000, 4000) for p in polygons for r in p)
    square, pixel, line = sorted(polygons, key=lambda p: np.asarray(p[0])[:, 1].min())  # top to bottom
    assert sorted(map(tuple, pixel[0][:-1])) == [(1500, 3000), (1500, 3200), (1600, 3000), (1600, 3200)]
    assert np.asarray(line[0]).min(axis=0).tolist() == [200, 3600]
    assert np.asarray(line[0]).max(axis=0).tolist() == [1100, 3800]
    assert len(square) == 2  # exterior + the hole
    exterior, hole = np.asarray(square[0]), np.asarray(square[1])
    # the outlines follow the pixel edges: pixels 2..7 -> level-0 x 200..800, y 400..1600; hole 4..5 -> 400..600, 800..1200
    assert exterior.min(axis=0).tolist() == [200, 400] and exterior.max(axis=0).tolist() == [800, 1600]
    assert hole.min(axis=0).tolist() == [400, 800] and hole.max(axis=0).tolist() == [600, 1200]
    assert tumour_geojson(np.zeros((4, 4), bool), (10, 10)) == {"type": "FeatureCollection", "features": []}
    single = tumour_geojson(mask[:10, :10], (1000, 1000))
    assert single["features"][0]["geometry"]["type"] == "Polygon"


# ---------------------------------------------------------------------------- benchmark
BENCH_FIELDS = {
    "slide", "dimensions", "system", "design", "segmenter", "unit", "count", "patches", "grid_shape",
    "magnification", "patch_size", "batch_size", "readers", "refinement_size", "warmup", "repeats", "engine",
    "version", "device", "threads", "precision", "backends", "stages", "per_second", "total_per_second",
    "read_only_s", "inference_only_s", "pipeline_s", "pipeline_efficiency", "refinement_share",
    "peak_memory_mib", "host", "runs", "peer", "patch_wise_per_second", "ceiling", "reader", "heatmap_stride",
}


def test_benchmark_writes_every_field(checker_path, deploy_models, tmp_path):
    patch_xml, refine_xml = deploy_models["patch"][2], deploy_models["refine"][2]
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    done = run_script("benchmark.py", "--slide", checker_path, "--patch-model", patch_xml, "--refine-model",
                      refine_xml, "--engine", "openvino", "--device", "CPU", "--repeats", 1, "--json", out_json,
                      "--markdown", out_md, "--threads", 1, "--precision", "f32", "--patch-size", PATCH,
                      "--size", REFINE_SIZE, "--batch-size", 4, "--peer", "fast", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out_json.read_text())
    assert set(result) == BENCH_FIELDS
    assert (result["engine"], result["device"], result["threads"], result["precision"]) == ("openvino", "CPU", 1, "f32")
    assert result["repeats"] == 1 and len(result["runs"]) == 1 and result["patches"] > 0
    assert result["heatmap_stride"] == PATCH  # no stride in the models' metadata: the paper's grid
    for stage in ("tissue", "reading", "inference", "stitching", "patch_pipeline", "patch_wise", "refinement", "total"):
        assert set(result["stages"][stage]) == {"mean", "sd"} and result["stages"][stage]["mean"] >= 0
    stages = result["stages"]
    assert stages["total"]["mean"] >= stages["patch_pipeline"]["mean"] + stages["refinement"]["mean"]
    assert result["pipeline_efficiency"] == pytest.approx(
        (result["read_only_s"] + result["inference_only_s"]) / result["pipeline_s"])
    assert result["peak_memory_mib"] > 10
    c = result["ceiling"]  # the ceiling from the stages timed alone in this run
    assert c["ceiling_s"] == pytest.approx(max(result["read_only_s"], result["inference_only_s"],
                                               (c["read_only_cpu_s"] + c["inference_only_cpu_s"]) / c["cores"]))
    assert c["fraction_of_ceiling"] == pytest.approx(c["ceiling_s"] / result["pipeline_s"])
    assert result["reader"] == "tiles"
    fast_installed = subprocess.run([sys.executable, "-c", "import fast"], capture_output=True).returncode == 0
    if not fast_installed:
        assert "skipped" in result["peer"] and "pip install pyfast" in result["peer"]["skipped"]
        assert "peer FAST skipped" in done.stderr
    elif "skipped" not in result["peer"]:  # FAST ran: its own patch count and timings
        peer = result["peer"]
        assert peer["patches"] > 0 and len(peer["runs"]) == 1 and peer["per_second"]["mean"] > 0
        assert "ours is" in out_md.read_text()
    pw = result["patch_wise_per_second"]["mean"]
    assert pw == pytest.approx(result["patches"] / result["runs"][0]["patch_wise"])
    table = out_md.read_text()
    assert "| Engine | Device | Precision | Threads | Patches | Patches/s | Patch-wise | Refinement | Total |" in table
    assert "pipeline efficiency" in table and "±" in table and "of the ceiling" in table


def test_benchmark_json_on_stdout_and_gpu_absent(checker_path, deploy_models, tmp_path):
    patch_onnx, refine_onnx = deploy_models["patch"][1], deploy_models["refine"][1]
    common = ["--slide", checker_path, "--patch-model", patch_onnx, "--refine-model", refine_onnx,
              "--engine", "onnxruntime", "--repeats", 1, "--patch-size", PATCH, "--size", REFINE_SIZE]
    done = run_script("benchmark.py", *common, "--json", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["engine"] == "onnxruntime"
    gpu = run_script("benchmark.py", *common, "--device", "GPU", tmp_path=tmp_path)
    assert gpu.returncode == 2 and "device GPU requested" in gpu.stderr and "Traceback" not in gpu.stderr


# ---------------------------------------------------------------------------- FAST
FPL_KEYWORDS = {"PipelineName", "PipelineDescription", "PipelineInputData", "PipelineOutputData",
                "ProcessObject", "Renderer", "View", "Attribute", "Input"}


def parse_fpl(text: str) -> dict:
    """A minimal reader of FAST's text pipeline syntax: {object id: {"type", "attributes",
    "inputs"}} plus the pipeline's header lines and attributes; fails on any unknown
    keyword or on an input from an undefined object or pipeline input."""
    objects: dict = {}
    header: dict = {}
    inputs: set = set()  # pipeline input data, e.g. the slide
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            current = None if not line else current
            continue
        keyword, _, rest = line.partition(" ")
        assert keyword in FPL_KEYWORDS, f"unknown keyword in {line!r}"
        if keyword == "ProcessObject":
            name, kind = rest.split()
            objects[name] = {"type": kind, "attributes": {}, "inputs": {}}
            current = name
        elif keyword == "Attribute":
            key, _, value = rest.partition(" ")
            target = objects[current]["attributes"] if current else header.setdefault("Attribute", {})
            target[key] = value
        elif keyword == "Input":
            port, source, *out_port = rest.split()
            assert source in objects or source in inputs, f"input from undefined object {source!r}"
            objects[current]["inputs"][int(port)] = (source, int(out_port[0]) if out_port else 0)
        else:
            header.setdefault(keyword, []).append(rest)
            if keyword == "PipelineInputData":
                inputs.add(rest.split()[0])
    return {"objects": objects, "header": header}


def test_fast_pipeline_names_both_models_and_the_paper_parameters(deploy_models, tmp_path, capsys):
    from fast_pipeline import main as fpl_main

    patch_onnx, refine_onnx = deploy_models["patch"][1], deploy_models["refine"][1]
    out = tmp_path / "h2g.fpl"
    assert run_cli(fpl_main, ["--patch-model", str(patch_onnx), "--refine-model", str(refine_onnx),
                              "--out", str(out)]) == 0
    fpl = parse_fpl(out.read_text())
    objects = fpl["objects"]
    types = {o["type"] for o in objects.values()}
    assert {"TissueSegmentation", "PatchGenerator", "NeuralNetwork", "PatchStitcher",
            "ImagePyramidLevelExtractor", "SegmentationNetwork"} <= types
    assert fpl["header"]["PipelineInputData"] == ['WSI "Whole-slide image"']
    assert objects["patch"]["inputs"][0] == ("WSI", 0) and objects["lowRes"]["inputs"][0] == ("WSI", 0)
    assert objects["tissueSeg"]["attributes"]["color-thresholding"] == "true"  # offline
    patch = objects["patch"]["attributes"]
    assert patch["patch-size"] == "256 256" and patch["patch-magnification"] == "10"
    assert patch["mask-threshold"] == "0.25"
    # FAST's OpenVINO engine (the default) runs batch-1 copies written beside the pipeline
    patch_copy, refine_copy = (tmp_path / f"{m.stem}_batch1.xml" for m in (patch_onnx, refine_onnx))
    assert objects["network"]["attributes"]["model"] == f'"{patch_copy.resolve()}"'
    assert objects["network"]["attributes"]["inference-engine"] == "OpenVINO"
    assert float(objects["network"]["attributes"]["scale-factor"]) == pytest.approx(1 / 255)
    refinement = objects["refinement"]
    assert refinement["attributes"]["model"] == f'"{refine_copy.resolve()}"'
    # input 0 = the low-resolution image in [0, 1], input 1 = the tumour channel of the heatmap
    assert objects[refinement["inputs"][0][0]]["type"] == "IntensityNormalization"
    heatmap = objects[refinement["inputs"][1][0]]
    assert heatmap["type"] == "TensorToImage" and heatmap["attributes"]["channels"] == "1"
    assert any(o.startswith("segmentation refinement") for o in fpl["header"]["PipelineOutputData"])
    assert run_cli(fpl_main, ["--patch-model", str(tmp_path / "missing.onnx"), "--refine-model",
                              str(refine_onnx), "--out", str(out)]) == 2
    assert "missing.onnx: model file not found" in capsys.readouterr().err


def test_fast_batch_one_copies_predict_like_the_original(deploy_models, tmp_path):
    """The copies FAST's OpenVINO engine runs have batch 1 and the original's outputs;
    FAST's ONNX Runtime engine gets the original files."""
    import openvino as ov
    from fast_pipeline import main as fpl_main

    from h2g.export.fast import batch_one_copy

    patch_onnx, refine_onnx = deploy_models["patch"][1], deploy_models["refine"][1]
    copy = batch_one_copy(patch_onnx, tmp_path)
    core = ov.Core()
    shapes = [list(i.get_partial_shape().to_shape()) for i in core.read_model(str(copy)).inputs]
    original = core.read_model(str(patch_onnx)).inputs[0].get_partial_shape()
    assert shapes == [[1, *[d.get_length() for d in original[1:]]]]
    x = np.random.default_rng(0).random((1, *shapes[0][1:]), np.float32)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    want = core.compile_model(str(patch_onnx), "CPU", f32)(x)[0]
    np.testing.assert_allclose(core.compile_model(str(copy), "CPU", f32)(x)[0], want, atol=1e-6)
    out = tmp_path / "ort" / "h2g.fpl"
    assert run_cli(fpl_main, ["--patch-model", str(patch_onnx), "--refine-model", str(refine_onnx),
                              "--out", str(out), "--engine", "onnxruntime"]) == 0
    network = parse_fpl(out.read_text())["objects"]["network"]["attributes"]
    assert network["model"] == f'"{patch_onnx.resolve()}"' and network["inference-engine"] == "ONNXRuntime"
    assert not list(out.parent.glob("*_batch1.*"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="junk.onnx: cannot make a batch-1 copy"):
        batch_one_copy(tmp_path / "junk.onnx", tmp_path)


# ---------------------------------------------------------------------------- any-input export
@pytest.mark.slow
def test_multi_view_model_exports_with_parity_and_deploys_from_its_metadata(tmp_path):
    """A 3-class two-view segmentation model: ONNX / OpenVINO parity on real views, its
    metadata in both files, and segment_slide.py run with the model and the slide only."""
    import keras

    from h2g.inference.metadata import write_sidecar

    keras.utils.set_random_seed(0)
    slide_path = make_block_slide(tmp_path / "blocks.tiff")
    model_path = tmp_path / "run" / "context.keras"
    model_path.parent.mkdir()
    context_segmenter().save(model_path)
    write_sidecar(model_path, context_metadata())
    with Slide(slide_path) as slide:
        entry = convert_model(model_path, tmp_path / "exported", slide)
    parity = entry["parity"]
    assert parity["passed"] and not parity["constant_output"], parity
    assert parity["onnxruntime"]["max_abs_diff"] <= 1e-4 and parity["openvino_f32"]["max_abs_diff"] <= 1e-4
    assert entry["metadata_source"].startswith("sidecar") and "views hi 64px at 10x, ctx 64px at 2.5x" in entry[
        "parity_inputs"]
    assert set(entry["inputs"]) == {"hi", "ctx"} and entry["kind"] == "segmentation"
    _check_onnx_file(Path(entry["onnx"]), list(entry["inputs"]), 17)

    want = expected_labels(4)
    expected = np.where(want >= 0, want + 1, 0).astype(np.uint8)  # 0 = glass, not segmented
    for engine, model in (("onnxruntime", entry["onnx"]), ("openvino", entry["openvino"])):
        out = tmp_path / engine
        extra = ["--precision", "f32"] if engine == "openvino" else []
        # --keep-ink: the green blocks are a class here, not pen ink
        done = run_script("segment_slide.py", model, "--slide", slide_path, "--out", out, "--engine", engine,
                          "--quiet", "--keep-ink", *extra, tmp_path=tmp_path)
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(np.asarray(Image.open(out / "labels.png")), expected)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["raster"] == {"shape": [384, 768], "downsample": 4.0, "extent": [3072, 1536], "mpp": 1.0}
        assert [c["name"] for c in summary["classes"]] == ["Red", "Green", "Blue"] and not summary["no_tissue"]
        assert np.load(out / "probabilities.npy").shape == (384, 768, 3)
        names = {f["properties"]["classification"]["name"] for f in
                 json.loads((out / "classes.geojson").read_text())["features"]}
        assert names == {"Red", "Green", "Blue"}
        # the QuPath round trip: classes.geojson read back (partial: outside = 255) is the label image again
        from h2g.io.annotation import load_annotation
        from h2g.io.classes import ClassTable

        table = ClassTable.of([("Red", 1), ("Green", 2), ("Blue", 3)], ignore=[0])
        with Slide(slide_path) as slide:
            back = load_annotation(out / "classes.geojson", slide, downsample=4, classes=table).labels[:384, :768]
        for k in range(3):
            a, b = back == k, expected == k + 1
            assert (a & b).sum() / (a | b).sum() >= 0.99
        with Slide(out / "labels.tiff") as labels:  # overlays the slide: same physical size
            assert labels.dimensions == (768, 384) and labels.mpp == pytest.approx(1.0)
    # a magnification the model was not trained at: refused in one line, run only with --force
    refused = run_script("segment_slide.py", entry["onnx"], "--slide", slide_path, "--out", tmp_path / "o5",
                         "--engine", "onnxruntime", "--magnification", 5, "--quiet", tmp_path=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "magnification 5 differs from the 10 the model was trained at" in refused.stderr
    assert "--force" in refused.stderr and not (tmp_path / "o5").exists()
    overridden = run_script("segment_slide.py", entry["onnx"], "--slide", slide_path, "--out", tmp_path / "o5",
                            "--engine", "onnxruntime", "--magnification", 5, "--force", "--quiet", tmp_path=tmp_path)
    assert overridden.returncode == 0, overridden.stderr
    assert "magnification 5 overrides the model's 10" in overridden.stderr
    assert json.loads((tmp_path / "o5" / "summary.json").read_text())["raster"]["downsample"] == 8.0


def test_convert_says_when_metadata_was_inferred(parity_slide, tmp_path):
    colour_model().save(tmp_path / "classifier.keras")
    entry = convert_model(tmp_path / "classifier.keras", tmp_path, parity_slide)
    assert entry["metadata_source"].startswith("inferred")
    assert entry["metadata"]["role"] == "patch_classifier"
    assert entry["metadata"]["views"] == [{"name": "image", "magnification": 10.0, "size": PATCH,
                                           "padding": "white"}]
    from h2g.inference.backends import OnnxRuntimeBackend

    assert OnnxRuntimeBackend(entry["onnx"]).metadata.role == "patch_classifier"


# ---------------------------------------------------------------------------- deployment fixes
class _Fake:
    """A deployment backend with fixed outputs: patch probabilities ``(B, 2)`` or a
    refinement map ``(1, S, S, 2)`` of one tumour probability; ``broken`` fails if run."""

    name, source, version, device, threads, precision, metadata = "fake", "fake", "0", "CPU", 1, "f32", None
    image_size = None

    def __init__(self, names, value: float, broken: bool = False):
        self.input_names, self.value, self.broken = tuple(names), value, broken

    def require_inputs(self, allowed, role, required=("image",)):
        pass

    def info(self):
        return {"engine": "fake"}

    def predict(self, inputs):
        assert not self.broken, "this model must not run"
        if isinstance(inputs, np.ndarray):
            return np.tile(np.float32([1 - self.value, self.value]), (len(inputs), 1))
        size = inputs["image"].shape[1]
        out = np.full((1, size, size, 2), self.value, np.float32)
        out[..., 0] = 1 - self.value
        return out


def h2g_segmenter(patch, refiner, **options):
    from h2g.systems.h2g.segmenter import H2GOptions, H2GSegmenter

    return H2GSegmenter({"patch_classifier": patch, "refinement": refiner}, H2GOptions(**options))


def test_deployment_thresholds_like_evaluation(checker_path):
    from h2g.evaluation.metrics import binarise

    with Slide(checker_path) as slide:
        for value in (0.5, np.nextafter(np.float32(0.5), np.float32(1))):
            seg = h2g_segmenter(_Fake(["image"], 0.9), _Fake(["image", "heatmap"], value), size=16,
                                patch_size=PATCH).segment(slide)
            assert (seg.prob == np.float32(value)).all()
            np.testing.assert_array_equal(seg.mask, binarise(seg.prob))
            assert seg.mask.all() == (value > 0.5) and not seg.no_tissue  # a tie at 0.5 is non-tumour


def test_a_slide_without_tissue_warns_and_says_so(tmp_path, caplog):

    from h2g.data.views import View
    from h2g.inference.metadata import ModelMetadata
    from h2g.inference.segmenter import SlidingSegmenter

    glass = make_slide(tmp_path / "glass.tiff", size=(1024, 768), tissue=(0, 0, 0, 0), compression=None)
    with Slide(glass) as slide, caplog.at_level("WARNING"):
        h2g = h2g_segmenter(_Fake(["image"], 0.9), _Fake(["image", "heatmap"], 0.9, broken=True), size=16,
                            patch_size=PATCH)  # refinement would fail the test if run
        seg = h2g.segment(slide)
        paths = h2g.write(seg, slide, tmp_path / "h2g")
        meta = ModelMetadata(role="segmentation", views=(View("image", 10, 32),), output="pixel_probs")
        sliding = SlidingSegmenter({"segmentation": Recorder(["image"], 32, classes=3)},
                                   metadata={"segmentation": meta})
        windows = sliding.segment(slide)
        raster_paths = sliding.write(windows, slide, tmp_path / "sliding")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all(str(glass) in w and "no tissue" in w for w in warnings)
    assert seg.no_tissue and not seg.mask.any()
    summary = json.loads(paths["summary"].read_text())
    assert summary["no_tissue"] is True and summary["tissue"] == 0 and summary["tumour_fraction"] == 0
    assert not np.asarray(Image.open(paths["segmentation_png"])).any()
    assert json.loads(paths["geojson"].read_text())["features"] == []
    assert windows.no_tissue and not windows.raster.covered.any()
    summary = json.loads(raster_paths["summary"].read_text())
    assert summary["no_tissue"] is True and summary["windows"] == 0
    assert not np.asarray(Image.open(raster_paths["labels_png"])).any()


def test_the_geojson_origin_is_a_typed_option_of_every_segmenter(checker_path, tmp_path):
    """--geojson-origin reaches the library as SegmentOptions.geojson_origin (every system's
    options): "bounds" writes coordinates in QuPath's frame cropped to the slide's OpenSlide
    bounds, records it in each feature, and reading the file back undoes it."""
    import argparse

    from h2g.data.views import View
    from h2g.export.deploy import SEGMENT_SETTINGS, add_deploy_arguments
    from h2g.inference.metadata import ModelMetadata
    from h2g.inference.segmenter import SegmentOptions, SlidingSegmenter, WindowOptions
    from h2g.io.annotation import load_annotation
    from h2g.systems.h2g.segmenter import H2GOptions

    parser = argparse.ArgumentParser()
    add_deploy_arguments(parser)
    assert parser.parse_args([]).geojson_origin is None and "geojson_origin" in SEGMENT_SETTINGS
    assert parser.parse_args(["--geojson-origin", "bounds"]).geojson_origin == "bounds"
    assert H2GOptions.given("H2G-Net", geojson_origin="bounds").geojson_origin == "bounds"
    assert WindowOptions.given("sliding window", geojson_origin=None).geojson_origin == "level0"
    with pytest.raises(ConfigError, match="GeoJSON origin must be one of level0, bounds, got 'qupath'"):
        SegmentOptions(geojson_origin="qupath")

    with Slide(checker_path) as slide:
        width, height = slide.dimensions
        slide.bounds_offset = (120, 40)  # as an MRXS slide's openslide.bounds-x / -y
        h2g = h2g_segmenter(_Fake(["image"], 0.9), _Fake(["image", "heatmap"], 0.9), size=16, patch_size=PATCH,
                            geojson_origin="bounds")
        seg = h2g.segment(slide)
        feature = json.loads(h2g.write(seg, slide, tmp_path / "h2g")["geojson"].read_text())["features"][0]
        assert feature["properties"]["coordinateOrigin"] == "bounds"
        assert feature["properties"]["originOffset"] == [120.0, 40.0]
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert ring.min(axis=0).tolist() == [-120, -40] and ring.max(axis=0).tolist() == [width - 120, height - 40]
        back = load_annotation(tmp_path / "h2g" / "tumour.geojson", slide).sample(
            0, 0, width / 16, height / 16, 16, 16)
        assert (back == 1).all()  # the whole slide is tumour again, in level-0 pixels
        meta = ModelMetadata(role="segmentation", views=(View("image", 10, 32),), output="pixel_probs")
        for origin, props in (("level0", {"coordinateOrigin": "level0"}),
                              ("bounds", {"coordinateOrigin": "bounds", "originOffset": [120.0, 40.0]})):
            sliding = SlidingSegmenter({"segmentation": Recorder(["image"], 32, classes=3)},
                                       WindowOptions(geojson_origin=origin), metadata={"segmentation": meta})
            paths = sliding.write(sliding.segment(slide), slide, tmp_path / origin)
            (feature,) = json.loads(paths["geojson"].read_text())["features"]
            assert {k: feature["properties"].get(k) for k in props} == props
            assert ("originOffset" in feature["properties"]) == (origin == "bounds")


def test_a_failing_writer_leaves_no_partial_output(checker_path, monkeypatch, tmp_path):
    import h2g.io.overlay

    with Slide(checker_path) as slide:
        segmenter = h2g_segmenter(_Fake(["image"], 0.9), _Fake(["image", "heatmap"], 0.9), size=16, patch_size=PATCH)
        seg = segmenter.segment(slide)
        write_outputs = segmenter.write
        out = tmp_path / "out"
        before = write_outputs(seg, slide, out)["heatmap_tiff"].read_bytes()

        def broken(path, *args, **kw):
            Path(path).write_bytes(b"half a TIFF")
            raise OSError("disk full")

        monkeypatch.setattr(h2g.io.overlay, "write_pyramid", broken)
        with pytest.raises(OSError, match="disk full"):
            write_outputs(seg, slide, out)
        with pytest.raises(OSError, match="disk full"):
            write_outputs(seg, slide, tmp_path / "fresh")
    assert (out / "heatmap.tiff").read_bytes() == before  # the old file, untouched
    assert not (tmp_path / "fresh" / "heatmap.tiff").exists()
    assert not [p for p in (out, tmp_path / "fresh") for p in p.iterdir() if ".tmp" in p.name]


def test_heatmap_overlay_is_the_pipeline_figure(checker_path, tmp_path):
    """h2g.io.overlay.write_heatmap_overlay draws what the pipeline's figure drew: the
    heatmap in inferno, nearest-resized, blended 0.45 over the smallest level."""
    from matplotlib import cm

    from h2g.io.overlay import write_heatmap_overlay

    probs = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    with Slide(checker_path) as slide:
        path = write_heatmap_overlay(tmp_path / "overlay.png", slide, probs)
        thumb = Image.fromarray(slide.read_level(slide.level_count - 1))
    heat = Image.fromarray((cm.inferno(probs)[..., :3] * 255).astype(np.uint8)).resize(thumb.size, Image.NEAREST)
    expected = np.asarray(Image.blend(thumb.convert("RGB"), heat, 0.45))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


@pytest.fixture(autouse=True, scope="module")
def _export_on_path():
    """Make the export/ CLIs importable (their `main`s run in-process in some tests)."""
    sys.path.insert(0, str(REPO / "export"))
    yield
    sys.path.remove(str(REPO / "export"))


def test_ceiling_of_a_perfectly_overlapped_pipeline():
    from h2g.export.benchmark import Timed, ceiling

    def timed(wall, cpu):
        t = Timed()
        t.wall, t.cpu = wall, cpu
        return t

    # reading 4 s on 1 core (4 CPU s), inference 6 s on 2 cores (12 CPU s): the cores
    # need (4 + 12) / 2 = 8 s for both, more than either stage alone
    c = ceiling(800, timed(4.0, 4.0), timed(6.0, 12.0), pipeline_s=10.0, cores=2)
    assert c["ceiling_s"] == 8.0 and c["ceiling_per_s"] == 100.0 and c["pipeline_per_s"] == 80.0
    assert c["fraction_of_ceiling"] == 0.8 and c["read_only_per_s"] == 200.0
    # an idle core: the slower stage bounds it
    assert ceiling(800, timed(4.0, 4.0), timed(6.0, 6.0), pipeline_s=6.0, cores=4)["fraction_of_ceiling"] == 1.0
