"""tools/inspect_slide.py: as users run it (a subprocess from the repository root) and,
for the quick cases, in process through the same h2g.core.cli.run_cli wrapper."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import make_mask, make_slide

from h2g.core.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
SIZE = (4096, 3072)


def run_tool(*args):
    return subprocess.run([sys.executable, "tools/inspect_slide.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def load_tool():
    spec = importlib.util.spec_from_file_location("inspect_slide", REPO / "tools" / "inspect_slide.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(capsys, *args):
    code = run_cli(load_tool().main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tissue over cells (1, 1)-(1, 3) of a 3 x 4 grid of 10x patches; tumour fills (1, 1),
    covers 10 % of (1, 2), none of (1, 3)."""
    folder = tmp_path_factory.mktemp("inspect")
    slide = make_slide(folder / "s.tiff", SIZE, pattern="tissue", tissue=(1024, 1024, 3072, 1024))
    mask = make_mask(folder / "m.png", SIZE, [(1024, 1024, 1024, 1024), (2048, 1024, 1024, 100)])
    return folder, slide, mask


def test_json_report(files):
    folder, slide, mask = files
    png = folder / "overview.png"
    done = run_tool(slide, "--annotation", mask, "--json", "--png", png)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "generic-tiff"
    assert report["dimensions"] == [4096, 3072] and report["level_count"] == 3
    assert report["level_downsamples"] == [1.0, 4.0, 16.0]
    assert report["mpp"] == pytest.approx(0.25) and report["objective_power"] == 40
    assert report["tissue_fraction"] == pytest.approx(0.25)  # 3072 x 1024 of 4096 x 3072
    assert report["tissue_patches"] == 3
    assert report["patches"] == {"tumour": 1, "non_tumour": 1, "discarded": 1, "background": 9}

    # 1.25x is 128 x 96, enlarged 8 times; tumour patch outlined red, non-tumour green,
    # tissue tinted, glass left white
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (768, 1024, 3)
    assert tuple(image[256, 300]) == (220, 0, 0) and tuple(image[256, 812]) == (0, 170, 0)
    assert tuple(image[100, 100]) == (255, 255, 255)
    tinted = image[384, 400].astype(int)
    assert tinted[2] > tinted[0] and tuple(tinted) != (200, 80, 150)


def test_readable_summary_without_annotation(files, capsys):
    _, slide, _ = files
    code, out, err = run_in_process(capsys, slide, "--mpp", "0.5")
    assert code == 0, err
    assert "generic-tiff" in out and "0.5 um/px, 20x objective" in out
    assert "25.0% of the 1.25x plane" in out and "labelled" not in out
    code, out, _ = run_in_process(capsys, slide, "--json")
    assert "patches" not in json.loads(out)


def test_bad_input_exits_2_with_one_line(files, tmp_path, capsys):
    folder, slide, _ = files
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    cases = [
        ((tmp_path / "missing.svs",), "file not found"),
        ((slide, "--annotation", tmp_path / "small.png"), "mask is 10x10 px"),
        ((slide, "--mpp", "-2"), "positive number"),
        ((slide, "--png", tmp_path / "no" / "such" / "dir.png"), "cannot write the PNG"),
    ]
    for args, problem in cases:
        code, out, err = run_in_process(capsys, *args)
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and problem in lines[0]


@pytest.mark.realdata
@pytest.mark.slow
def test_real_slides(real_data):
    slides = real_data / "slides"
    done = run_tool(slides / "cmu_small_region.svs", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "aperio" and report["dimensions"] == [2220, 2967]
    assert report["objective_power"] == 20 and report["mpp"] == pytest.approx(0.499)
    assert 0.25 < report["tissue_fraction"] < 0.45

    broken = run_tool(slides / "broken.svs", "--json")
    assert broken.returncode == 2 and broken.stdout == ""
    assert broken.stderr.count("\n") == 1 and "broken.svs" in broken.stderr
    assert "corrupt" in broken.stderr and "Traceback" not in broken.stderr

    tcga = slides / "tcga-cr-7395-01a-01-ts1.svs"
    no_scale = run_tool(tcga, "--json")
    assert no_scale.returncode == 2 and "--mpp" in no_scale.stderr and "Traceback" not in no_scale.stderr
    with_scale = run_tool(tcga, "--json", "--mpp", "0.5")
    assert with_scale.returncode == 0, with_scale.stderr
    assert json.loads(with_scale.stdout)["objective_power"] == 20
