"""Shared fixtures.  Real data is found through $H2G_REAL_DATA (default
../shared/data/real beside the repository); tests that need it skip when absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("H2G_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent (set H2G_REAL_DATA)")
    return REAL_DATA
