"""Reliability of the command-line tools (issue 29): bad outputs refused before the work,
sizes refused at the edge, a model whose output disagrees with its metadata refused when
it loads, nothing timed on a slide without tissue, inspect_slide and segment_slide
agreeing on tissue, arguments parsed before TensorFlow loads.

Models are tiny ONNX graphs (tests/tiny_onnx.py), slides tiny synthetic TIFFs: no
TensorFlow in this file's processes, except to check that the CLIs do not import it."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from synthetic import make_slide
from tiny_onnx import h2g_models, patch_classifier, refiner

from h2g.core.errors import ConfigError, ExportError
from h2g.core.outputs import check_output_dir, check_output_file


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny H2G-Net pair with 256 px patches at 10x (as the paper's)."""
    folder = tmp_path_factory.mktemp("models")
    return [patch_classifier(folder / "patch.onnx", 256), refiner(folder / "refine.onnx", 64)]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    return {
        "tissue": make_slide(folder / "tissue.tiff", size=(4096, 3072), downsamples=(1, 4)),
        "glass": make_slide(folder / "glass.tiff", size=(4096, 3072), tissue=(0, 0, 0, 0), downsamples=(1, 4)),
        "tiny": make_slide(folder / "tiny.tiff", size=(200, 150), tissue=(0, 0, 200, 150), downsamples=(1,)),
    }


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only one (not for root, who
    writes anyway), else under /sys, which refuses even root."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    probe = Path("/sys/h2g-reliability-probe")
    try:
        probe.mkdir()
    except OSError:
        return probe / "out"
    probe.rmdir()
    pytest.skip("no folder here refuses writes")


