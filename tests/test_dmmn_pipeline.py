"""DMMN end to end on the tiny cohort's multi-class manifest (tiny models), through the
registry as experiments/run.py runs it."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tifffile
from conftest import tiny_config
from helpers import run_script

from h2g.systems.registry import resolve, run

pytestmark = pytest.mark.slow

CLASSES = ["tumour", "benign", "stroma", "fat", "glass"]


def dmmn_config(seed: int = 0):
    c = tiny_config(seed)
    return c.replace(dmmn=dataclasses.replace(c.dmmn, size=64, stride=64, width=0.125, batch_size=4,
                                              train_batches=4, val_batches=1, epochs=1, inference_batch=16))


@pytest.fixture(scope="module")
def multiclass_manifest(tiny_cohort):
    path = tiny_cohort.parent / "data_manifest_multiclass.csv"
    assert path.is_file(), "make_cohort writes the multi-class manifest beside the binary one"
    return path


@pytest.fixture(scope="module")
def dmmn_run(multiclass_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmmn_runs")
    results, = [run(resolve(["dsmn_s2", "dmmn_m3"]), multiclass_manifest, out, dmmn_config())]
    return out, results


def test_two_designs_write_per_class_and_binary_results(dmmn_run):
    out, results = dmmn_run
    assert list(results) == ["dsmn_s2", "dmmn_m3"]
    for name in results:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["system"] == "dmmn" and metrics["n_test_slides"] == 2
        assert sorted(metrics["classes"]) == sorted(CLASSES)
        ious = [c["iou"] for c in metrics["classes"].values() if c["present"]]
        assert 0.0 <= metrics["mean_iou"] <= 1.0
        assert metrics["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-9)
        for key in ("recall_mean", "precision_mean", "dice_mean"):  # DMMN rows sit in the H2G-Net tables
            assert 0.0 <= metrics[key] <= 1.0 and not math.isnan(metrics[key])
        meta = json.loads((out / name / "models" / "segmenter.meta.json").read_text())
        assert meta["system"] == "dmmn" and [c["name"] for c in meta["classes"]] == CLASSES
        views = [v["name"] for v in meta["views"]]
        assert views == (["x20"] if name == "dsmn_s2" else ["x20", "x10", "x5"])
    assert (out / "dmmn_class_tables.md").is_file()
    tables = (out / "tables.md").read_text()
    assert "DSMN-S2" in tables and "DMMN-M3" in tables


def test_class_weights_are_one_minus_the_annotated_share(multiclass_manifest, tmp_path):
    """w_c = 1 - N_c / sum N over the training label maps, counted here straight from the
    label TIFFs (pixel values 1..5 = classes, 0 = unannotated)."""
    from h2g.io.manifest import load_manifest
    from h2g.systems.dmmn.pipeline import Pipeline

    manifest = load_manifest(multiclass_manifest)
    counts = np.zeros(5, np.int64)
    for record in manifest.split("train"):
        values = tifffile.imread(record.annotation_path)
        values = values[..., 0] if values.ndim == 3 else values
        counts += np.bincount(values.ravel(), minlength=6)[1:6]
    expected = 1 - counts / counts.sum()
    got = Pipeline(multiclass_manifest, tmp_path, dmmn_config()).class_weights()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert (counts[:3] > 0).all()  # tumour, benign and stroma are annotated in training


def test_uncovered_pixels_are_glass_and_partial_truth_is_ignored(multiclass_manifest, tmp_path):
    """Pixels no window covers score as the glass class; unannotated truth pixels stay 255."""
    from h2g.evaluation.metrics import raster_labels
    from h2g.inference.raster import Raster
    from h2g.systems.dmmn.pipeline import Pipeline

    pipe = Pipeline(multiclass_manifest, tmp_path, dmmn_config())
    record = pipe.manifest.split("train")[0]
    annotation = pipe.annotation(record)
    truth = annotation.labels
    extent = (truth.shape[1] * annotation.downsample, truth.shape[0] * annotation.downsample)
    raster = Raster.empty(extent, annotation.downsample * 2, 5)  # nothing covered
    pred, scored = raster_labels(raster, annotation, pipe.classes.names)
    assert (pred == CLASSES.index("glass")).all()
    assert (scored == 255).sum() == (truth == 255).sum() > 0


def test_trained_m3_exports_and_deploys_without_tensorflow_like_the_pipeline(dmmn_run, multiclass_manifest,
                                                                             tmp_path):
    """The run's DMMN-M3 segmenter converts with ONNX / OpenVINO parity, and
    export/segment_slide.py (TensorFlow blocked) segments a test slide from the model's
    metadata alone into the label map the training pipeline's own (Keras) inference gives."""
    from PIL import Image

    from h2g.export.conversion import convert_model
    from h2g.io.slide import Slide
    from h2g.systems.dmmn.pipeline import Pipeline
    from h2g.systems.registry import get_design

    out, _ = dmmn_run
    model = out / "dmmn_m3" / "models" / "segmenter.keras"
    pipe = Pipeline(multiclass_manifest, out, dmmn_config())
    record = pipe.manifest.split("test")[0]
    with Slide(record.slide_path) as slide:
        entry = convert_model(model, tmp_path / "exported", slide)
    assert entry["parity"]["passed"], entry["parity"]
    assert entry["parity"]["onnxruntime"]["max_abs_diff"] <= 1e-4
    assert set(entry["inputs"]) == {"x20", "x10", "x5"} and entry["kind"] == "segmentation"

    done = run_script("segment_slide.py", entry["onnx"], "--slide", record.slide_path, "--out", tmp_path / "seg",
                      "--engine", "onnxruntime", "--quiet", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    deployed = np.asarray(Image.open(tmp_path / "seg" / "labels.png")).astype(np.int64) - 1  # -1: not segmented
    with Slide(record.slide_path) as slide:
        reference = pipe.segmenter(get_design("dmmn_m3"), model).segment(slide).raster.label_map(fill=-1)
    assert deployed.shape == reference.shape
    assert np.mean(deployed == reference) > 0.99


def test_designs_of_two_systems_run_on_their_own_manifests_into_one_table(tiny_cohort, multiclass_manifest,
                                                                          tmp_path, monkeypatch):
    """With no manifest given (experiments/run.py's default) each system runs on its own
    default - H2G-Net on the binary manifest, DMMN on the multi-class one of the same
    slides - and the combined Table 1 has a row for each design."""
    import h2g.io.manifest
    from h2g.systems import registry

    monkeypatch.setattr(h2g.io.manifest, "DEFAULT_MANIFEST", tiny_cohort)
    monkeypatch.setattr(registry, "REPO", multiclass_manifest.parent)
    results = run(resolve(["otsu", "dsmn_s2"]), None, tmp_path, dmmn_config())
    assert json.loads((tmp_path / "otsu" / "config.json").read_text())["manifest"] == str(tiny_cohort)
    assert json.loads((tmp_path / "dsmn_s2" / "config.json").read_text())["manifest"] == str(multiclass_manifest)
    assert "classes" in results["dsmn_s2"] and "classes" not in results["otsu"]
    table1 = (tmp_path / "table1.csv").read_text()
    assert "Otsu" in table1 and "DSMN-S2" in table1
