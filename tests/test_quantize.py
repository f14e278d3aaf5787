"""INT8 post-training quantisation (``export/convert.py --int8``): calibration drawn from the
run's training slides only and repeatable for a seed; NNCF and ONNX Runtime int8 models
that stay close to f32 and say they are int8; the accuracy guard's Dice against a numpy
Dice of the deployment outputs; a failing guard removes the int8 files, keeps the f32
models and fails the conversion with one clear line.

The models are hand-set, so their outputs are far from constant: a "darkness" patch
classifier (3x3 convolution, ReLU, average, dense) and the threshold refiner of
``test_inference``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import dice, run_script, threshold_refiner

from h2g.core.cli import run_cli
from h2g.core.errors import ConfigError
from h2g.export import quantize
from h2g.inference.metadata import h2g_patch_metadata, h2g_refinement_metadata, write_sidecar
from h2g.inference.backends import OnnxRuntimeBackend, OpenVINOBackend
from h2g.io.manifest import load_manifest
from h2g.io.slide import Slide

pytest.importorskip("nncf")

PATCH = 64
MAGNIFICATION = 10.0
REFINE = 64


def darkness_model(size: int = PATCH):
    """Tumour probability rising as the patch gets darker: a 3x3 mean of the grey level
    (a convolution NNCF quantises), ReLU, global average, softmax([0, 8 (0.78 - grey)])."""
    import keras

    image = keras.Input((size, size, 3), name="image")
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")
    grey = keras.layers.GlobalAveragePooling2D()(conv(image))
    dense = keras.layers.Dense(2, activation="softmax", name="classification")
    out = dense(grey)
    kernel = np.zeros((3, 3, 3, 4), np.float32)
    for k in range(4):
        kernel[..., k] = (1.0 + 0.25 * k) / 27.0  # channel k = (1 + k/4) * grey
    conv.set_weights([kernel, np.zeros(4, np.float32)])
    weights = np.zeros((4, 2), np.float32)
    weights[:, 1] = -8.0 / 4 / np.array([1.0, 1.25, 1.5, 1.75])
    dense.set_weights([weights, np.array([0.0, 8.0 * 0.78], np.float32)])
    return keras.Model(image, out, name="darkness")


@pytest.fixture(scope="module")
def run_folder(tiny_cohort, tmp_path_factory) -> Path:
    """A run folder as the pipeline writes it: config.json naming the manifest, and the
    two models with their metadata sidecars."""
    run = tmp_path_factory.mktemp("run") / "mob_pw_unet"
    models = run / "models"
    models.mkdir(parents=True)
    darkness_model().save(models / "patch_classifier.keras")
    write_sidecar(models / "patch_classifier.keras", h2g_patch_metadata(PATCH, MAGNIFICATION, design="mob_pw_unet"))
    threshold_refiner(REFINE).save(models / "refiner.keras")
    write_sidecar(models / "refiner.keras", h2g_refinement_metadata(REFINE, design="mob_pw_unet"))
    (run / "config.json").write_text(json.dumps({"manifest": str(tiny_cohort), "seed": 3,
                                                 "refine": {"size": REFINE}}))
    return run


@pytest.fixture(scope="module")
def converted(run_folder, tiny_cohort):
    """The f32 conversion of the run (no int8) and its report entries."""
    from h2g.export.conversion import convert

    with Slide(load_manifest(tiny_cohort).split("train")[0].slide_path) as slide:
        report = convert([run_folder], slide, progress=False)
    return json.loads(report.read_text())["models"]


def test_calibration_is_repeatable_and_reads_training_slides_only(run_folder, tiny_cohort, monkeypatch):
    data = quantize.run_data(run_folder / "models" / "patch_classifier.keras", quantize.Int8Options())
    assert data.seed == 3 and data.manifest_path == tiny_cohort  # from the run's config.json
    manifest = load_manifest(tiny_cohort)
    train = {str(r.slide_path) for r in manifest.split("train")}
    opened = []
    import h2g.io.slide as slide_module

    real_open = slide_module.open_slide
    monkeypatch.setattr(slide_module, "open_slide", lambda path, **kw: opened.append(str(path)) or real_open(path, **kw))
    from h2g.systems.h2g.segmenter import H2GSegmenter

    meta = h2g_patch_metadata(PATCH, MAGNIFICATION)
    image = {"image": [None, PATCH, PATCH, 3]}
    first, described = H2GSegmenter.calibration_feeds("patch_classifier", meta, image, data.train, 40, data.seed)
    again, _ = H2GSegmenter.calibration_feeds("patch_classifier", meta, image, data.train, 40, data.seed)
    other, _ = H2GSegmenter.calibration_feeds("patch_classifier", meta, image, data.train, 40, 4)
    assert set(opened) <= train and len(set(opened)) == len(train)  # every training slide, nothing else
    assert len(first) == 40 and first[0]["image"].shape == (1, PATCH, PATCH, 3) and first[0]["image"].dtype == np.uint8
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    assert "40 tissue patches" in described and "seed 3" in described


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
@pytest.mark.slow
def test_int8_models_stay_close_to_f32_and_say_so(engine, converted, run_folder):
    entry = next(e for e in converted if e["metadata"]["role"] == "patch_classifier")
    data = quantize.run_data(Path(entry["keras"]), quantize.Int8Options())
    from h2g.systems.h2g.segmenter import H2GSegmenter

    meta = h2g_patch_metadata(PATCH, MAGNIFICATION)
    feeds, _ = H2GSegmenter.calibration_feeds("patch_classifier", meta, {"image": [None, PATCH, PATCH, 3]}, data.train,
                                              60, data.seed)
    if engine == "openvino":
        path = quantize.quantize_openvino(Path(entry["openvino"]), feeds, meta, data.seed)
        f32, int8 = OpenVINOBackend(entry["openvino"], precision="f32"), OpenVINOBackend(path, precision="f32")
    else:
        path = quantize.quantize_onnx(Path(entry["onnx"]), feeds, meta, data.seed)
        f32, int8 = OnnxRuntimeBackend(entry["onnx"]), OnnxRuntimeBackend(path)
    assert path.name == f"patch_classifier_int8{path.suffix}"
    batch = np.concatenate([quantize.as_model_input(f)["image"] for f in feeds[:30]])
    expected, got = f32.predict(batch)[:, 1], int8.predict(batch)[:, 1]
    assert expected.max() - expected.min() > 0.3  # the inputs exercise the model
    # 8-bit activations of a steep toy; NNCF's activation ranges (means of per-sample
    # minima / maxima) clip the brightest patches a little
    assert np.abs(expected - got).mean() < 0.04 and np.abs(expected - got).max() < 0.2
    assert int8.info()["precision"] == "int8+f32" and f32.info()["precision"] == "f32"
    assert int8.metadata.extras["quantization"]["calibration_samples"] == 60
    if engine == "onnxruntime":
        import onnx

        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    else:
        import openvino as ov

        assert "FakeQuantize" in {op.get_type_name() for op in ov.Core().read_model(str(path)).get_ops()}


@pytest.mark.slow
def test_guard_scores_what_deployment_segments(converted, tiny_cohort):
    from h2g.inference.lowres import target_mask
    from h2g.inference.segmenter import EngineOptions
    from h2g.systems.h2g.segmenter import H2GOptions, H2GSegmenter

    options = quantize.Int8Options(samples=60, engines=("openvino",), tolerance=1.0)
    report = quantize.quantize_entries(converted, options, progress=False)
    assert len(report) == 1
    result = report[0]
    assert result["passed"] and result["segmenter"] == "H2G-Net" and result["slides"] == 2
    folder = Path(result["folder"])
    assert {Path(p).name for p in result["models"]} == {"patch_classifier_int8.xml", "refiner_int8.xml"}
    dices = {"f32": [], "int8": []}
    for record in load_manifest(tiny_cohort).split("test"):
        with Slide(record.slide_path) as slide:
            truth = target_mask(record.annotation_path, slide, REFINE)
            for variant, name, precision in (("f32", "", "f32"), ("int8", "_int8", None)):
                segmenter = H2GSegmenter.from_files(
                    {"patch_classifier": folder / f"patch_classifier{name}.xml", "refinement": folder / f"refiner{name}.xml"},
                    EngineOptions(precision=precision, hint="latency"), H2GOptions(size=REFINE, magnification=MAGNIFICATION,
                                                                   patch_size=PATCH))
                seg = segmenter.segment(slide)
                dices[variant].append(dice(seg.prob > 0.5, truth))
                # the console line names the precision the models run at (an int8 model is not "f32")
                line = segmenter.describe(seg)
                assert ("openvino CPU int8+" in line) if variant == "int8" else line.endswith("(openvino CPU f32)")
    assert 0.05 < np.mean(dices["f32"]) < 1.0  # a model that segments something, not everything
    assert result["dice_f32"] == pytest.approx(np.mean(dices["f32"]), abs=1e-9)
    assert result["dice_int8"] == pytest.approx(np.mean(dices["int8"]), abs=1e-9)
    assert result["patch_prob_diff"]["max"] >= result["patch_prob_diff"]["p99"] >= 0
    assert result["pixel_prob_diff"]["n"] == 2 * REFINE * REFINE


@pytest.mark.slow
def test_a_failing_guard_keeps_f32_removes_int8_and_fails_clearly(run_folder, tiny_cohort, capsys):
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "export" / "convert.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules["convert_cli"] = cli
    spec.loader.exec_module(cli)
    slide = load_manifest(tiny_cohort).split("train")[0].slide_path
    # a negative tolerance: any int8 model fails
    code = run_cli(cli.main, [str(run_folder), "--slide", str(slide), "--quiet", "--int8", "--int8-engines",
                              "onnxruntime", "--calibration-samples", "20", "--int8-tolerance", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "int8 accuracy guard failed" in err and "f32 models kept" in err
    assert len(err.strip().splitlines()) == 1
    models = run_folder / "models"
    assert (models / "patch_classifier.onnx").is_file() and (models / "refiner.onnx").is_file()
    assert not list(models.glob("*_int8.onnx"))
    report = json.loads((run_folder / "conversion_report.json").read_text())
    assert report["int8"][0]["passed"] is False and report["int8"][0]["removed"]

    code = run_cli(cli.main, [str(run_folder), "--slide", str(slide), "--quiet", "--int8", "--int8-engines",
                              "onnxruntime", "--calibration-samples", "20"])
    out = capsys.readouterr().out
    report = json.loads((run_folder / "conversion_report.json").read_text())["int8"][0]
    if report["passed"]:
        assert code == 0 and "guard passed" in out and (models / "refiner_int8.onnx").is_file()
    else:  # the real tolerance failed: said so, nothing left behind
        assert code == 2 and not list(models.glob("*_int8.onnx"))

    assert run_cli(cli.main, [str(run_folder), "--calibration-samples", "5"]) == 2
    assert "apply only with --int8" in capsys.readouterr().err


def test_int8_needs_a_manifest(tmp_path):
    with pytest.raises(ConfigError, match="give --manifest"):
        quantize.run_data(tmp_path / "model.keras", quantize.Int8Options())
    with pytest.raises(ConfigError, match="int8 engines"):
        quantize.quantize_entries([], quantize.Int8Options(engines=("tensorrt",)))


@pytest.mark.slow
def test_benchmark_times_the_int8_models_in_the_same_run(converted, tiny_cohort, tmp_path):

    report = quantize.quantize_entries(converted, quantize.Int8Options(samples=30, engines=("openvino",),
                                                                       tolerance=1.0), progress=False)
    folder = Path(report[0]["folder"])
    slide = load_manifest(tiny_cohort).split("test")[0].slide_path
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    done = run_script("benchmark.py", "--slide", slide, "--patch-model", folder / "patch_classifier.xml",
                      "--refine-model", folder / "refiner.xml", "--repeats", 1, "--int8", "--json", out_json,
                      "--markdown", out_md, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out_json.read_text())
    int8 = result["int8"]
    assert int8["precision"].startswith("int8+") and not result["precision"].startswith("int8")
    assert int8["patches"] == result["patches"] > 0
    assert int8["backends"]["patch_classifier"]["model"].endswith("patch_classifier_int8.xml")
    assert not result["backends"]["patch_classifier"]["model"].endswith("_int8.xml")
    speedup = int8["patch_wise_per_second"]["mean"] / result["patch_wise_per_second"]["mean"]
    assert f"**{speedup:.2f}x** the {result['precision']} models'" in out_md.read_text()

    missing = run_script("benchmark.py", "--slide", slide, "--patch-model", folder / "patch_classifier.onnx",
                         "--refine-model", folder / "refiner.onnx", "--engine", "onnxruntime", "--repeats", 1,
                         "--int8", tmp_path=tmp_path)
    if not (folder / "patch_classifier_int8.onnx").is_file():
        assert missing.returncode == 2 and "export/convert.py --int8" in missing.stderr


@pytest.mark.slow
def test_guard_of_a_multi_class_sliding_window_model(tiny_cohort, tmp_path):
    """DSMN-S2 (one 20x view, the manifest's five classes): per-class IoU over the pooled
    test pixels and the tumour Dice, f32 against int8, from the same segmentation the
    deployment runs (checked against numpy counts of its label maps)."""
    import keras

    from h2g.data.views import View
    from h2g.evaluation.metrics import raster_labels
    from h2g.export.conversion import convert
    from h2g.inference.metadata import ModelMetadata
    from h2g.inference.segmenter import EngineOptions, SlidingSegmenter
    from h2g.io.annotation import load_annotation
    from h2g.models import build

    manifest_path = tiny_cohort.parent / "data_manifest_multiclass.csv"
    manifest = load_manifest(manifest_path)
    names = manifest.classes.names
    keras.utils.set_random_seed(0)
    model = build("dsmn_s2", n_classes=len(names), input_size=128, width=0.0625)
    folder = tmp_path / "dsmn_s2" / "models"
    folder.mkdir(parents=True)
    model.save(folder / "segmenter.keras")
    classes = [{"name": n, "colour": [40 * i, 0, 0]} for i, n in enumerate(names)]
    write_sidecar(folder / "segmenter.keras", ModelMetadata(system="dmmn", design="dsmn_s2", role="segmentation",
                                                            views=(View("x20", 20.0, 128),), classes=classes,
                                                            output="pixel_probs"))
    (tmp_path / "dsmn_s2" / "config.json").write_text(json.dumps({"manifest": str(manifest_path), "seed": 0}))
    with Slide(manifest.split("train")[0].slide_path) as slide:
        entries = json.loads(convert([tmp_path / "dsmn_s2"], slide, progress=False).read_text())["models"]
    result, = quantize.quantize_entries(entries, quantize.Int8Options(samples=20, engines=("onnxruntime",),
                                                                      tolerance=1.0), progress=False)
    assert result["segmenter"] == SlidingSegmenter.label and result["passed"] and set(result["iou_f32"]) <= set(names)
    assert "windows (x20 128px at 20x)" in result["calibration"]["segmentation"]

    counts = {"f32": np.zeros((len(names), len(names))), "int8": np.zeros((len(names), len(names)))}
    for record in manifest.split("test"):
        with Slide(record.slide_path) as slide:
            annotation = load_annotation(record.annotation_path, slide, classes=manifest.classes)
            for variant, name in (("f32", "segmenter.onnx"), ("int8", "segmenter_int8.onnx")):
                segmenter = SlidingSegmenter.from_files({"segmentation": folder / name},
                                                        EngineOptions(engine="onnxruntime"))
                seg = segmenter.segment(slide)
                pred, truth = raster_labels(seg.raster, annotation, names)
                keep = truth != 255
                np.add.at(counts[variant], (truth[keep], pred[keep]), 1)
    for variant in ("f32", "int8"):
        c = counts[variant]
        for i, name in enumerate(names):
            union = c[i].sum() + c[:, i].sum() - c[i, i]
            if union:  # present in the truth or the prediction
                assert result[f"iou_{variant}"][name] == pytest.approx(c[i, i] / union, abs=1e-9)


@pytest.mark.slow
def test_guard_of_razns_three_networks(tiny_cohort, tmp_path):
    """RAZN's policy, coarse and fine networks quantise together: each calibrated on what it
    is fed (x0 regions; the quarters of the zoomed x1), the guard running the conditional
    zoom f32 against int8 on the test slides; the int8 zoom decisions and label maps
    compared with a numpy count of deployment's own outputs."""
    import keras

    from h2g.evaluation.metrics import raster_labels
    from h2g.export.conversion import convert
    from h2g.inference.metadata import ModelMetadata
    from h2g.inference.segmenter import EngineOptions
    from h2g.inference.zoom import zoom_views
    from h2g.io.annotation import load_annotation
    from h2g.models import razn
    from h2g.systems.razn.segmenter import ZoomSegmenter

    manifest_path = tiny_cohort.parent / "data_manifest_multiclass.csv"
    manifest = load_manifest(manifest_path)
    names = manifest.classes.names
    size, magnification = 32, 2.5
    x0, x1 = zoom_views(size, magnification)
    classes = [{"name": n, "colour": [40 * i, 0, 0]} for i, n in enumerate(names)]
    extras = {"zoom_rate": 2, "size": size, "magnification": magnification, "threshold": 0.5, "alpha": 0.8}
    from h2g.data.views import View

    metas = {"policy": ModelMetadata(system="razn", design="razn", role="policy", views=(x0,), output="class_probs",
                                     extras=extras),
             "coarse": ModelMetadata(system="razn", design="razn", role="coarse", views=(x0,), classes=classes,
                                     output="pixel_probs", extras=extras),
             "fine": ModelMetadata(system="razn", design="razn", role="fine",
                                   views=(View("x1_patch", x1.magnification, size),), classes=classes,
                                   output="pixel_probs", extras=extras)}
    keras.utils.set_random_seed(0)
    nets = {"policy": razn.build_policy(size, 0.125), "coarse": razn.build_resnet18_fcn(len(names), size, 0.125),
            "fine": razn.build_resnet18_fcn(len(names), size, 0.125)}
    folder = tmp_path / "razn" / "models"
    folder.mkdir(parents=True)
    for role, net in nets.items():
        net.save(folder / f"{role}.keras")
        write_sidecar(folder / f"{role}.keras", metas[role])
    (tmp_path / "razn" / "config.json").write_text(json.dumps({"manifest": str(manifest_path), "seed": 0}))
    with Slide(manifest.split("train")[0].slide_path) as slide:
        entries = json.loads(convert([tmp_path / "razn"], slide, progress=False).read_text())["models"]
    result, = quantize.quantize_entries(entries, quantize.Int8Options(samples=24, engines=("onnxruntime",),
                                                                      tolerance=1.0), progress=False)
    assert result["segmenter"] == ZoomSegmenter.label and result["passed"]
    assert {Path(p).name for p in result["models"]} == {"policy_int8.onnx", "coarse_int8.onnx", "fine_int8.onnx"}
    assert "regions x0" in result["calibration"]["policy"] and "quarters" in result["calibration"]["fine"]
    assert result["patch_prob_diff"] is not None  # the policy's zoom probabilities, f32 against int8

    counts = np.zeros((len(names), len(names)))
    for record in manifest.split("test"):
        with Slide(record.slide_path) as slide:
            annotation = load_annotation(record.annotation_path, slide, classes=manifest.classes)
            int8 = ZoomSegmenter.from_files({r: folder / f"{r}_int8.onnx" for r in metas},
                                            EngineOptions(engine="onnxruntime", hint="latency")).segment(slide)
            pred, truth = raster_labels(int8.raster, annotation, names)
            keep = truth != 255
            np.add.at(counts, (truth[keep], pred[keep]), 1)
    for i, name in enumerate(names):
        union = counts[i].sum() + counts[:, i].sum() - counts[i, i]
        if union:
            assert result["iou_int8"][name] == pytest.approx(counts[i, i] / union, abs=1e-9)
