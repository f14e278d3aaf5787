"""End to end: designs run through h2g.systems.h2g.pipeline / experiments/run.py on a tiny cohort.

Every test of the session's nine-design run (``smoke_run``) lives in this file, so that
``pytest -n 2 --dist loadfile`` (the README's test command) builds it on one worker only;
``conftest.py`` refuses a collection where another file asks for it."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import tiny_config

from h2g.systems.registry import resolve, run

pytestmark = pytest.mark.slow

REQUIRED = ("design", "system", "n_test_slides", "recall_mean", "precision_mean", "dice_mean", "dice_sd",
            "dice_by_grade", "preset", "seed", "config")
ALL = ("otsu", "unet_lr", "inc_pw", "mob_pw", "mob_km_pw", "mob_pw_unet", "mob_pw_agunet", "mob_pw_dagunet",
       "mob_pw_doubleunet")


def test_every_design_runs_and_writes_its_results(smoke_run):
    out, results = smoke_run
    assert tuple(results) == ALL
    for name in ALL:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert set(REQUIRED) <= set(metrics)
        assert metrics["design"] == name and metrics["system"] == "h2g" and metrics["n_test_slides"] == 2
        for key in ("recall_mean", "precision_mean", "dice_mean", "dice_sd"):
            assert 0.0 <= metrics[key] <= 1.0 and not math.isnan(metrics[key])
        assert metrics["resolution"] == [256, 256]
        config = json.loads((out / name / "config.json").read_text())
        assert config["design"] == name and config["refine"] == metrics["config"]["refine"]
    assert (out / "mob_pw_unet" / "models" / "patch_classifier.keras").is_file()
    assert (out / "mob_pw_unet" / "models" / "refiner.keras").is_file()
    # the combined tables of a multi-design run, Tukey over the deep-learning designs only
    tables = (out / "tables.md").read_text()
    assert all(results[n]["label"] in tables for n in ALL)
    assert "| Otsu |" not in tables.split("Tukey")[-1]
    # the threshold sweep agrees with the tables at the paper's threshold of 0.5
    sweep_table = (out / "thresholds.md").read_text()
    for name in ALL:
        sweep = results[name]["threshold_sweep"]
        assert f"| {results[name]['label']} |" in sweep_table
        assert sweep["dice_mean"][sweep["thresholds"].index(0.5)] == pytest.approx(results[name]["dice_mean"])
        assert sweep["best_dice"] >= results[name]["dice_mean"] - 1e-12
        assert 0.0 <= sweep["pixel_auc_mean"] <= 1.0


def test_designs_share_the_stages_they_have_in_common(smoke_run):
    """Mob-PW's classifier and heatmaps serve the five MobileNetV2 designs without CWCE:
    three classifiers (MobileNetV2, MobileNetV2 + CWCE, InceptionV3), three heatmap sets,
    five refiners (UNet-LR and the four refinement nets), one cluster model."""
    out, _ = smoke_run
    count = {name: len(list((out / "_cache").glob(f"{name}-*/done.json")))
             for name in ("cluster", "classifier", "heatmaps", "refiner")}
    assert count == {"cluster": 1, "classifier": 3, "heatmaps": 3, "refiner": 5}


def test_smoke_heatmaps_use_half_patch_stride_and_deployment_is_told(smoke_run, tiny_cohort, tmp_path):
    """The smoke preset's heatmap stride (128 px at 10x, half a patch) gives cells half a
    patch's level-0 extent, and the sidecars of the saved models carry the stride so that
    deployment cuts heatmaps the way the refiner was trained.  On the paper's grid
    (``tiny_config``: ``heatmap.stride=None``) the cells are whole patches and the sidecars
    record no stride; UNet-LR has no heatmap.  The stride is read by the heatmap stage
    only: on a copy of the run's cache the classifier is reused."""
    import shutil

    import numpy as np

    from h2g.systems.registry import load_config
    from h2g.inference.metadata import read_sidecar
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import open_slide

    out, _ = smoke_run
    assert load_config("smoke").heatmap.stride == 128
    record = load_manifest(tiny_cohort).records[0]
    with open_slide(record.slide_path, mpp=record.mpp) as slide:
        patch_extent = int(round(256 * slide.downsample_for(10.0)))
    for folder in (out / "_cache").glob("heatmaps-*"):
        assert int(np.load(folder / f"{record.slide_id}.npz")["step"]) == patch_extent
    assert "heatmap_stride" not in read_sidecar(out / "mob_pw_unet" / "models" / "refiner.keras").extras

    shutil.copytree(out / "_cache", tmp_path / "_cache")
    before = {p.parent.name for p in (tmp_path / "_cache").glob("*/done.json")}
    run(resolve(["mob_pw_unet"]), tiny_cohort, tmp_path, tiny_config().override(["heatmap.stride=128"]))
    added = sorted(p.parent.name.split("-")[0] for p in (tmp_path / "_cache").glob("*/done.json")
                   if p.parent.name not in before)
    assert added == ["heatmaps", "refiner"]
    fine = [f for f in (tmp_path / "_cache").glob("heatmaps-*") if f.name not in before]
    assert int(np.load(fine[0] / f"{record.slide_id}.npz")["step"]) == patch_extent // 2
    models = tmp_path / "mob_pw_unet" / "models"
    assert read_sidecar(models / "refiner.keras").extras["heatmap_stride"] == 128
    assert read_sidecar(models / "patch_classifier.keras").extras["heatmap_stride"] == 128
    assert "heatmap_stride" not in read_sidecar(out / "unet_lr" / "models" / "refiner.keras").extras


