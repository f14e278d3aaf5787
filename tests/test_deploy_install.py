"""The deployment install: the base package (``pip install h2g``, no extras) in a fresh
venv has no TensorFlow, yet segments a slide and benchmarks it with exported models; the
training CLIs there stop with one line naming the ``train`` extra.

It builds a venv from the package index (a minute or two, network or a pip cache needed),
so it runs in CI (``CI`` set) or when ``H2G_TEST_DEPLOY_INSTALL=1``; elsewhere it skips.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from synthetic import make_slide
from helpers import CELL, PATCH, colour_model, threshold_refiner

from h2g.export.conversion import signature, to_onnx, to_openvino

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("H2G_TEST_DEPLOY_INSTALL")),
                       reason="builds a fresh venv from the package index: runs in CI or with "
                              "H2G_TEST_DEPLOY_INSTALL=1"),
]
REFINE_SIZE = 64


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=900,
                          cwd=kw.pop("cwd", None), **kw)


@pytest.fixture(scope="module")
def deploy_venv(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install REPO`` (the base package only); its python."""
    venv = tmp_path_factory.mktemp("deploy") / "venv"
    done = _run([sys.executable, "-m", "venv", venv])
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    done = _run([python, "-m", "pip", "install", "--quiet", REPO])
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def test_base_install_has_no_training_stack(deploy_venv):
    probe = _run([deploy_venv, "-c", "import tensorflow"], cwd="/")
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr
    for name in ("keras", "tf2onnx", "sklearn", "albumentations", "matplotlib"):
        assert _run([deploy_venv, "-c", f"import {name}"], cwd="/").returncode != 0, name
    # the package itself, and what deployment imports, import there (outside the checkout)
    done = _run([deploy_venv, "-c", "import h2g, h2g.export.deploy, h2g.export.benchmark, h2g.export.cohort; "
                 "print(h2g.__file__)"], cwd="/")
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout


def test_base_install_segments_and_benchmarks_a_slide(deploy_venv, tmp_path):
    slide = make_slide(tmp_path / "checker.tiff", size=(4 * CELL + CELL // 2, 3 * CELL + CELL // 4),
                       pattern="checker", cell=CELL, compression=None, downsamples=(1, 4))
    models = {}
    for name, model in (("patch", colour_model()), ("refine", threshold_refiner(REFINE_SIZE))):
        onnx_path = to_onnx(model, signature(model, name), tmp_path / f"{name}.onnx")
        models[name] = (onnx_path, to_openvino(onnx_path, tmp_path / f"{name}.xml"))

    out = tmp_path / "seg"
    done = _run([deploy_venv, REPO / "export" / "segment_slide.py", "--patch-model", models["patch"][1],
                 "--refine-model", models["refine"][1],
                 "--slide", slide, "--engine", "openvino", "--device", "CPU", "--precision", "f32",
                 "--out", out, "--patch-size", PATCH, "--size", REFINE_SIZE, "--batch-size", 4, "--quiet"],
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patches"] > 0 and (out / "segmentation.tiff").is_file()

    bench = tmp_path / "bench.json"
    done = _run([deploy_venv, REPO / "export" / "benchmark.py", "--slide", slide, "--patch-model",
                 models["patch"][0], "--refine-model", models["refine"][0], "--engine", "onnxruntime",
                 "--repeats", 1, "--patch-size", PATCH, "--size", REFINE_SIZE, "--json", bench], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(bench.read_text())
    assert result["patches"] == summary["patches"] and result["engine"] == "onnxruntime"


def test_training_commands_name_the_extra_in_a_base_install(deploy_venv, tmp_path):
    commands = ([REPO / "experiments" / "run.py", "--design", "mob_pw"],
                [REPO / "export" / "convert.py", tmp_path])
    for command in commands:
        done = _run([deploy_venv, *command], cwd=tmp_path)
        assert done.returncode == 2, (command, done.stderr)
        assert "h2g[train]" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