def run(script: str, *args, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """``script`` (repo-relative) in a fresh interpreter: the result and its CPU seconds
    (user + system: a measure the machine's load does not inflate as it does wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ------------------------------------------------------------------ item 8: outputs first
def test_output_checks(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*a_file: exists and is not a folder"):
        check_output_dir(a_file)
    with pytest.raises(ConfigError, match=r"a_file is a file, not a folder"):
        check_output_dir(a_file / "sub" / "out")
    with pytest.raises(ConfigError, match="cannot create files in"):
        check_output_dir(unwritable_folder(tmp_path))
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not made
    with pytest.raises(ConfigError, match=r"--json .*: is a folder, not a file"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(ConfigError, match=r"--markdown .*x.md: its folder .*a_file exists and is not a folder"):
        check_output_file(a_file / "x.md", "--markdown")
    assert check_output_file(tmp_path / "new" / "x.json", "--json").name == "x.json"
    assert not any(p.name.startswith(".h2g-write-check") for p in tmp_path.iterdir())


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_deployment_clis_check_their_outputs_before_loading_anything(case, models, tmp_path):
    """A bad --out / --json / --markdown is one line, exit 2, before the models load and
    before the slide is opened: the slide given does not exist, so a check made after
    either would report the slide or the model instead."""
    bad = tmp_path / "a_file" if case == "file" else unwritable_folder(tmp_path)
    if case == "file":
        bad.write_text("x")
    missing_slide = tmp_path / "no_such_slide.tiff"
    pair = ["--patch-model", models[0], "--refine-model", models[1]]
    runs = {
        "segment_slide": ("export/segment_slide.py", "--slide", missing_slide, *pair, "--out", bad),
        "segment_cohort": ("export/segment_cohort.py", tmp_path, *pair, "--out", bad, "--executor", "process"),
        "benchmark --json": ("export/benchmark.py", "--slide", missing_slide, *pair, "--json", bad / "b.json"),
        "benchmark --markdown": ("export/benchmark.py", "--slide", missing_slide, *pair, "--markdown",
                                 bad / "b.md"),
    }
    for name, (script, *args) in runs.items():
        proc, _ = run(script, *args)
        line = one_line_error(proc)
        option = name.split()[-1] if name.startswith("benchmark") else "--out"
        assert line.startswith(f"error: {option} ") and str(bad) in line, (name, line)
        assert "no_such_slide" not in line, (name, line)


@pytest.mark.parametrize("script,args", [
    ("experiments/run.py", ("--design", "otsu")),
    ("export/convert.py", ("no_such_run",)),
])
def test_training_clis_check_out_before_tensorflow(script, args, tmp_path):
    """run.py and convert.py: --out an existing file is one line and exit 2, before
    TensorFlow starts (convert.py used to say "tf2onnx cannot convert")."""
    bad = tmp_path / "a_file"
    bad.write_text("x")
    proc, cpu = run(script, *args, "--out", bad)
    line = one_line_error(proc)
    assert line == f"error: --out {bad}: exists and is not a folder"
    assert cpu < 2.0, f"{cpu:.1f} CPU s: TensorFlow was started"


# ------------------------------------------------------------------ item 11: parse before TensorFlow
PROBE = """
import runpy, sys
sys.argv = [{script!r}, *{args!r}, "--no-such-flag"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exc:
    print(exc.code, "tensorflow" in sys.modules, "keras" in sys.modules)
"""


@pytest.mark.parametrize("script,args", [("experiments/run.py", ["--design", "otsu"]),
                                         ("export/convert.py", ["runs/x"])])
def test_an_unknown_flag_fails_before_tensorflow_loads(script, args):
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", PROBE.format(script=str(REPO / script), args=args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "unrecognized arguments: --no-such-flag" in proc.stderr
    assert cpu < 2.0, f"{cpu:.2f} CPU s ({wall:.1f} s wall)"


# ------------------------------------------------------------------ item 9: sizes at the edge
@pytest.mark.parametrize("option,value,range_", [("--size", 0, "16 to 8192"), ("--size", 100000, "16 to 8192"),
                                                 ("--patch-size", 0, "8 to 2048"), ("--batch-size", 0, "1 to 1024")])
def test_sizes_out_of_range_are_one_line(option, value, range_, models, slides, tmp_path):
    proc, _ = run("export/segment_slide.py", "--slide", slides["tissue"], "--patch-model", models[0],
                  "--refine-model", models[1], "--out", tmp_path / "out", option, value)
    assert one_line_error(proc) == f"error: {option} {value}: must be from {range_}"
    assert not (tmp_path / "out").exists()


def test_refinement_inputs_refuse_a_size_out_of_range(slides):
    from h2g.inference.lowres import refinement_inputs
    from h2g.io.slide import Slide

    with Slide(slides["tissue"]) as slide:
        for size in (0, 100000):
            with pytest.raises(ConfigError, match=f"refinement size {size}: must be from 16 to 8192"):
                refinement_inputs(slide, None, size=size)


# ------------------------------------------------------------------ item 3: output vs metadata
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_model_whose_output_disagrees_with_its_metadata_is_refused_when_it_loads(engine, tmp_path):
    from h2g.inference.metadata import ModelMetadata
    from h2g.inference.backends import make_backend

    three = patch_classifier(tmp_path / "three.onnx", classes=3)  # metadata: H2G-Net's two classes
    with pytest.raises(ExportError) as err:
        make_backend(three, engine=engine)
    assert str(err.value).splitlines() == [str(err.value)]
    assert str(three) in str(err.value) and "shape (?, 3)" in str(err.value)
    assert "class_probs over 2 classes (Non-tumour, Tumor)" in str(err.value)
    pixel = ModelMetadata(system="dmmn", role="segmentation", classes=({"name": "a"}, {"name": "b"}),
                          output="pixel_probs")
    flat = patch_classifier(tmp_path / "flat.onnx", classes=2, metadata=pixel)  # (B, 2) where (B, H, W, 2) is said
    with pytest.raises(ExportError, match=r"shape \(\?, 2\).*pixel_probs.*\(batch, height, width, classes\)"):
        make_backend(flat, engine=engine)
    refine = refiner(tmp_path / "refine.onnx", 64)  # agrees: loads
    assert make_backend(refine, engine=engine).metadata.output == "pixel_probs"


def test_segment_slide_refuses_the_three_class_classifier(models, slides, tmp_path):
    three = patch_classifier(tmp_path / "three.onnx", 256, classes=3)
    proc, _ = run("export/segment_slide.py", "--slide", slides["tissue"], "--patch-model", three, "--refine-model",
                  models[1], "--out", tmp_path / "out", "--engine", "onnxruntime")
    assert "the model's output has shape (?, 3)" in one_line_error(proc)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ item 11: no tissue, tiny slides
def test_benchmark_of_a_slide_without_tissue_says_there_is_nothing_to_time(models, slides, tmp_path):
    proc, _ = run("export/benchmark.py", "--slide", slides["glass"], "--patch-model", models[0], "--refine-model",
                  models[1], "--repeats", "1", "--engine", "onnxruntime", "--markdown", tmp_path / "b.md")
    line = one_line_error(proc)
    assert "no tissue found" in line and "nothing to time" in line and str(slides["glass"]) in line
    assert not (tmp_path / "b.md").exists() and "|" not in proc.stdout


@pytest.mark.parametrize("slide", ["tiny", "tissue", "glass"])
@pytest.mark.slow
def test_inspect_slide_and_segment_slide_agree_on_tissue(slide, models, slides, tmp_path):
    """The 200 x 150 px slide is all tissue-coloured, but no 256 px patch at 10x (1024
    level-0 px) over it is more than 25 % tissue: both tools say there is no tissue."""
    proc, _ = run("tools/inspect_slide.py", slides[slide], "--model", *models, "--json")
    assert proc.returncode == 0, proc.stderr
    inspected = json.loads(proc.stdout)
    proc, _ = run("export/segment_slide.py", "--slide", slides[slide], "--patch-model", models[0], "--refine-model",
                  models[1], "--out", tmp_path / "out", "--engine", "onnxruntime", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert inspected["no_tissue"] == summary["no_tissue"] == (slide != "tissue")
    assert inspected["tissue_patches"] == summary["patches"]
    if slide == "tiny":
        assert inspected["tissue_fraction"] == 1.0  # the plane is all tissue; no patch is
    proc, _ = run("tools/inspect_slide.py", slides[slide], "--model", *models)
    assert ("segment_slide.py finds no tissue here" in proc.stdout) == (slide != "tissue")


def test_reading_onnx_metadata_needs_no_onnx_package_and_matches_it(models, tmp_path):
    import onnx

    from h2g.inference.metadata import onnx_metadata_props

    for path in models:
        assert onnx_metadata_props(path) == {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    model = onnx.load(str(models[0]))
    onnx.helper.set_model_props(model, {"h2g": "{}", "other": "ünïcode", "empty": ""})
    onnx.save(model, str(tmp_path / "props.onnx"))
    assert onnx_metadata_props(tmp_path / "props.onnx") == {"h2g": "{}", "other": "ünïcode", "empty": ""}
    data = (tmp_path / "props.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff\xff not protobuf")
    for bad in ("cut.onnx", "junk.onnx"):
        with pytest.raises(ExportError, match="not a readable ONNX file"):
            onnx_metadata_props(tmp_path / bad)


def test_deployment_never_imports_the_onnx_package(models, slides, tmp_path):
    code = ("import runpy, sys\n"
            f"sys.argv = ['segment_slide.py', '--slide', {str(slides['tissue'])!r}, '--patch-model', "
            f"{str(models[0])!r}, '--refine-model', {str(models[1])!r}, '--out', {str(tmp_path / 'o')!r}, '--quiet']\n"
            "try:\n    runpy.run_path(" + repr(str(REPO / "export" / "segment_slide.py")) + ", run_name='__main__')\n"
            "except SystemExit as exc:\n    print('exit', exc.code, 'onnx' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.split()[-3:] == ["exit", "0", "False"], proc.stdout + proc.stderr