def test_otsu_segments_all_tissue(smoke_run):
    """Otsu finds tissue, not tumour: it catches (almost) all tumour at low precision."""
    _, results = smoke_run
    otsu = results["otsu"]
    assert otsu["recall_mean"] > 0.9
    assert otsu["precision_mean"] < 0.8


def test_same_seed_reuses_cache_and_gives_same_metrics(smoke_run, tiny_cohort):
    out, results = smoke_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "_cache").glob("*/done.json")}
    again = run(resolve(["mob_pw_unet"]), tiny_cohort, out, tiny_config())
    assert {p: p.stat().st_mtime_ns for p in (out / "_cache").glob("*/done.json")} == stamps
    for key in ("recall_mean", "precision_mean", "dice_mean", "dice_sd"):
        assert again["mob_pw_unet"][key] == results["mob_pw_unet"][key]


def test_a_changed_section_reruns_only_the_stages_that_read_it(smoke_run, tiny_cohort):
    """refine.* is read by the refiners only: the classifier and heatmaps are reused."""
    import dataclasses

    out, _ = smoke_run
    config = tiny_config()
    config = config.replace(refine=dataclasses.replace(config.refine, epochs=1))
    before = {p.parent.name for p in (out / "_cache").glob("*/done.json")}
    run(resolve(["mob_pw_unet"]), tiny_cohort, out, config)
    added = {p.parent.name for p in (out / "_cache").glob("*/done.json")} - before
    assert [name.split("-")[0] for name in added] == ["refiner"]


