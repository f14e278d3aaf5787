"""Metrics, summaries, Tukey HSD, tables and figures (h2g.evaluation)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import (
    f1_score,
    jaccard_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from h2g.core.errors import ConfigError
from h2g.evaluation import figures, metrics, tables


# ---------------------------------------------------------------- per-slide metrics
def test_metrics_hand_computed():
    truth = np.zeros((4, 4), bool)
    truth[0, :4] = True  # 4 tumour pixels
    pred = np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 found
    pred[3, :2] = True  # 2 false positives
    m = metrics.segmentation_metrics(pred, truth)  # TP 3, FP 2, FN 1
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["dice"] == pytest.approx(6 / 9)


def test_metrics_match_sklearn_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth, pred = rng.random((32, 32)) < 0.3, rng.random((32, 32)) < 0.4
        m = metrics.segmentation_metrics(pred.astype(np.uint8), truth)
        assert m["recall"] == pytest.approx(recall_score(truth.ravel(), pred.ravel()))
        assert m["precision"] == pytest.approx(precision_score(truth.ravel(), pred.ravel()))
        assert m["dice"] == pytest.approx(f1_score(truth.ravel(), pred.ravel()))


@pytest.mark.parametrize(
    "pred_any, truth_any, expected",
    [
        (False, False, (1.0, 1.0, 1.0)),  # correct "no tumour"
        (True, False, (1.0, 0.0, 0.0)),  # nothing to find; all false positives
        (False, True, (0.0, 0.0, 0.0)),  # missed everything
    ],
)
def test_metrics_empty_cases(pred_any, truth_any, expected):
    pred, truth = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    pred[1, 1] = pred_any
    truth[3, 3] = truth_any
    m = metrics.segmentation_metrics(pred, truth)
    assert (m["recall"], m["precision"], m["dice"]) == expected


def test_metrics_reject_probabilities_and_shape_mismatch():
    with pytest.raises(ValueError, match="binarise"):
        metrics.segmentation_metrics(np.full((2, 2), 0.7), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="shape"):
        metrics.segmentation_metrics(np.ones((2, 2), bool), np.ones((2, 3), bool))


def test_binarise_is_strict_and_rejects_nan():
    np.testing.assert_array_equal(metrics.binarise(np.array([0.2, 0.5, 0.5001, 1.0])), [False, False, True, True])
    np.testing.assert_array_equal(metrics.binarise(np.array([0.2, 0.7]), threshold=0.1), [True, True])
    with pytest.raises(ValueError, match="NaN"):
        metrics.binarise(np.array([0.2, np.nan]))


# ---------------------------------------------------------------- per-class metrics
def test_dice_by_threshold_hand_computed():
    """Four pixels, truth 1 1 0 0, probabilities 0.9 0.3 0.6 0.1: at 0.2 the prediction
    is 1 1 1 0 (TP 2, FP 1: Dice 4/5), at 0.5 it is 1 0 1 0 (TP 1, FP 1, FN 1: 1/2), at
    0.95 it is empty (0); with an empty truth and prediction, 1."""
    prob = np.array([[0.9, 0.3], [0.6, 0.1]])
    truth = np.array([[1, 1], [0, 0]], bool)
    np.testing.assert_allclose(metrics.dice_by_threshold(prob, truth, [0.2, 0.5, 0.95]), [0.8, 0.5, 0.0])
    assert metrics.dice_by_threshold(np.zeros((2, 2)), np.zeros((2, 2), bool), [0.5])[0] == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.dice_by_threshold(prob, truth[:1], [0.5])


def test_dice_by_threshold_matches_sklearn():
    rng = np.random.default_rng(3)
    prob = rng.random((40, 30))
    truth = rng.random((40, 30)) < 0.3 + 0.4 * prob
    thresholds = [0.1, 0.35, 0.5, 0.8]
    expected = [f1_score(truth.ravel(), (prob > t).ravel()) for t in thresholds]
    np.testing.assert_allclose(metrics.dice_by_threshold(prob, truth, thresholds), expected)


def test_threshold_sweep_summary_and_table(tmp_path):
    """Means over slides per threshold, the best (lowest threshold on a tie), AUCs with a
    one-class slide (NaN) left out; the table names every design with its numbers."""
    sweep = tables.threshold_sweep([[0.2, 0.6, 0.0], [0.4, 0.6, 0.0]], [0.9, float("nan"), 0.7],
                                   thresholds=(0.3, 0.5, 0.7))
    np.testing.assert_allclose(sweep["dice_mean"], [0.3, 0.6, 0.0])
    assert sweep["best_threshold"] == 0.5 and sweep["best_dice"] == pytest.approx(0.6)
    assert sweep["pixel_auc_mean"] == pytest.approx(0.8) and sweep["pixel_auc_sd"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    tie = tables.threshold_sweep([[0.5, 0.5, 0.1]], [0.6], thresholds=(0.3, 0.5, 0.7))
    assert tie["best_threshold"] == 0.3
    paths = tables.write_threshold_table(tmp_path, {"A": sweep, "B": tie})
    text = paths["thresholds_md"].read_text()
    assert "| A | 0.300 | 0.600 | 0.000 | 0.600 at 0.5 | 0.800 |" in text
    with open(paths["thresholds_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["design"] for r in rows] == ["A", "B"] and float(rows[1]["dice_0.3"]) == 0.5
    other = dict(tie, thresholds=[0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="different thresholds"):
        tables.write_threshold_table(tmp_path, {"A": sweep, "C": other})


def test_class_metrics_hand_computed_with_ignore_and_an_absent_class():
    # classes 0, 1, 2, 3; 255 ignored; class 3 in neither map
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])  # the last two pixels are ignored
    s = metrics.class_metrics(pred, truth, ["a", "b", "c", "d"])
    np.testing.assert_array_equal(s.confusion, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    # a: TP 1 FP 1 FN 1; b: TP 2 FP 1 FN 0; c: TP 1 FP 0 FN 1; d: absent
    np.testing.assert_allclose(s.iou, [1 / 3, 2 / 3, 1 / 2, 1.0])
    np.testing.assert_allclose(s.dice, [2 / 4, 4 / 5, 2 / 3, 1.0])
    np.testing.assert_allclose(s.recall, [1 / 2, 1.0, 1 / 2, 1.0])
    np.testing.assert_allclose(s.precision, [1 / 2, 2 / 3, 1.0, 1.0])
    assert s.present.tolist() == [True, True, True, False]
    assert s.mean_iou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # d left out
    d = s.to_dict()
    assert d["classes"]["d"]["present"] is False and d["mean_iou"] == pytest.approx(s.mean_iou)
    # a class predicted but absent from the truth: recall 1, precision 0, IoU 0 (counted)
    s = metrics.class_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b"])
    assert (s.recall[1], s.precision[1], s.iou[1], s.dice[1]) == (1.0, 0.0, 0.0, 0.0)
    assert s.mean_iou == pytest.approx(0.25)


def test_class_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    for _ in range(4):
        truth = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(40, 30), p=[0.3, 0.3, 0.2, 0.2])
        pred = rng.integers(0, 3, size=(40, 30)).astype(np.uint8)
        s = metrics.class_metrics(pred, truth, ["x", "y", "z"])
        keep = truth != 255
        t, p = truth[keep], pred[keep]
        np.testing.assert_allclose(s.iou, jaccard_score(t, p, labels=[0, 1, 2], average=None))
        precision, recall, f1, _ = precision_recall_fscore_support(t, p, labels=[0, 1, 2], average=None)
        np.testing.assert_allclose(s.precision, precision)
        np.testing.assert_allclose(s.recall, recall)
        np.testing.assert_allclose(s.dice, f1)


def test_tumour_metrics_are_the_binary_figures_exactly():
    rng = np.random.default_rng(5)
    for _ in range(5):
        truth, pred = rng.random((32, 32)) < 0.3, rng.random((32, 32)) < 0.4
        assert metrics.tumour_metrics(pred.astype(np.uint8), truth.astype(np.uint8), 1, 2) == \
            metrics.segmentation_metrics(pred, truth)
        scores = metrics.class_metrics(pred.astype(np.uint8), truth.astype(np.uint8), ["n", "t"])
        assert metrics.tumour_scores(scores.confusion, 1) == metrics.segmentation_metrics(pred, truth)
    for pred_any, truth_any in [(False, False), (True, False), (False, True)]:
        pred, truth = np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8)
        pred[0, 0], truth[2, 2] = pred_any, truth_any
        assert metrics.tumour_metrics(pred, truth, 1, 2) == metrics.segmentation_metrics(pred, truth)


def test_confusion_matrix_rejects_bad_labels_and_pools():
    with pytest.raises(ValueError, match=r"\[5\]"):
        metrics.confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="ignore is only allowed in the truth"):
        metrics.confusion_matrix(np.array([255, 0]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="integer class indices"):
        metrics.confusion_matrix(np.array([0.5]), np.array([0]), 2)
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_matrix(np.zeros(2, int), np.zeros(3, int), 2)
    a = metrics.class_metrics(np.array([0, 1]), np.array([0, 1]), ["n", "t"])
    b = metrics.class_metrics(np.array([0, 0]), np.array([1, 1]), ["n", "t"])
    pooled = a + b
    np.testing.assert_array_equal(pooled.confusion, [[1, 0], [2, 1]])
    assert pooled.iou[1] == pytest.approx(1 / 3)


def test_class_tables(tmp_path):
    scores = {
        "m1": metrics.class_metrics(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ["a", "b", "c"]),
        "m2": metrics.class_metrics(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 255]), ["a", "b", "c"]),
    }
    paths = tables.write_class_tables(tmp_path, scores)
    md = paths["markdown"].read_text()
    assert "| Design | a | b | c | mIoU |" in md
    # m1: a 1/1, b TP1 FP1 -> 0.5, c TP1 FN1 -> 0.5; mIoU 2/3.  m2: only a present
    assert "| m1 | 1.000 | 0.500 | 0.500 | 0.667 |" in md
    assert "| m2 | 1.000 | n/a | n/a | 1.000 |" in md
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["a", "b", "c", "mean_iou"] * 2
    assert float(rows[1]["iou"]) == pytest.approx(0.5) and rows[4]["present"] == "True"
    assert rows[5]["present"] == "False" and float(rows[3]["iou"]) == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="no per-class scores for design"):
        tables.write_class_tables(tmp_path, scores, ["m3"])
    other = {"x": metrics.class_metrics(np.array([0]), np.array([0]), ["p", "q"]), **scores}
    with pytest.raises(ConfigError, match="classes other than"):
        tables.write_class_tables(tmp_path, other)


# ---------------------------------------------------------------- summaries
def row(design, slide, grade, dice, recall=None, precision=None):
    return {"design": design, "slide_id": slide, "grade": grade, "dice": dice,
            "recall": dice if recall is None else recall, "precision": dice if precision is None else precision}


ROWS = [
    row("A", "s1", 1, 0.8, recall=0.9, precision=0.7),
    row("A", "s2", 2, 0.6, recall=0.5, precision=0.9),
    row("A", "s3", 2, 0.9, recall=1.0, precision=0.8),
    row("B", "s1", 1, 0.5),
]


def test_summarise_macro_mean_and_sample_sd_by_hand():
    s = tables.summarise(ROWS)
    assert list(s) == ["A", "B"]
    a = s["A"]
    assert a.n == 3
    assert a.dice.mean == pytest.approx(2.3 / 3)
    # deviations 0.0333, -0.1667, 0.1333 -> squares sum 0.046667 -> / (3 - 1) -> sqrt
    assert a.dice.sd == pytest.approx(np.sqrt(0.046666667 / 2), rel=1e-6)
    assert a.recall.mean == pytest.approx(0.8) and a.recall.sd == pytest.approx(np.sqrt(0.14 / 2))  # 0.1^2 + 0.3^2 + 0.2^2
    assert a.precision.mean == pytest.approx(0.8) and a.precision.sd == pytest.approx(0.1)
    assert a.dice_by_grade["1"] == tables.MeanSD(0.8, 0.0, 1)
    assert a.dice_by_grade["2"].mean == pytest.approx(0.75)
    assert a.dice_by_grade["2"].sd == pytest.approx(np.sqrt(2 * 0.15**2))
    assert s["B"].dice == tables.MeanSD(0.5, 0.0, 1) and list(s["B"].dice_by_grade) == ["1"]
    assert str(a.dice) == "0.767 ± 0.153"


def test_metrics_summary_keys_and_values():
    m = tables.metrics_summary(ROWS, "A")
    assert m["design"] == "A" and m["n_test_slides"] == 3
    assert m["recall_mean"] == pytest.approx(0.8) and m["precision_sd"] == pytest.approx(0.1)
    assert m["dice_mean"] == pytest.approx(2.3 / 3) and m["dice_sd"] == pytest.approx(0.152753, rel=1e-5)
    assert m["dice_by_grade"] == {"1": pytest.approx(0.8), "2": pytest.approx(0.75)}
    assert m["n_by_grade"] == {"1": 1, "2": 2}
    with pytest.raises(ConfigError, match="no per-slide results for design 'C'"):
        tables.metrics_summary(ROWS, "C")


def test_rows_with_missing_keys_or_nan_are_rejected():
    with pytest.raises(ValueError, match="lacks grade"):
        tables.summarise([{"design": "A", "slide_id": "s", "recall": 1, "precision": 1, "dice": 1}])
    with pytest.raises(ValueError, match="non-finite dice"):
        tables.summarise([row("A", "s", 1, float("nan"), recall=1.0, precision=1.0)])


# ---------------------------------------------------------------- Tukey HSD
def scored_rows(n=8, seed=0):
    rng = np.random.default_rng(seed)
    means = {"X": 0.70, "Y": 0.85, "Z": 0.87}
    return [row(d, f"s{i}", 1 + i % 3, float(np.clip(rng.normal(m, 0.05), 0, 1)))
            for d, m in means.items() for i in range(n)]


def test_tukey_matches_scipy_directly():
    rows = scored_rows()
    result = tables.tukey(rows, ["X", "Y", "Z"])
    groups = [[r["dice"] for r in rows if r["design"] == d] for d in "XYZ"]
    expected = stats.tukey_hsd(*groups).pvalue
    np.testing.assert_allclose(np.array(result.pvalues, dtype=float), expected)
    assert result.p("X", "Y") == result.p("Y", "X") < 0.01 and result.note == ""


def test_tukey_with_two_designs_equals_the_pooled_t_test():
    """For two groups the studentized range test reduces to Student's t-test."""
    rows = [r for r in scored_rows(6, seed=1) if r["design"] in "XY"]
    result = tables.tukey(rows, ["X", "Y"])
    groups = [[r["dice"] for r in rows if r["design"] == d] for d in "XY"]
    assert result.p("X", "Y") == pytest.approx(stats.ttest_ind(*groups).pvalue, rel=1e-4)


