"""Cohort inference (export/segment_cohort.py): a cohort on a local Ray with 2 CPUs and on
the process pool without Ray, with one corrupt slide and one slide without tissue.

The models are test_export's tiny exported colour classifier + threshold refiner (ONNX
Runtime), the slides tiny synthetic ones, so the whole file runs in well under a minute.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from synthetic import make_slide
from helpers import CELL, PATCH, REFINE_SIZE, Recorder, load_cli

from h2g.core.cli import run_cli
from h2g.inference.raster import Raster
from h2g.inference.segmenter import raster_tumour_mm2
from h2g.systems.h2g.segmenter import mask_area_mm2

MPP = 0.25  # the synthetic slides' microns per pixel


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, checker_path):  # noqa: F811
    """A manifest of four slides: the checker and a tissue block (good), a slide of bare
    glass (no tissue) and a corrupt .svs."""
    folder = tmp_path_factory.mktemp("cohort")
    block = make_slide(folder / "block.tiff", size=(4 * CELL, 3 * CELL), tissue=(CELL, CELL, 2 * CELL, CELL),
                       compression=None, downsamples=(1, 4))
    glass = make_slide(folder / "glass.tiff", size=(4 * CELL, 3 * CELL), tissue=(0, 0, 0, 0),
                       compression=None, downsamples=(1, 4))
    corrupt = folder / "corrupt.svs"
    corrupt.write_bytes(b"\x00\x01 this is not an Aperio slide " * 64)
    manifest = folder / "manifest.csv"
    rows = [("checker", checker_path, "test"), ("block", block.name, "train"), ("glass", glass.name, "val"),
            ("corrupt", corrupt.name, "test")]
    manifest.write_text("slide_id,slide_path,annotation_path,split\n"
                        + "".join(f"{i},{p},,{s}\n" for i, p, s in rows))
    return manifest


def cohort_argv(manifest, deploy_models, out, *extra) -> list[str]:  # noqa: F811
    patch_onnx, refine_onnx = deploy_models["patch"][1], deploy_models["refine"][1]
    return [str(manifest), "--patch-model", str(patch_onnx), "--refine-model", str(refine_onnx),
            "--engine", "onnxruntime", "--device", "CPU", "--patch-size", str(PATCH), "--size", str(REFINE_SIZE),
            "--batch-size", "4", "--out", str(out), "--quiet", *extra]


def read_table(out) -> dict[str, dict]:
    with open(out / "cohort.csv", newline="") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def output_files(out) -> dict[str, int]:
    """Every file under the slides' folders with its mtime (ns)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in out.glob("*/*") if p.is_file()}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(local_ray, cohort, deploy_models, tmp_path_factory):  # noqa: F811
    """The cohort segmented once on the local Ray: (out folder, exit code, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ray_run") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_cli(load_cli("segment_cohort").main, cohort_argv(cohort, deploy_models, out))
    return out, code, stdout.getvalue()


@pytest.mark.slow
def test_ray_cohort_completes_good_slides_and_reports_both_problems(ray_run):
    out, code, printed = ray_run
    assert code == 1  # one slide failed
    table = read_table(out)
    assert list(table) == ["checker", "block", "glass", "corrupt"]  # the manifest's order
    assert [table[s]["status"] for s in table] == ["done", "done", "done", "failed"]

    corrupt = table["corrupt"]
    assert corrupt["attempts"] == "2" and "corrupt slide" in corrupt["error"] and "corrupt.svs" in corrupt["error"]
    assert not (out / "corrupt").exists()
    glass = table["glass"]
    assert glass["patches"] == "0" and float(glass["tumour_mm2"]) == 0 and "no tissue" in glass["warning"]
    assert json.loads((out / "glass" / "summary.json").read_text())["no_tissue"] is True
    assert "failed: corrupt" in printed and "warning: glass" in printed and "on ray" in printed

    for slide in ("checker", "block"):
        row = table[slide]
        assert row["attempts"] == "1" and not row["error"] and not row["warning"] and int(row["patches"]) > 0
        assert float(row["seconds"]) > 0 and float(row["peak_memory_mb"]) > 10
        summary = json.loads((out / slide / "summary.json").read_text())
        assert summary["patches"] == int(row["patches"])
        assert summary["files"]["geojson"] == str(out / slide / "tumour.geojson")  # the final folder
        mask = np.asarray(Image.open(out / slide / "segmentation.png")) > 127
        w, h = summary["dimensions"]
        expected = mask.sum() * (w * MPP / REFINE_SIZE) * (h * MPP / REFINE_SIZE) / 1e6
        assert mask.any() and float(row["tumour_mm2"]) == pytest.approx(expected, rel=1e-5)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_a_second_run_skips_every_finished_slide_without_rewriting_it(ray_run, cohort, deploy_models, capsys):  # noqa: F811
    out, _, _ = ray_run
    before, first = output_files(out), read_table(out)
    # An interrupted run: a temporary folder left behind, and a slide folder without its
    # done marker (incomplete): the first is removed, the second segmented again.
    stale = out / ".block.tmp-123-abcdef"
    stale.mkdir()
    (stale / "heatmap.npy").write_bytes(b"half")
    (out / "checker" / "done.json").unlink()
    code = run_cli(load_cli("segment_cohort").main, cohort_argv(cohort, deploy_models, out))
    assert code == 1 and not stale.exists()
    table = read_table(out)
    assert [table[s]["status"] for s in table] == ["done", "skipped", "skipped", "failed"]
    for slide in ("checker", "block", "glass"):  # the same figures (skipped: the first run's)
        assert table[slide]["patches"] == first[slide]["patches"]
        assert table[slide]["tumour_mm2"] == first[slide]["tumour_mm2"]
    assert table["corrupt"]["attempts"] == "2"  # a failed slide is tried again on a resume
    assert (out / "checker" / "done.json").is_file()
    after = output_files(out)
    assert {k: v for k, v in after.items() if not k.startswith("checker")} == \
        {k: v for k, v in before.items() if not k.startswith("checker")}  # skipped: not rewritten (mtimes)
    assert "failed: corrupt" in capsys.readouterr().out

    # Everything finished now but the corrupt slide: a third run skips the rest.
    before = output_files(out)
    assert run_cli(load_cli("segment_cohort").main, cohort_argv(cohort, deploy_models, out)) == 1
    assert [r["status"] for r in read_table(out).values()] == ["skipped", "skipped", "skipped", "failed"]
    assert output_files(out) == before
    capsys.readouterr()

    # Other settings into the same folder: refused (exit 2, one line), nothing touched.
    code = run_cli(load_cli("segment_cohort").main,
                   cohort_argv(cohort, deploy_models, out, "--magnification", "5", "--force"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cohort.json" in err and "other" in err
    assert output_files(out) == before


@pytest.mark.slow
def test_process_pool_without_ray_gives_the_same_outputs(cohort, deploy_models, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                         request):
    """With ``ray`` not importable the same command runs on the process pool; its outputs
    are those of export/segment_slide.py on each slide and (when Ray is here) of the Ray run."""
    from h2g.export.executors import ray_available

    ray_out = request.getfixturevalue("ray_run")[0] if ray_available() else None
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "pool"
    code = run_cli(load_cli("segment_cohort").main, cohort_argv(cohort, deploy_models, out, "--workers", "2"))
    printed = capsys.readouterr().out
    assert code == 1 and "on process" in printed and "failed: corrupt" in printed
    table = read_table(out)
    assert [table[s]["status"] for s in table] == ["done", "done", "done", "failed"]
    assert table["corrupt"]["attempts"] == "2" and "no tissue" in table["glass"]["warning"]

    segment_slide = load_cli("segment_slide").main
    patch_onnx, refine_onnx = deploy_models["patch"][1], deploy_models["refine"][1]
    for slide in ("checker", "block", "glass"):
        single = tmp_path / "single" / slide
        path = table[slide]["path"]
        assert segment_slide([path, "--patch-model", str(patch_onnx), "--refine-model", str(refine_onnx),
                              "--engine", "onnxruntime", "--patch-size", str(PATCH), "--size", str(REFINE_SIZE),
                              "--batch-size", "4", "--out", str(single), "--quiet"]) == 0
        references = [single] + ([ray_out / slide] if ray_out else [])
        for reference in references:
            np.testing.assert_allclose(np.load(out / slide / "heatmap.npy"), np.load(reference / "heatmap.npy"),
                                       atol=1e-6)
            for image in ("segmentation.png", "heatmap.png"):
                np.testing.assert_array_equal(np.asarray(Image.open(out / slide / image)),
                                              np.asarray(Image.open(reference / image)))
        if ray_out:
            assert table[slide]["tumour_mm2"] == read_table(ray_out)[slide]["tumour_mm2"]


def test_a_failing_slide_leaves_no_folder_that_looks_done(cohort, deploy_models, tmp_path, monkeypatch):  # noqa: F811
    import h2g.io.overlay
    from h2g.export.cohort import run_task
    from h2g.export.deploy import Deployment
    from h2g.inference.segmenter import EngineOptions

    def broken(path, *args, **kw):
        Path(path).write_bytes(b"half a TIFF")
        raise OSError("disk full")

    monkeypatch.setattr(h2g.io.overlay, "write_pyramid", broken)
    plan = Deployment({"patch_classifier": deploy_models["patch"][1], "refinement": deploy_models["refine"][1]},
                      EngineOptions(engine="onnxruntime", threads=1), settings={"patch_size": PATCH, "size": REFINE_SIZE})
    row = run_task({"slide_id": "block", "path": str(cohort.parent / "block.tiff"), "mpp": None,
                    "out_dir": str(tmp_path / "block"), "plan": plan})
    assert row["status"] == "failed" and row["error"] == "OSError: disk full"
    assert list(tmp_path.iterdir()) == []  # no slide folder, no temporary one


def test_a_multi_class_model_runs_by_sliding_window_with_its_tumour_area(tmp_path, monkeypatch):
    """segment_one runs the plan's segmenter: a segmentation model with views (here a
    recorder predicting class 0, named "Tumour", everywhere) runs by sliding window; its
    tumour area is the tissue the windows covered."""
    from h2g.data.views import View
    from h2g.export import cohort
    from h2g.export.deploy import Deployment
    from h2g.inference.metadata import ModelMetadata
    from h2g.inference.segmenter import SlidingSegmenter

    slide = make_slide(tmp_path / "s.tiff", size=(2560, 1536), tissue=(512, 256, 1024, 512), compression=None)
    meta = ModelMetadata(role="segmentation", views=(View("image", 10, 64),), output="pixel_probs",
                         classes=({"name": "Tumour", "colour": (200, 0, 0)}, {"name": "stroma", "colour": (0, 150, 0)}))
    segmenter = SlidingSegmenter({"segmentation": Recorder(["image"], 64)}, metadata={"segmentation": meta})
    monkeypatch.setattr(cohort, "worker_segmenter", lambda plan: segmenter)
    row = cohort.segment_one(slide, tmp_path / "out" / "s", Deployment(("model.onnx",)))
    assert row["patches"] == 8  # the 2 x 4 windows over the tissue block
    assert row["mpp"] == MPP and row["mpp_source"] == "metadata"
    # The block's 1024 x 512 level-0 px at 0.25 um/px: 32768 um^2.
    assert row["tumour_mm2"] == pytest.approx(1024 * 512 * MPP**2 / 1e6)
    summary = json.loads((tmp_path / "out" / "s" / "summary.json").read_text())
    assert summary["windows"] == 8 and (tmp_path / "out" / "s" / "done.json").is_file()


def test_tumour_area_of_masks_and_multi_class_rasters():
    mask = np.zeros((4, 8), bool)
    mask[1:3, 2:5] = True  # 6 pixels, each (800 x 0.5 / 8) x (400 x 0.5 / 4) um = 50 x 50 um
    assert mask_area_mm2(mask, (800, 400), 0.5) == pytest.approx(6 * 2500 / 1e6)
    probs = np.zeros((3, 5, 3), np.float32)
    probs[..., 0] = 0.5
    probs[0, :2, 2] = 0.9  # 2 raster pixels of class 2
    covered = np.ones((3, 5), bool)
    covered[0, 0] = False  # not predicted: not tumour
    raster = Raster(probs, 16, (80, 48), covered)  # a pixel: (16 x 0.25 um)^2 = 16 um^2
    assert raster_tumour_mm2(raster, ["stroma", "benign", "Invasive_Tumor"], 0.25) == pytest.approx(16 / 1e6)
    assert raster_tumour_mm2(raster, ["stroma", "benign", "fat"], 0.25) is None


@pytest.mark.slow
def test_mpp_is_a_fallback_and_force_mpp_an_override(deploy_models, tmp_path, capsys):  # noqa: F811
    """--mpp scales only a slide whose file states no scale: a 0.25 um/px slide beside one
    without a scale keeps its own patches and tumour area; --force-mpp rescales both.
    cohort.csv records which mpp each slide was read at, and where it came from."""
    folder = tmp_path / "slides"
    folder.mkdir()
    scaled = make_slide(folder / "scaled.tiff", size=(4 * CELL, 3 * CELL), tissue=(CELL, CELL, 2 * CELL, CELL),
                        compression=None, downsamples=(1, 4))
    make_slide(folder / "bare.tiff", size=(4 * CELL, 3 * CELL), tissue=(CELL, CELL, 2 * CELL, CELL), mpp=None,
               compression=None, downsamples=(1, 4))
    patch_onnx, refine_onnx = deploy_models["patch"][1], deploy_models["refine"][1]

    def run(out, *extra):
        argv = [str(folder), "--patch-model", str(patch_onnx), "--refine-model", str(refine_onnx), "--engine",
                "onnxruntime", "--patch-size", str(PATCH), "--size", str(REFINE_SIZE), "--out", str(out),
                "--executor", "process", "--workers", "1", "--quiet", *extra]
        code = run_cli(load_cli("segment_cohort").main, argv)
        capsys.readouterr()
        return code, read_table(out)

    code, alone = run(tmp_path / "alone")  # no --mpp: the bare slide cannot be scaled
    assert code == 1 and alone["scaled"]["status"] == "done" and alone["bare"]["status"] == "failed"
    assert "mpp" in alone["bare"]["error"]
    code, fallback = run(tmp_path / "fallback", "--mpp", "0.5")
    assert code == 0
    assert (fallback["scaled"]["mpp"], fallback["scaled"]["mpp_source"]) == ("0.25", "metadata")
    assert (fallback["bare"]["mpp"], fallback["bare"]["mpp_source"]) == ("0.5", "fallback")
    for column in ("patches", "tumour_mm2"):  # the scaled slide is untouched by the fallback
        assert fallback["scaled"][column] == alone["scaled"][column]
    code, forced = run(tmp_path / "forced", "--force-mpp", "0.5")
    assert code == 0 and all(forced[s]["mpp"] == "0.5" and forced[s]["mpp_source"] == "override" for s in forced)
    # at 0.5 um/px a 10x patch spans half the level-0 pixels: four times the patches
    assert int(forced["scaled"]["patches"]) == 4 * int(alone["scaled"]["patches"])
