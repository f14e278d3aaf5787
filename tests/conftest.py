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


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """The `tiny` synthetic cohort (6 slides: 3 train, 1 val, 2 test); its manifest path."""
    from h2g.data.cohort import make_cohort

    return make_cohort(tmp_path_factory.mktemp("tiny_cohort"), "tiny", seed=0, progress=False)


def tiny_config(seed: int = 0):
    """The smoke preset shrunk further so a whole design runs in seconds in tests.

    Heatmaps on the paper's grid of non-overlapping patches (``heatmap.stride=None``): the
    smoke preset's half stride reads four times the patches, and every H2G-Net pipeline
    test would pay for it; ``test_pipeline``'s half-stride test sets the smoke stride
    (``heatmap.stride=128``) where it is tested."""
    import dataclasses

    from h2g.core.config import load_config

    c = load_config("smoke", seed=seed)
    return c.replace(
        classifier=dataclasses.replace(c.classifier, batch_size=16, train_batches=6, val_batches=2, epochs=2),
        cluster=dataclasses.replace(c.cluster, n_batches=2, batch_size=16, n_clusters=3),
        heatmap=dataclasses.replace(c.heatmap, stride=None),
        refine=dataclasses.replace(c.refine, size=256, width=0.25, batch_size=2, epochs=2, patience=2),
        eval=dataclasses.replace(c.eval, figure_slides=2),
    )
