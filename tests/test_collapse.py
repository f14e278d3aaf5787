"""Collapse detection (h2g.evaluation.collapse): a design whose predictions fall almost
entirely into one class is flagged in metrics.json, the run log and every table.

Expected values are counted by hand on small arrays; the one-class "model" is a raster
(or a predictor) that outputs tumour everywhere."""
from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from h2g.evaluation import collapse, metrics, tables
from h2g.inference.raster import Raster
from h2g.io.classes import ClassTable

NAMES = ("non-tumour", "tumour")


def test_rule_on_hand_counted_shares():
    # all tumour where the truth is 26 % tumour (the DSMN-S2 report: recall 1, precision 0.26)
    v = collapse.check([0, 1000], [740, 260], NAMES)
    assert v["collapsed"] and v["dominant"] == "tumour" and v["share"] == 1.0 and v["truth_share"] == 0.26
    # 96 % of one class where the truth is 80 % of it: collapsed
    assert collapse.check([40, 960], [200, 800], NAMES)["collapsed"]
    # 94 %: below the 95 % rule
    assert not collapse.check([60, 940], [740, 260], NAMES)["collapsed"]
    # a test set that is itself 97 % stroma does not flag a model calling 97 % stroma
    v = collapse.check([30, 970], [30, 970], ("tumour", "stroma"))
    assert not v["collapsed"] and v["dominant"] == "stroma" and v["share"] == pytest.approx(0.97)
    # nothing predicted: no verdict to give
    assert not collapse.check([0, 0], [1, 1], NAMES)["collapsed"]


def test_a_raster_of_one_class_is_flagged_and_marked_in_the_class_tables(tmp_path):
    """A 3-class raster that says tumour everywhere, scored on a label map with every
    class: pooled confusion -> collapsed, and the per-class tables print the flag."""
    classes = ClassTable.of([("tumour", 1), ("stroma", 2), ("fat", 3)], ignore=(0,))
    probs = np.zeros((4, 6, 3), np.float32)
    probs[..., 0] = 1.0  # tumour everywhere
    raster = Raster(probs, downsample=4.0, extent=(24, 16), covered=np.ones((4, 6), bool))
    truth = np.array([[0, 0, 1, 1, 2, 2]] * 4, np.uint8)  # 8 tumour, 8 stroma, 8 fat pixels
    pred = raster.label_map()
    scores = metrics.class_metrics(pred, truth, classes, ignore=255)
    verdict = collapse.from_confusion(scores.confusion, classes.names)
    assert verdict["collapsed"] and verdict["dominant"] == "tumour"
    assert verdict["share"] == 1.0 and verdict["truth_share"] == pytest.approx(8 / 24)

    good = metrics.class_metrics(truth, truth, classes, ignore=255)
    paths = tables.write_class_tables(tmp_path, {"One-class": scores, "Perfect": good})
    text = paths["markdown"].read_text()
    assert "One-class **[collapsed: 100.0% tumour]**" in text
    assert "| Perfect |" in text and "Perfect **[" not in text
    with open(paths["csv"], newline="") as fh:
        flags = {(r["design"], r["collapsed"]) for r in csv.DictReader(fh)}
    assert flags == {("One-class", "collapsed: 100.0% tumour"), ("Perfect", "")}


def test_marked_rows_flag_the_design_in_table1_and_the_log(tmp_path, caplog):
    rows = [{"design": d, "slide_id": f"s{i}", "grade": 1, "recall": r, "precision": p, "dice": 2 * r * p / (r + p)}
            for d, r, p in (("All-tumour", 1.0, 0.26), ("Trained", 0.8, 0.7)) for i in range(2)]
    masks = [(np.ones((10, 10), bool), np.arange(100).reshape(10, 10) < 26)] * 2  # 26 % tumour truth
    result = {"label": "All-tumour"}
    with caplog.at_level(logging.WARNING, logger="h2g"):
        collapse.mark(result, collapse.from_masks(masks), [r for r in rows if r["design"] == "All-tumour"])
    assert result["collapsed"] is True
    assert result["collapse"]["dominant"] == "tumour" and result["collapse"]["share"] == 1.0
    assert result["collapse"]["truth_share"] == pytest.approx(0.26)
    assert any("All-tumour has COLLAPSED" in r.getMessage() for r in caplog.records)
    other = {"label": "Trained"}
    collapse.mark(other, collapse.from_masks([(np.arange(100).reshape(10, 10) < 30, masks[0][1])]),
                  [r for r in rows if r["design"] == "Trained"])
    assert other["collapsed"] is False

    paths = tables.write_tables(tmp_path, rows, ["All-tumour", "Trained"], resolution=16)
    text = paths["tables"].read_text()
    table1 = text.split("## Table 2")[0]
    assert "| All-tumour **[collapsed: 100.0% tumour]** |" in table1 and "| Trained |" in table1
    assert "**collapsed**: the design's predictions fall almost entirely into one class" in text
    with open(paths["table1"], newline="") as fh:
        assert [r["collapsed"] for r in csv.DictReader(fh)] == ["collapsed: 100.0% tumour", ""]


@pytest.mark.slow
def test_a_pipeline_whose_model_calls_everything_tumour_says_so(tiny_cohort, tmp_path, caplog, monkeypatch):
    """H2G-Net's Otsu design with its tissue mask replaced by one that calls every pixel
    tissue (so tumour everywhere): metrics.json says collapsed, the run log warns, tables.md flags it."""
    from conftest import tiny_config

    from h2g.systems.h2g import pipeline
    from h2g.systems.registry import resolve, run

    monkeypatch.setattr(pipeline, "otsu_tissue", lambda image: np.ones(image.shape[:2], bool))
    with caplog.at_level(logging.WARNING, logger="h2g"):
        result = run(resolve(["otsu"]), tiny_cohort, tmp_path, tiny_config())["otsu"]
    saved = json.loads((tmp_path / "otsu" / "metrics.json").read_text())
    assert saved["collapsed"] is True and result["collapsed"] is True
    assert saved["collapse"]["dominant"] == "tumour" and saved["collapse"]["share"] == 1.0
    assert saved["collapse"]["truth_share"] < 0.9 and saved["recall_mean"] == 1.0
    assert any("Otsu has COLLAPSED" in r.getMessage() for r in caplog.records)
    assert "Otsu **[collapsed: 100.0% tumour]**" in (tmp_path / "otsu" / "tables.md").read_text()
