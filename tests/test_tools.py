"""Every tool of the README's tools table, run as the README documents it (a fresh
interpreter from the repository root, cheap arguments where the tool takes sizes), ending
with exit code 0 and the outputs it promises.  What the numbers mean is each tool's own
test file's business (test_cohort, test_cohort_report, test_eval_real, test_evaluation,
test_seeds, test_inspect_slide, test_models, test_reliability, test_cohort_reliability);
here a tool that crashes on its documented arguments (model_summary.py did) fails."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, REPO
from helpers import run_tool as tool


def test_the_tools_table_lists_every_tool():
    """The README's tools table names every script in tools/ (so this file's list is the
    README's)."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Tools", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`python tools/(\w+)\.py", table))
    assert listed == {p.stem for p in (REPO / "tools").glob("*.py")}, sorted(listed ^ {p.stem for p in
                                                                                    (REPO / "tools").glob("*.py")})


def test_inspect_slide(tiny_cohort, tmp_path):
    rows = list(csv.DictReader(tiny_cohort.open()))
    slide, mask = (tiny_cohort.parent / rows[0][k] for k in ("slide_path", "annotation_path"))
    out = tool("inspect_slide", slide, "--annotation", mask, "--png", tmp_path / "t.png", "--json")
    report = json.loads(out.stdout)
    assert report["tissue_patches"] > 0 and sum(report["patches"].values()) > 0
    assert (tmp_path / "t.png").stat().st_size > 0


def test_heatmap_ceiling(tiny_cohort):
    out = tool("heatmap_ceiling", "--manifest", tiny_cohort, "--split", "test", "--strides", "256", "128")
    assert "256" in out.stdout and "128" in out.stdout


@pytest.mark.slow  # TensorFlow's start-up and a ResNet18 FCN: ~11 s
def test_model_summary_of_the_architecture_that_crashed():
    rows = json.loads(tool("model_summary", "resnet18_fcn", "razn_policy", "--json").stdout)
    assert rows["resnet18_fcn"]["params"] > 11_000_000 and rows["razn_policy"]["params"] > 0


@pytest.mark.slow
def test_model_summary_of_every_architecture():
    from h2g.models import ARCHITECTURES  # noqa: F401  (only the names; the tool builds them)

    rows = json.loads(tool("model_summary", "--json").stdout)
    assert set(rows) == set(ARCHITECTURES)
    assert all(r["params"] > 0 for r in rows.values())
    assert "deviation" in tool("model_summary", "unet").stdout


@pytest.mark.slow
def test_make_cohort(tmp_path):
    out = tool("make_cohort", "--preset", "tiny", "--out", tmp_path, "--seed", "1", "--quiet")
    assert "wrote" in out.stdout
    assert len(list(csv.DictReader((tmp_path / "data_manifest.csv").open()))) == 6