def test_tukey_untestable_designs_are_none_not_nan():
    rows = scored_rows(4) + [row("W", "s0", 1, 0.9)]
    result = tables.tukey(rows, ["X", "W", "Y"])
    assert result.p("X", "W") is None and result.p("W", "W") is None
    assert result.p("X", "Y") is not None
    assert "W: 1 slide(s)" in result.note
    single = tables.tukey(rows, ["X"])
    assert single.pvalues == ((None,),) and "fewer than two designs" in single.note


def test_tukey_zero_variance_gives_one_for_equal_and_zero_for_different_means():
    rows = [row(d, f"s{i}", 1, v) for d, v in (("P", 1.0), ("Q", 1.0), ("R", 0.5)) for i in range(3)]
    result = tables.tukey(rows, ["P", "Q", "R"])
    assert result.p("P", "Q") == 1.0 and result.p("P", "R") == 0.0
    assert not np.isnan(np.array(result.pvalues, dtype=float)).any()


# ---------------------------------------------------------------- tables
def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_write_tables_layout(tmp_path):
    rows = ROWS + [row("A", "s4", 3, 0.7), row("B", "s2", 2, 0.4), row("C", "s9", 1, 0.1)]
    paths = tables.write_tables(tmp_path, rows, ["A", "B"], resolution=1024)
    assert set(paths) == {"tables", "table1", "table2", "tukey", "per_slide"}
    md = paths["tables"].read_text(encoding="utf-8")
    assert "1024x1024" in md
    assert "| Design | Recall | Precision | DSC |" in md
    a_dice = tables.MeanSD.of([0.8, 0.6, 0.9, 0.7])
    assert f"| A | {tables.MeanSD.of([0.9, 0.5, 1.0, 0.7])} | {tables.MeanSD.of([0.7, 0.9, 0.8, 0.7])} | {a_dice} |" in md
    assert "| Design | Grade 1 (n = 1) | Grade 2 (n = 1/2) | Grade 3 (n = 1) |" in md
    assert "| B | 0.500 ± 0.000 | 0.400 ± 0.000 | n/a |" in md  # B has no grade-3 slide

    table1 = read_csv(paths["table1"])
    assert [r["design"] for r in table1] == ["A", "B"]  # C is not asked for
    assert float(table1[0]["dice_mean"]) == pytest.approx(a_dice.mean)
    assert float(table1[0]["dice_sd"]) == pytest.approx(a_dice.sd)
    assert int(table1[1]["n_slides"]) == 2
    table2 = read_csv(paths["table2"])
    assert float(table2[0]["grade_2_mean"]) == pytest.approx(0.75) and table2[1]["grade_3_mean"] == ""

    tukey = read_csv(paths["tukey"])
    expected = stats.tukey_hsd([0.8, 0.6, 0.9, 0.7], [0.5, 0.4]).pvalue[0, 1]
    assert float(tukey[0]["B"]) == pytest.approx(expected)
    per_slide = read_csv(paths["per_slide"])
    assert len(per_slide) == 6 and {r["design"] for r in per_slide} == {"A", "B"}
    assert float(per_slide[0]["dice"]) == pytest.approx(0.8)


