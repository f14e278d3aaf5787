"""RAZN's oracle policy (h2g.evaluation.zoom_oracle) on hand-made label maps: footprints,
per-region choice, the merge RAZN's inference makes, majority classes; and the config
round trip the oracle tool reads a run folder with."""
from __future__ import annotations

import numpy as np
import pytest

from h2g.core.errors import ConfigError
from h2g.evaluation import zoom_oracle as zo

I = 255  # unannotated
TRUTH = np.array([[0, 0, 1, 1],
                  [0, 0, 1, 1],
                  [2, 2, I, I],
                  [2, 2, 2, I]])
COARSE = np.zeros((4, 4), np.int64)  # block correct: 4, 0, 0, 0
FINE = np.array([[0, 1, 1, 1],   # block correct: 2, 4, 3, 1
                 [0, 1, 1, 1],
                 [2, 2, 0, 0],
                 [2, 0, 2, 0]])
# four regions of 4 grid px whose grid is half as fine as the label map: 2x2 footprints
TOP_LEFT = np.array([[0, 0], [0, 4], [4, 0], [4, 4]])


def _blocks():
    return zo.region_blocks(TOP_LEFT, 4, 0.5, TRUTH.shape)


def test_blocks_are_the_regions_footprints():
    assert _blocks() == [(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4)),
                         (slice(2, 4), slice(0, 2)), (slice(2, 4), slice(2, 4))]
    # a non-integer scale rounds the edges so that neighbours still tile; the border clips
    blocks = zo.region_blocks(np.array([[0, 0], [0, 3]]), 3, 0.75, (2, 4))
    assert blocks == [(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4))]
    with pytest.raises(ConfigError):
        zo.region_blocks(TOP_LEFT, 4, 0.0, TRUTH.shape)


def test_oracle_zooms_where_the_fine_map_is_right_more_often_and_merges_like_razn():
    blocks = _blocks()
    correct, annotated = zo.block_counts(FINE, TRUTH, blocks)
    assert correct.tolist() == [2, 4, 3, 1] and annotated.tolist() == [4, 4, 4, 1]
    zoom = zo.oracle_zoom(COARSE, FINE, TRUTH, blocks)
    assert zoom.tolist() == [False, True, True, True]
    merged = zo.merge(COARSE, FINE, blocks, zoom)
    expected = np.array([[0, 0, 1, 1],
                         [0, 0, 1, 1],
                         [2, 2, 0, 0],
                         [2, 0, 2, 0]])
    np.testing.assert_array_equal(merged, expected)
    assert int(((merged == TRUTH) & (TRUTH != I)).sum()) == 4 + 4 + 3 + 1
    # a tie keeps the coarse prediction (the cheaper action)
    assert not zo.oracle_zoom(COARSE, COARSE, TRUTH, blocks).any()
    with pytest.raises(ConfigError):
        zo.merge(COARSE, FINE, blocks, zoom[:2])


def test_region_table_majority_classes():
    table = zo.region_table(COARSE, FINE, TRUTH, _blocks(), n_classes=3)
    assert table["majority"].tolist() == [0, 1, 2, 2]
    assert table["correct_coarse"].tolist() == [4, 0, 0, 0]
    truth = TRUTH.copy()
    truth[2:, 2:] = I
    assert zo.majority_class(truth, _blocks(), 3)[3] == -1


def test_run_config_round_trips_through_its_json():
    from h2g.core.config import Config, load_config
    from h2g.systems.razn.oracle import _from_dict

    c = load_config("smoke", seed=3)
    back = _from_dict(Config, c.to_dict())
    assert back == c
