"""RAZN's oracle policy (h2g.evaluation.zoom_oracle) on hand-made label maps: footprints,
per-region choice, the merge RAZN's inference makes, majority classes; and the config
round trip the oracle tool reads a run folder with."""
from __future__ import annotations

import json

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
    from h2g.systems.razn.oracle import config_from_dict
    from h2g.systems.registry import load_config

    c = load_config("smoke", seed=3).override(["razn.steps=7", "patches.tumour_threshold=0.3"])
    back = config_from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.razn.steps == 7 and back.patches.tumour_threshold == 0.3


def test_summary_counts_zooms_per_class_and_lesion_by_hand():
    from h2g.evaluation.metrics import class_metrics
    from h2g.systems.razn.oracle import MIMIC_KINDS, markdown, summary

    blocks = _blocks()
    table = zo.region_table(COARSE, FINE, TRUTH, blocks, n_classes=3)
    nan = float("nan")
    regions = {**table, "razn_zoom": np.array([True, True, False, False]),
               "oracle_own": table["oracle"], **{f"share_{k}": np.zeros(4) for k in MIMIC_KINDS}}
    regions["share_adenosis"] = np.array([0.5, 0.05, 0.0, 0.0])
    regions["share_dcis"] = np.array([0.0, 0.2, 0.0, 0.0])
    regions["share_lymphoid"] = np.array([0.0, 0.0, nan, nan])  # slides with unknown kinds: NaN everywhere
    for k in MIMIC_KINDS:
        regions[f"share_{k}"][2:] = nan
    names = ("a", "b", "c")
    result = {"classes": names, "regions": regions, "manifest": "m.csv", "split": "test", "slides": 1,
              "designs": ("razn_scale1", "razn_scale2", "razn"),
              "variants": {"Scale 1": class_metrics(COARSE, TRUTH, names)}}
    s = summary(result)
    assert s["regions"] == 4 and s["oracle_zoom_share"] == pytest.approx(3 / 4)
    assert s["razn_zoom_share"] == pytest.approx(1 / 2)
    assert s["razn_zoom_precision"] == pytest.approx(1 / 2)  # it zooms regions 0 and 1; the oracle only 1
    assert s["razn_zoom_recall"] == pytest.approx(1 / 3)  # of the oracle's 1, 2, 3 it zooms 1
    a, c = s["by_class"]["a"], s["by_class"]["c"]
    assert a == {"regions": 1, "oracle_zoom": 0.0, "scale2_gain": pytest.approx(-0.5), "razn_zoom": 1.0}
    assert c["regions"] == 2 and c["scale2_gain"] == pytest.approx((3 / 4 + 1 / 1) / 2)
    lesions = s["by_lesion"]
    assert lesions["adenosis"]["regions"] == 1 and lesions["dcis"]["regions"] == 1  # >= 10 % of the region
    assert lesions["no mimic"]["regions"] == 0 and lesions["lymphoid"]["regions"] == 0  # regions 2, 3: unknown
    # Scale 1's mIoU by hand: class a IoU 4/13 (4 right of 13 predicted a), b and c 0
    assert s["variants"]["Scale 1"]["mean_iou"] == pytest.approx((4 / 13) / 3)
    assert "| a | 1 | -0.500 | 0 % | 100 % |" in markdown(s)