def test_an_interrupted_stage_resumes_to_the_same_model_and_metrics(smoke_run, tiny_cohort, tmp_path, monkeypatch):
    """A fresh run folder whose Mob-PW classifier stage is interrupted after its first
    epoch, then rerun with resume, ends with the weights of the session's uninterrupted
    run (same config, seed and data, so the same stage key), and the design run from that
    folder (heatmaps remade, test slides scored) gives identical metrics: same seed from
    scratch, same numbers, interrupted or not (the tiny models collapse, so the heatmaps'
    probabilities are compared too, not only the Dice)."""
    import keras

    from h2g.systems.h2g.pipeline import Pipeline
    from h2g.systems.registry import get_design
    from h2g.training import fit as training

    out, results = smoke_run
    design = get_design("mob_pw")
    whole = Pipeline(tiny_cohort, out, tiny_config()).classifier_stage(design)
    assert whole.done

    original = training._Checkpointer.on_epoch_end

    def stop_after_first(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(training._Checkpointer, "on_epoch_end", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(tiny_cohort, tmp_path, tiny_config()).classifier_stage(design)
    monkeypatch.setattr(training._Checkpointer, "on_epoch_end", original)
    resumed = Pipeline(tiny_cohort, tmp_path, tiny_config(), resume=True).classifier_stage(design)
    assert resumed.key == whole.key and resumed.info()["inputs"] == whole.info()["inputs"]
    a = keras.models.load_model(whole.dir / "classifier.keras").get_weights()
    b = keras.models.load_model(resumed.dir / "classifier.keras").get_weights()
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    stamp = (resumed.dir / "done.json").stat().st_mtime_ns
    again = run(resolve(["mob_pw"]), tiny_cohort, tmp_path, tiny_config())
    assert (resumed.dir / "done.json").stat().st_mtime_ns == stamp  # the resumed classifier, not a new one
    fresh = list((tmp_path / "_cache").glob("heatmaps-*/*.npz"))  # probabilities, not only the collapsed Dice
    assert len(fresh) == 6
    for path in fresh:
        session = np.load(out / "_cache" / path.parent.name / path.name)["probs"]
        assert np.array_equal(np.load(path)["probs"], session), path.name
    for key in ("recall_mean", "precision_mean", "dice_mean", "dice_sd", "dice_by_grade"):
        assert again["mob_pw"][key] == results["mob_pw"][key], key


def test_an_h2g_design_gives_the_same_dice_from_masks_and_geojson(smoke_run, tiny_cohort, tmp_path):
    """Mob-PW trained and scored from the cohort's GeoJSON manifest, against the same design
    from the masks (the session's run, same config and seed): the same patch labels train
    the same classifier, so its heatmaps are identical (compared because the tiny models
    collapse: both Dice are those of an all-background prediction), and the Dice agree."""
    from h2g.data import cohort
    from h2g.systems.h2g.pipeline import Pipeline
    from h2g.systems.registry import get_design

    out, raster = smoke_run
    assert tiny_cohort.name == cohort.MANIFEST_NAME
    geojson = tiny_cohort.parent / cohort.GEOJSON_MANIFEST_NAME
    polygons = run(resolve(["mob_pw"]), geojson, tmp_path / "geojson", tiny_config())
    assert abs(raster["mob_pw"]["dice_mean"] - polygons["mob_pw"]["dice_mean"]) <= 0.01
    design = get_design("mob_pw")
    folders = []
    for manifest, folder in ((tiny_cohort, out), (geojson, tmp_path / "geojson")):
        pipe = Pipeline(manifest, folder, tiny_config())
        folders.append(pipe.heatmap_stage(pipe.classifier_stage(design)).dir)  # both done: nothing retrained
    assert folders[0].name != folders[1].name  # different manifests, different stages
    slides = sorted(p.name for p in folders[0].glob("*.npz"))
    assert len(slides) == 6 and slides == sorted(p.name for p in folders[1].glob("*.npz"))
    for name in slides:
        assert np.array_equal(np.load(folders[0] / name)["probs"], np.load(folders[1] / name)["probs"]), name


def test_eval_real(smoke_run, real_data, tmp_path):
    """tools/eval_real.py on the session run's Mob-PW-UNet over the real BCSS regions."""
    from helpers import run_tool

    out = run_tool("eval_real", smoke_run[0] / "mob_pw_unet", "--real-data", real_data, "--out", tmp_path)
    assert "Dice" in out.stdout
    table = list(csv.DictReader((tmp_path / "real_bcss.csv").open()))
    assert len(table) == 3
