"""RAZN end to end on the tiny cohort's multi-class manifest through the registry (tiny
networks), then its export served by export/segment_slide.py without TensorFlow's
backends, matching the Keras pipeline's prediction."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import tiny_config
from helpers import run_script

from h2g.systems.registry import resolve, run

pytestmark = pytest.mark.slow

CLASSES = ["tumour", "benign", "stroma", "fat", "glass"]


def razn_config(seed: int = 0):
    c = tiny_config(seed)
    return c.replace(razn=dataclasses.replace(c.razn, size=32, magnification=2.5, width=0.125, attention_width=4,
                                              batch_size=4, steps=4, checkpoint_every=2, timing_regions=4))


@pytest.fixture(scope="module")
def razn_run(tiny_cohort, tmp_path_factory):
    manifest = tiny_cohort.parent / "data_manifest_multiclass.csv"
    out = tmp_path_factory.mktemp("razn_runs")
    results = run(resolve(["razn_scale1", "razn"]), manifest, out, razn_config())
    return manifest, out, results


def test_designs_write_table1_rows(razn_run):
    _, out, results = razn_run
    assert list(results) == ["razn_scale1", "razn"]
    for name, m in results.items():
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["system"] == "razn" and sorted(metrics["classes"]) == sorted(CLASSES)
        ious = {n: c["iou"] for n, c in metrics["classes"].items() if c["present"]}
        assert metrics["mean_iou"] == pytest.approx(np.mean(list(ious.values())), abs=1e-9)
        assert min(ious.values()) - 1e-9 <= metrics["weighted_iou"] <= max(ious.values()) + 1e-9
        for key in ("recall_mean", "precision_mean", "dice_mean"):  # the rows join the combined Table 1
            assert 0.0 <= metrics[key] <= 1.0 and not math.isnan(metrics[key])
        t = metrics["relative_time"]
        assert t["regions"] == 4 and t["mean"] > 0
    assert results["razn_scale1"]["relative_flops"] == 1.0
    z = results["razn"]["zoom_fraction"]
    assert 0.0 <= z <= 1.0
    assert results["razn"]["relative_flops"] > 1.0 + 3.0 * z  # policy + coarse / 4 fine patches
    table = (out / "razn_table1.md").read_text()
    assert "Scale 1" in table and "RAZN" in table and "±" in table
    assert "RAZN" in (out / "tables.md").read_text()  # the binary table of every system
    roles = {json.loads((out / "razn" / "models" / f"{r}.meta.json").read_text())["role"]
             for r in ("policy", "coarse", "fine")}
    assert roles == {"policy", "coarse", "fine"}
    assert (out / "razn" / "zoom.png").is_file() and not (out / "razn_scale1" / "zoom.png").exists()


def test_finished_stage_is_reused_and_resume_is_a_no_op(razn_run, monkeypatch):
    """A second run (with --resume) trains nothing: the training loop is never entered
    and the stage's files keep their modification times."""
    from h2g.systems.razn import training

    manifest, out, results = razn_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "_cache").rglob("*") if p.is_file()}
    calls = []
    for trainer in (training.RaznTrainer, training.UnitTrainer):
        monkeypatch.setattr(trainer, "fit", lambda self, *a, **k: calls.append(type(self).__name__))
    again = run(resolve(["razn"]), manifest, out, razn_config(), resume=True)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["razn"]["mean_iou"] == results["razn"]["mean_iou"]


def test_export_served_by_segment_slide_matches_the_keras_pipeline(razn_run, tmp_path):
    from h2g.export.conversion import convert
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import Slide
    from h2g.systems.razn.designs import DESIGNS
    from h2g.systems.razn.pipeline import Pipeline

    manifest, out, _ = razn_run
    record = load_manifest(manifest).split("test")[0]
    with Slide(record.slide_path) as slide:
        convert([out / "razn" / "models"], slide, tmp_path / "exported", progress=False)
    onnx = [tmp_path / "exported" / f"{r}.onnx" for r in ("fine", "policy", "coarse")]  # any order
    done = run_script("segment_slide.py", *onnx, "--slide", record.slide_path, "--out", tmp_path / "seg",
                        "--engine", "onnxruntime", "--quiet", "--batch-size", 3, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["system"] == "razn" and summary["zoom"]["regions"] > 0
    deployed = np.load(tmp_path / "seg" / "probabilities.npy")

    pipe = Pipeline(manifest, out, razn_config())
    design = DESIGNS["razn"]
    with Slide(record.slide_path) as slide:
        keras_seg = pipe.segmenter(design, pipe.model_stage(design)).segment(slide)
    assert summary["zoom"]["zoomed"] == int(keras_seg.zoom.zoomed.sum())
    assert deployed.shape == keras_seg.raster.probs.shape
    np.testing.assert_allclose(deployed, keras_seg.raster.probs, atol=1e-4)

    # export/segment_cohort.py runs the same segmenter on each slide (process pool): the
    # test slides' outputs equal segment_slide.py's
    done = run_script("segment_cohort.py", manifest, "--split", "test", "--model", *onnx, "--out",
                        tmp_path / "cohort", "--engine", "onnxruntime", "--batch-size", 3, "--executor", "process",
                        "--workers", "1", "--quiet", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "cohort" / record.slide_id / "probabilities.npy"), deployed,
                               atol=1e-6)
    rows = (tmp_path / "cohort" / "cohort.csv").read_text().splitlines()
    assert len(rows) == 1 + len(load_manifest(manifest).split("test")) and all(",done," in r for r in rows[1:])

    # export/benchmark.py reports RAZN's stages from the three OpenVINO IRs
    xml = [tmp_path / "exported" / f"{r}.xml" for r in ("policy", "coarse", "fine")]
    done = run_script("benchmark.py", "--slide", record.slide_path, "--model", *xml, "--engine", "openvino",
                        "--precision", "f32", "--repeats", 1, "--json", tmp_path / "bench.json",
                        "--markdown", tmp_path / "bench.md", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["regions"] == summary["zoom"]["regions"] and result["zoomed"] == summary["zoom"]["zoomed"]
    assert set(result["stages"]) == {"tissue", "reading", "policy", "coarse", "fine", "stitching", "total"}
    assert "conditional zoom" in (tmp_path / "bench.md").read_text()
