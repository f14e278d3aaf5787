"""tools/gpu_table3.sh, the GPU half of the runtime table, checked on a machine without a GPU:
its dry run prints every command and finds each script and flag it uses (so the script
cannot fail on a typo when a GPU machine is finally there), bad arguments and a missing
GPU give clear exits, and the export CLIs refuse a GPU provider without a GPU in one line.
(``--cpu-check``, the whole pipeline on the CPU provider, takes minutes: the README says
how to run it.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_table3.sh"


def run(*args, script=SCRIPT, env=None, cwd=ROOT):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, env=environ,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_dry_run_prints_every_command_and_finds_every_flag():
    done = run("--dry-run", "--python", sys.executable)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    text = "\n".join(commands)
    # the install, the slides, the models, the conversion, then every timing
    assert "pip install --quiet -e .[train]" in text and "onnxruntime-gpu>=1.31,<1.32" in text
    assert "make_cohort.py --preset full" in text and "model_summary.py mobilenetv2 unet dmmn_m3" in text
    assert "export/convert.py" in text
    timings = [c for c in commands if "export/benchmark.py" in c]
    assert len(timings) == 5  # H2G-Net and DMMN-M3 on CUDA and TensorRT, H2G-Net on OpenVINO GPU
    for provider in ("cuda", "tensorrt"):
        assert sum(f"--device GPU --provider {provider}" in c for c in timings) == 2
    assert any("--engine openvino --device GPU" in c for c in timings)
    assert all("--markdown bench/gpu/" in c for c in timings)
    assert "every command above exists" in done.stdout
    only = run("--dry-run", "--only", "dmmn", "--python", sys.executable)
    timed = [line for line in only.stdout.splitlines() if line.startswith("+ ") and "benchmark.py" in line]
    assert only.returncode == 0 and len(timed) == 2 and all("dmmn_m3.onnx" in line for line in timed)


def test_dry_run_catches_a_flag_a_script_does_not_have(tmp_path):
    broken = tmp_path / "gpu_table3.sh"
    broken.write_text(SCRIPT.read_text().replace("--batch-size 16", "--batch-sise 16"))
    done = run("--dry-run", "--python", sys.executable, script=broken, env={"H2G_ROOT": str(ROOT)})
    assert done.returncode == 2 and "export/benchmark.py has no option --batch-sise" in done.stderr


@pytest.mark.parametrize("args, message", [
    (("--repeats", "0"), "--repeats must be a positive integer"),
    (("--bogus",), "unknown argument '--bogus'"),
    (("--out",), "--out needs a value"),
    (("--python", "python3"), "--python applies to --dry-run and --cpu-check"),
    (("--only", "razn"), "--only must be h2g or dmmn"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    done = run(*args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_without_a_gpu_it_says_so_and_exits_3(tmp_path):
    if shutil.which("nvidia-smi") and b"GPU " in subprocess.run(["nvidia-smi", "-L"], capture_output=True).stdout:
        pytest.skip("this machine has an NVIDIA GPU: the script would run for real")
    done = run("--out", tmp_path / "out", "--work", tmp_path / "work")
    assert done.returncode == 3 and "no NVIDIA GPU visible" in done.stderr
    assert not (tmp_path / "work").exists()  # nothing installed or written


def test_benchmark_refuses_a_gpu_provider_without_a_gpu(tmp_path):
    """export/benchmark.py --device GPU --provider tensorrt on a CPU-only ONNX Runtime:
    exit 2 and one line naming the missing provider (argument handling of the provider
    option, which the GPU script relies on)."""
    from synthetic import make_slide

    slide = make_slide(tmp_path / "s.tiff", size=(512, 512))
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")  # never loaded: the provider is refused before the session
    done = subprocess.run([sys.executable, str(ROOT / "export" / "benchmark.py"), "--slide", str(slide),
                           "--patch-model", str(model), "--refine-model", str(model), "--engine", "onnxruntime",
                           "--device", "GPU", "--provider", "tensorrt"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "provider tensorrt requested but ONNX Runtime has no TensorrtExecutionProvider" in done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "export" / "benchmark.py"), "--slide", str(slide),
                           "--patch-model", str(model), "--refine-model", str(model), "--provider", "rocm"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'rocm'" in done.stderr