def test_write_tables_single_design_and_tukey_subset(tmp_path):
    paths = tables.write_tables(tmp_path, ROWS, ["A"], resolution=512)
    md = paths["tables"].read_text(encoding="utf-8")
    assert "512x512" in md and "n/a: fewer than two designs" in md
    assert read_csv(paths["tukey"]) == [{"design": "A", "A": ""}]
    rows = scored_rows(4)
    paths = tables.write_tables(tmp_path / "sub", rows, ["X", "Y", "Z"], tukey_designs=["Y", "Z"])
    assert [r["design"] for r in read_csv(paths["tukey"])] == ["Y", "Z"]
    with pytest.raises(ConfigError, match="Q"):
        tables.write_tables(tmp_path, ROWS, ["A", "Q"])


# ---------------------------------------------------------------- figures
def test_figure_grid_writes_one_row_per_slide(tmp_path):
    size = 32
    red = np.zeros((size, size, 3), np.uint8)
    red[..., 0] = 255
    truth = np.zeros((size, size), bool)
    truth[8:24, 8:24] = True
    heat = np.linspace(0, 1, size * size, dtype=np.float32).reshape(size, size)
    rows = [("slide-a", red, truth, heat, truth), ("slide-b", red / 255.0, truth, None, ~truth)]
    path = figures.figure_grid(tmp_path / "grid.png", rows)
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert (width, height) == (1200, 600)  # 4 columns x 2 rows of 3 inches at 100 dpi
    left = pixels[:, : width // 4]
    assert ((left[..., 0] > 240) & (left[..., 1] < 15) & (left[..., 2] < 15)).sum() > 1000  # the red image
    with pytest.raises(ValueError):
        figures.figure_grid(tmp_path / "none.png", [])


def test_dice_boxplot(tmp_path):
    path = figures.dice_boxplot(tmp_path / "box.png", scored_rows(5))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 400
    with pytest.raises(ConfigError, match="Q"):
        figures.dice_boxplot(tmp_path / "bad.png", scored_rows(5), designs=["X", "Q"])


def test_patch_tumour_fractions_hand_computed():
    """One tumour pixel at level-0 (x=3, y=2) of an 8x8 slide: with 2 px cells and 4 px
    patches (centred, reaching 1 px past each cell side) exactly the patches of cells
    (rows 0-1) x (cols 1-2) contain it, each 1/16 of their area; with 4 px cells and
    patches, only cell (0, 0)."""
    from types import SimpleNamespace

    from h2g.evaluation.heatmap_ceiling import patch_tumour_fractions

    mask = np.zeros((8, 8), bool)
    mask[2, 3] = True
    annotation = SimpleNamespace(mask=mask, downsample=1.0)
    expected = np.zeros((4, 4))
    expected[0:2, 1:3] = 1 / 16
    np.testing.assert_allclose(patch_tumour_fractions(annotation, (8, 8), 2, 4), expected)
    expected = np.zeros((2, 2))
    expected[0, 0] = 1 / 16
    np.testing.assert_allclose(patch_tumour_fractions(annotation, (8, 8), 4, 4), expected)


def test_heatmap_ceiling_is_near_one_on_the_grid_and_rises_with_a_finer_stride(tmp_path):
    """A tumour rectangle on patch boundaries: a perfect classifier's heatmap is (almost)
    the truth.  A tumour square of 1.5 patches, off the grid: the patch grid caps the
    heatmap's Dice, and half stride raises the cap."""
    from synthetic import make_mask, make_slide

    from h2g.evaluation.heatmap_ceiling import slide_ceiling
    from h2g.io.slide import Slide

    size, patch = (1024, 768), 32  # 32 px at 10x = 128 level-0 px
    slide_path = make_slide(tmp_path / "s.tiff", size=size, compression=None, downsamples=(1, 4))
    aligned = make_mask(tmp_path / "aligned.tiff", size, [(256, 256, 384, 256)])
    small = make_mask(tmp_path / "small.tiff", size, [(400, 300, 200, 200)])
    kw = dict(size=256, patch_size=patch, tumour_threshold=0.25)
    with Slide(slide_path) as slide:
        on_grid = slide_ceiling(slide, aligned, **kw)
        coarse = slide_ceiling(slide, small, **kw)
        fine = slide_ceiling(slide, small, stride=patch // 2, **kw)
    assert on_grid["soft"] > 0.95 and on_grid["label"] > 0.95
    assert coarse["soft"] < 0.85 and fine["soft"] > coarse["soft"] + 0.04
