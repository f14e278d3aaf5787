"""export/benchmark.py on a sliding-window model: a tiny DMMN-M3 (three views x20, x10,
x5) exported to ONNX with its metadata, timed on a small synthetic slide without
TensorFlow; the window count checked against a window grid computed here."""
from __future__ import annotations

import json

import pytest
from synthetic import make_slide
from helpers import run_script

from h2g.data.views import View
from h2g.io.slide import Slide
from h2g.tiling.tissue import detect_tissue
from h2g.tiling.windows import window_grid

SIZE = 64  # every view's side (px)
STRIDE = 32  # target-view (x20) px: windows overlap by half
WINDOW_FIELDS = {
    "slide", "dimensions", "system", "design", "segmenter", "unit", "count", "views", "target_view", "classes",
    "stride", "keep", "blend", "windows", "raster", "batch_size", "readers", "warmup", "repeats", "engine",
    "version", "device", "threads", "precision", "backends", "stages", "per_second", "total_per_second",
    "read_only_s", "inference_only_s", "pipeline_s", "pipeline_efficiency", "peak_memory_mib", "host", "runs",
    "ceiling", "reader",
}
STAGES = ("tissue", "reading", "inference", "waiting", "stitching", "window_pipeline", "total")


@pytest.fixture(scope="module")
def dmmn_onnx(tmp_path_factory):
    """A tiny DMMN-M3 (3 classes) as ONNX carrying DMMN metadata (views at 20x, 10x, 5x)."""
    import keras

    from h2g.export.conversion import signature, to_onnx
    from h2g.inference.metadata import ModelMetadata, embed_onnx
    from h2g.models import build

    keras.utils.set_random_seed(0)
    model = build("dmmn_m3", n_classes=3, input_size=SIZE, width=0.125)
    views = (View("x20", 20.0, SIZE), View("x10", 10.0, SIZE), View("x5", 5.0, SIZE))
    classes = [{"name": n, "colour": c} for n, c in (("tumour", [200, 0, 0]), ("stroma", [0, 150, 0]),
                                                     ("glass", [120, 120, 120]))]
    meta = ModelMetadata(system="dmmn", design="dmmn_m3", role="segmentation", views=views, classes=classes,
                         output="pixel_probs", extras={"target": "x20"})
    path = tmp_path_factory.mktemp("dmmn") / "dmmn_m3.onnx"
    return embed_onnx(to_onnx(model, signature(model, "dmmn_m3", meta), path), meta)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    """A 40x slide of 1024 x 768 px with one tissue block (a window at 20x spans 128 px)."""
    return make_slide(tmp_path_factory.mktemp("slide") / "block.tiff", size=(1024, 768),
                      tissue=(256, 192, 384, 256), compression=None, downsamples=(1, 4))


@pytest.mark.slow
def test_benchmark_times_a_multi_view_sliding_window_model(dmmn_onnx, small_slide, tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    done = run_script("benchmark.py", "--slide", small_slide, "--model", dmmn_onnx, "--engine", "onnxruntime",
                      "--stride", STRIDE, "--repeats", 2, "--batch-size", 8, "--readers", 2, "--threads", 1,
                      "--json", out_json, "--markdown", out_md, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out_json.read_text())
    assert set(result) == WINDOW_FIELDS

    with Slide(small_slide) as slide:  # independently: the windows over tissue at 20x, stride 32
        expected = window_grid(slide, magnification=20.0, size=SIZE, stride=STRIDE, tissue=detect_tissue(slide))
    assert result["windows"] == result["count"] == len(expected) > 0
    assert all(run["windows"] == len(expected) for run in result["runs"])
    # progress on stderr: the warm-up's count and time first, then each timed pass
    said = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith(("warm-up", "timed"))]
    assert said[0].startswith(f"warm-up: {len(expected)} windows in ") and said[1:] == ["timed pass 1 of 2",
                                                                                        "timed pass 2 of 2"]

    assert (result["system"], result["design"], result["target_view"]) == ("dmmn", "dmmn_m3", "x20")
    assert [(v["name"], v["magnification"], v["size"]) for v in result["views"]] == [
        ("x20", 20.0, SIZE), ("x10", 10.0, SIZE), ("x5", 5.0, SIZE)]
    assert (result["stride"], result["keep"], result["blend"]) == (STRIDE, STRIDE, "centre")
    assert result["classes"] == ["tumour", "stroma", "glass"] and result["raster"]["downsample"] == 2.0
    assert (result["engine"], result["threads"]) == ("onnxruntime", 1)
    assert result["repeats"] == 2 and len(result["runs"]) == 2 and result["warmup"] == 1

    stages = result["stages"]
    assert set(stages) == set(STAGES)
    for name in STAGES:
        assert set(stages[name]) == {"mean", "sd"} and stages[name]["mean"] >= 0 and stages[name]["sd"] >= 0
    for run in result["runs"]:  # reading is busy time summed over the reader threads
        assert run["reading"] <= result["readers"] * run["total"]
        for name in ("tissue", "inference", "waiting", "stitching", "window_pipeline"):
            assert 0 <= run[name] <= run["total"]
    assert stages["total"]["mean"] >= stages["tissue"]["mean"] + stages["window_pipeline"]["mean"]

    assert result["per_second"]["mean"] == pytest.approx(
        sum(result["windows"] / r["window_pipeline"] for r in result["runs"]) / 2)
    assert result["read_only_s"] > 0 and result["inference_only_s"] > 0
    assert result["pipeline_s"] == pytest.approx(stages["window_pipeline"]["mean"])
    assert result["pipeline_efficiency"] == pytest.approx(
        (result["read_only_s"] + result["inference_only_s"]) / result["pipeline_s"])
    assert result["peak_memory_mib"] > 10

    table = out_md.read_text()
    assert table.startswith("# Runtime of sliding-window segmentation (DMMN dmmn_m3)")
    assert "| Engine | Device | Precision | Threads | Windows | Windows/s | Total |" in table
    assert f"{result['windows']} windows" in table and "x5 64 px at 5x" in table
    assert "pipeline efficiency" in table and "±" in table


@pytest.mark.slow
def test_sliding_window_options_are_refused_for_h2g_and_peer_for_windows(dmmn_onnx, small_slide, tmp_path):
    peer = run_script("benchmark.py", "--slide", small_slide, "--model", dmmn_onnx, "--engine", "onnxruntime",
                      "--repeats", 1, "--peer", "fast", tmp_path=tmp_path)
    assert peer.returncode == 2 and "--peer fast times H2G-Net's patch classifier" in peer.stderr
    assert "Traceback" not in peer.stderr
    both = run_script("benchmark.py", "--slide", small_slide, "--model", dmmn_onnx, "--patch-model", dmmn_onnx,
                      "--refine-model", dmmn_onnx, "--repeats", 1, tmp_path=tmp_path)
    assert both.returncode == 2 and "either as arguments or with --patch-model" in both.stderr
