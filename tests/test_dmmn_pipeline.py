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


def _sampled_counts(pipe, manifest, n_classes: int, value_of: dict) -> np.ndarray:
    """Annotated pixels per class of the target patches the sampler draws for the class
    weights, counted here straight from the label TIFFs: each 20x target patch's level-0
    box (its grid cell) cropped from the map (downsample 4, so each map pixel is 2 x 2 target
    pixels of these 40x slides), unannotated and off-map pixels left out."""
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import open_slide
    from h2g.systems.dmmn.pipeline import WEIGHT_DRAWS

    c = pipe.config
    paths = {r.slide_id: (r.slide_path, r.annotation_path) for r in load_manifest(manifest).split("train")}
    sampler = pipe.split_sampler("train")
    counts = np.zeros(n_classes, np.int64)
    for b in range(-(-WEIGHT_DRAWS // c.dmmn.batch_size)):
        batch = sampler.batch_arrays(b, c.dmmn.batch_size)
        for s, (x, y) in zip(batch.slide_index, batch.coords):
            slide_path, label_path = paths[sampler.sources[s].slide_id]
            extent = c.dmmn.size * open_slide(slide_path).downsample_for(c.dmmn.magnifications[0])
            assert extent % 4 == 0 and x % 4 == 0 and y % 4 == 0  # the crop is exact on the map's grid
            values = tifffile.imread(label_path)
            values = values[..., 0] if values.ndim == 3 else values
            crop = values[int(y) // 4:int(y + extent) // 4, int(x) // 4:int(x + extent) // 4]
            per_pixel = (extent / 4 / c.dmmn.size) ** -2  # target pixels per map pixel
            for value, cls in value_of.items():
                counts[cls] += int((crop == value).sum() * per_pixel)
    return counts


def test_class_weights_are_one_minus_the_share_of_the_sampled_target_pixels(multiclass_manifest, tmp_path):
    """w_c = 1 - N_c / sum N over the annotated pixels of the training patches as drawn
    (the paper's balanced set of patches), counted independently from the label TIFFs
    (pixel values 1..5 = classes, 0 = unannotated)."""
    from h2g.systems.dmmn.pipeline import Pipeline

    pipe = Pipeline(multiclass_manifest, tmp_path, dmmn_config())
    counts = _sampled_counts(pipe, multiclass_manifest, 5, {v: v - 1 for v in range(1, 6)})
    np.testing.assert_allclose(pipe.class_weights(), 1 - counts / counts.sum(), rtol=1e-6)
    assert (counts[:3] > 0).all()  # tumour, benign and stroma are in the training patches


def test_binary_class_weights_do_not_balance_a_second_time(tiny_cohort, tmp_path):
    """On a binary manifest (mostly non-tumour glass and stroma) the weights used to come
    from the whole masks, 1 - N_c / N = about 0.15 / 0.85, on top of the sampler's class
    balance: DSMN-S2 then called everything tumour (issue 29).  Counted over the sampled
    patches, each class carries the same share of the loss (w_c p_c equal: 1 - p_c with
    two classes), and no weight is more than twice the other."""
    from h2g.systems.dmmn.pipeline import Pipeline

    pipe = Pipeline(tiny_cohort, tmp_path, dmmn_config())
    assert pipe.classes.names == ("non-tumour", "tumour")
    counts = _sampled_counts(pipe, tiny_cohort, 2, {0: 0, 1: 1, 255: 1})  # masks: 0 / 1 or 0 / 255
    weights = pipe.class_weights()
    np.testing.assert_allclose(weights, 1 - counts / counts.sum(), rtol=1e-6)
    shares = counts / counts.sum()
    assert weights.max() / weights.min() < 2.0, weights
    np.testing.assert_allclose(weights[0] * shares[0], weights[1] * shares[1], rtol=1e-6)


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
