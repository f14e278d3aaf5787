"""End to end: designs run through h2g.pipeline / experiments/run.py on a tiny cohort."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config
from h2g.systems.h2g.designs import resolve
from h2g.systems.h2g.pipeline import run_designs

pytestmark = pytest.mark.slow

REQUIRED = ("design", "n_test_slides", "recall_mean", "precision_mean", "dice_mean", "dice_sd",
            "dice_by_grade", "preset", "seed", "config")


@pytest.fixture(scope="module")
def smoke_run(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = run_designs(resolve(["otsu", "mob_pw", "mob_pw_unet"]), tiny_cohort, out, tiny_config())
    return out, results


def test_designs_write_metrics_tables_and_models(smoke_run):
    out, results = smoke_run
    for name in ("otsu", "mob_pw_unet"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert set(REQUIRED) <= set(metrics)
        assert metrics["design"] == name and metrics["n_test_slides"] == 2
        for key in ("recall_mean", "precision_mean", "dice_mean", "dice_sd"):
            assert 0.0 <= metrics[key] <= 1.0 and not math.isnan(metrics[key])
        assert metrics["resolution"] == [256, 256]
        assert (out / name / "config.json").is_file()
        for table in ("tables.md", "per_slide.csv", "examples.png"):
            assert (out / name / table).is_file(), table
    assert (out / "mob_pw_unet" / "models" / "patch_classifier.keras").is_file()
    assert (out / "mob_pw_unet" / "models" / "refiner.keras").is_file()
    # the combined tables of a multi-design run, Tukey over the deep-learning designs only
    assert "Mob-PW-UNet" in (out / "tables.md").read_text()
    assert (out / "dice_boxplot.png").is_file()


def test_otsu_segments_all_tissue(smoke_run):
    """Otsu finds tissue, not tumour: it catches (almost) all tumour at low precision."""
    _, results = smoke_run
    otsu = results["otsu"]
    assert otsu["recall_mean"] > 0.9
    assert otsu["precision_mean"] < 0.8


def test_same_seed_reuses_cache_and_gives_same_metrics(smoke_run, tiny_cohort):
    out, results = smoke_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "_cache").glob("*/done.json")}
    again = run_designs(resolve(["mob_pw_unet"]), tiny_cohort, out, tiny_config())
    assert {p: p.stat().st_mtime_ns for p in (out / "_cache").glob("*/done.json")} == stamps
    for key in ("recall_mean", "precision_mean", "dice_mean", "dice_sd"):
        assert again["mob_pw_unet"][key] == results["mob_pw_unet"][key]


def test_run_cli_rejects_a_bad_manifest_listing_every_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "slide_id,slide_path,annotation_path,grade,split\n"
        "a,missing_a.tiff,,1,train\n"
        "a,missing_b.tiff,,7,train\n"
        "c,missing_c.tiff,,2,holdout\n"
    )
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "--design", "otsu",
                           "--manifest", str(bad), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for fragment in ("missing_a.tiff", "missing_b.tiff", "missing_c.tiff", "grade", "split", "duplicate"):
        assert fragment in proc.stderr, fragment
    assert not (tmp_path / "out").exists()  # rejected before any work started


def test_same_seed_from_scratch_gives_identical_metrics(smoke_run, tiny_cohort, tmp_path):
    """A fresh run folder retrains the classifier and remakes the heatmaps: the numbers
    must not change."""
    _, results = smoke_run
    again = run_designs(resolve(["mob_pw"]), tiny_cohort, tmp_path, tiny_config())
    for key in ("recall_mean", "precision_mean", "dice_mean", "dice_sd", "dice_by_grade"):
        assert again["mob_pw"][key] == results["mob_pw"][key], key


def test_two_epochs_on_the_generated_cohort_beat_chance(tiny_cohort, tmp_path):
    """The training data path end to end - manifest -> patch grids -> hierarchical
    sampler -> tf.data -> training.fit - on a tiny convolutional classifier: two short
    epochs already beat chance on held-out patches (the sampler's validation stream,
    never trained on) of the training slides.  (The single validation slide of the tiny
    cohort is a grade-1 slide whose tumour is close to stroma in colour: a model this
    small and this briefly trained is at chance there, as it should be.)"""
    import keras

    from h2g.training import fit as training
    from h2g.io.manifest import load_manifest
    from h2g.data.sampler import HierarchicalSampler, build_sources
    from h2g.data.dataset import patch_dataset

    manifest = load_manifest(tiny_cohort)
    train = HierarchicalSampler(build_sources(manifest.split("train"), progress=False), seed=0)
    held_out = patch_dataset(train, batch_size=16, training=False, n_batches=4)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((256, 256, 3)),
        keras.layers.AveragePooling2D(4),
        keras.layers.Rescaling(8.0, offset=-6.0),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, activation="softmax"),
    ])
    result = training.fit(model, lambda start: patch_dataset(train, batch_size=16, start_batch=start), held_out,
                          loss="categorical_crossentropy", run_dir=tmp_path, epochs=2, steps_per_epoch=20,
                          learning_rate=3e-3, verbose=0)
    assert result.epochs_completed == 2
    metrics = training.evaluate_classifier(model, held_out)
    assert metrics["n_patches"] == 64
    assert metrics["accuracy"] > 0.75
