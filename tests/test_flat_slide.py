"""A slide without a pyramid (issue 29): a synthetic 100k x 100k single-level tiled TIFF
(tools/bench_flat_slide.py writes it from pre-encoded tiles: 29 MB) gives its tissue
mask, H2G-Net's low-resolution view and the thumbnail in bounded memory.  Read whole, its
one level is 30 GB of RGB; the old reads held a 1024-row band of the full width (2 x
400 MB of RGBA) for the mask and the whole level for the low-resolution view."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_a_100k_single_level_slide_is_read_by_region_in_bounded_memory(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_flat_slide.py"), "--side", "100000",
                           "--work", str(tmp_path), "--json"], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["levels"] == 1 and report["side"] == 100000
    # the tissue block written (a quarter of the side, on the tile grid) is found where it is
    share = report["tissue_share"]
    assert share["written"] == pytest.approx((24576 / 100000) ** 2, abs=1e-4)
    assert abs(share["tissue"] - share["written"]) < 0.005 and abs(share["lowres"] - share["written"]) < 0.005
    assert report["thumbnail"][0] <= 4096
    assert report["peak_memory_mb"] < 1024, report  # bounded: the overview (<= 192 MB) plus a few blocks