@pytest.mark.slow
def test_cohort_report(tiny_cohort, tmp_path):
    tool("cohort_report", "--preset", "tiny", "--out", tmp_path, "--cohort-dir", tiny_cohort.parent, "--slides", "2",
         "--real-data", REAL_DATA, "--quiet")
    for name in ("contact_sheet.png", "colour_nuclei.png", "cohort_stats.csv", "cohort_stats.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_bench_sampler(tiny_cohort):
    report = json.loads(tool("bench_sampler", "--manifest", tiny_cohort, "--batches", "2", "--batch-size", "8",
                             "--repeats", "1", "--json").stdout)
    assert report and "ratio" in json.dumps(report)


@pytest.mark.slow
def test_bench_training(tiny_cohort):
    report = json.loads(tool("bench_training", "--manifest", tiny_cohort, "--steps", "2", "--warmup", "1",
                             "--rounds", "1", "--batch-size", "4", "--json").stdout)
    assert "ratio" in json.dumps(report)


@pytest.mark.slow
def test_bench_cohort_and_reads(tmp_path):
    out = tool("bench_cohort", "--executor", "process", "--copies", "1", "--work", tmp_path, "--json")
    report = json.loads(out.stdout)
    assert report["workers"]["1"]["slides_per_hour"] > 0 and report["ratio"] > 0
    slide = sorted((tmp_path / "cohort").rglob("slides/*.tiff"))[0]
    assert "ms" in tool("bench_reads", "--slide", slide, "--patches", "20").stdout
    tissue = json.loads(tool("bench_reads", "--slide", slide, "--tissue", "--rounds", "1", "--json").stdout)
    assert set(tissue["seconds"]) == {"openslide", "tiles", "reduced"} and tissue["mask_pixels_differing"] == 0
    assert 0 <= tissue["reduced_mask_pixels_differing"] < 0.02 * np.prod(tissue["mask_shape"])


@pytest.mark.slow
def test_bench_sub_batch(deploy_models, tmp_path):
    """Every size and the latency row of each model, the ratio against size 1 of the same
    model; a size above the batch is one line, exit 2."""
    xml = deploy_models["patch"][2]
    out = tool("bench_sub_batch", xml, "--sizes", "1", "2", "--batch", "4", "--batches", "1", "--rounds", "2",
               "--precision", "f32", "--markdown", tmp_path / "sub.md")
    rows = [line for line in (tmp_path / "sub.md").read_text().splitlines() if line.startswith(f"| {xml.name}")]
    assert [r.split(" | ")[1:3] for r in rows] == [["throughput", "1"], ["throughput", "2"], ["latency", "-"]]
    assert rows[0].split(" | ")[6] == "1.00x" and "wrote" in out.stdout
    assert "ratio to sub-batch 1 (the first size)" in (tmp_path / "sub.md").read_text()
    bad = subprocess.run([sys.executable, "tools/bench_sub_batch.py", str(xml), "--sizes", "8", "--batch", "4"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --sizes must be from 1 to --batch (4), got [8]"]


@pytest.mark.slow
def test_bench_memory(tmp_path):
    report = json.loads(tool("bench_memory", "--slides", "6", "--warmup", "2", "--engine", "onnxruntime",
                             "--max-slides-per-worker", "3", "--work", tmp_path, "--json").stdout)
    assert report["slides"] == 6 and report["worker_processes"] == 2
    assert report["rss_mb"]["slope_mb_per_slide"] is not None


@pytest.mark.slow
def test_bench_flat_slide(tmp_path):
    report = json.loads(tool("bench_flat_slide", "--side", "8192", "--size", "256", "--work", tmp_path,
                             "--json").stdout)
    assert report["levels"] == 1 and abs(report["tissue_share"]["tissue"] - report["tissue_share"]["written"]) < 0.01


@pytest.mark.slow
def test_profile_zoom(tiny_cohort):
    slide = tiny_cohort.parent / next(csv.DictReader(tiny_cohort.open()))["slide_path"]
    out = tool("profile_zoom", "--slide", slide, "--repeats", "1")
    assert out.stdout.strip()


def test_bench_monai_without_the_peers_extra_says_so(tmp_path):
    """Without MONAI the tool's documented command ends in one line naming the extra
    (tests/test_monai_peer.py runs the peer itself where MONAI is installed)."""
    try:
        import monai  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("MONAI is installed: tests/test_monai_peer.py runs the peer")
    (tmp_path / "m.onnx").write_bytes(b"")
    proc = subprocess.run([sys.executable, "tools/bench_monai.py", "--slide", str(tmp_path / "s.tiff"), "--model",
                           str(tmp_path / "m.onnx")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "h2g[peers]" in lines[0], proc.stderr


@pytest.fixture()
def two_seeds(tmp_path) -> list[Path]:
    """Two run folders (seeds 0 and 1) of UNet-LR and Mob-PW-UNet as experiments/run.py
    writes them, reduced to what seed_summary reads (``metrics.json``; training them is
    tested elsewhere)."""
    dice = {0: {"unet_lr": 0.70, "mob_pw_unet": 0.80}, 1: {"unet_lr": 0.74, "mob_pw_unet": 0.76}}
    labels = {"unet_lr": "UNet-LR", "mob_pw_unet": "Mob-PW-UNet"}
    runs = []
    for seed, designs in dice.items():
        for name, value in designs.items():
            folder = tmp_path / f"seed{seed}" / name
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({"design": name, "label": labels[name],
                                                             "dice_mean": value, "seed": seed, "preset": "smoke",
                                                             "n_test_slides": 2}))
        runs.append(tmp_path / f"seed{seed}")
    return runs


@pytest.mark.slow
def test_seed_summary(two_seeds, tmp_path):
    out = tool("seed_summary", *two_seeds, "--pair", "mob_pw_unet", "unet_lr", "--out", tmp_path / "summary")
    assert "Mob-PW-UNet" in out.stdout
    assert "| Mob-PW-UNet − UNet-LR | +0.100 | +0.020 | +0.060 ± 0.057 | 2 of 2 |" in out.stdout  # by hand
    assert (tmp_path / "summary" / "seeds.png").stat().st_size > 0


def test_ci_runs_the_readmes_test_command():
    """`.ci/run` ends in the README's test command (the quick start's second line), and that
    command runs the two workers `tests/conftest.py` arranges the files for."""
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = quick_start.strip().splitlines()[1].split("&&", 1)[1].strip()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("python -m pytest")]
    assert ci == [command]
    assert "--dist loadfile" in command and "--no-loadscope-reorder" in command
