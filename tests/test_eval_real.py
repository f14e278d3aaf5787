"""tools/eval_real.py and h2g.evaluation.real: BCSS regions as slides, their scoring
(checked against expectations computed here from the mask JPEGs with numpy), and the
CLI's errors.  No trained model: predictors are stubs.  Real data via the ``real_data``
fixture (skips when absent)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import openslide
import pytest
from PIL import Image

from h2g.core.cli import run_cli
from h2g.evaluation import real
from h2g.io.slide import Slide

from conftest import REPO

# the README's tumour shares of the three regions
README_SHARES = {"1008": 0.50, "1015": 0.31, "1019": 0.54}


def _tool():
    spec = importlib.util.spec_from_file_location("eval_real", REPO / "tools" / "eval_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _region(real_data, region_id: str) -> real.Region:
    regions = {r.region_id: r for r in real.bcss_regions(real_data)}
    assert sorted(regions) == sorted(README_SHARES)
    return regions[region_id]


def _numpy_truth(region: real.Region) -> np.ndarray:
    """The truth straight from the mask JPEG: mean of R, G, B > 127."""
    rgb = np.asarray(Image.open(region.mask_path).convert("RGB")).astype(np.float64)
    return rgb.mean(axis=-1) > 127


# ------------------------------------------------------------------------ regions as slides

def test_region_pyramid_reads_back_at_025_with_the_jpeg_pixels(real_data, tmp_path):
    region = _region(real_data, "1015")
    decoded = np.asarray(Image.open(region.image_path).convert("RGB"))
    path = real.write_region_slide(real.load_image(region.image_path), tmp_path / "r.tiff")

    osr = openslide.OpenSlide(str(path))
    try:
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25, rel=1e-6)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25, rel=1e-6)
        assert osr.dimensions == (4096, 2048)
        assert osr.level_count >= 2  # pyramidal: the 10x patches come from a reduced level
        for x, y, w, h in ((1000, 700, 512, 300), (4096 - 200, 2048 - 130, 200, 130)):  # inside; corner
            crop = np.asarray(osr.read_region((x, y), 0, (w, h)))
            assert (crop[..., 3] == 255).all()
            np.testing.assert_array_equal(crop[..., :3], decoded[y:y + h, x:x + w])
    finally:
        osr.close()
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25, rel=1e-6)
        assert slide.objective_power == 40
        np.testing.assert_array_equal(slide.read_region((512, 256), (256, 256), magnification=40),
                                      decoded[256:512, 512:768])
    real.open_region_slide(path, decoded).close()  # the tool's own check passes


def test_open_region_slide_rejects_wrong_scale_or_pixels(real_data, tmp_path):
    from h2g.core.errors import H2GError

    image = real.load_image(_region(real_data, "1019").image_path)[:600, :800]
    path = real.write_region_slide(image, tmp_path / "r.tiff", mpp=0.5)
    with pytest.raises(H2GError, match="reads back as 0.5"):
        real.open_region_slide(path, image)
    path = real.write_region_slide(image, tmp_path / "r2.tiff")
    with pytest.raises(H2GError, match="differ"):
        real.open_region_slide(path, 255 - image)


# ------------------------------------------------------------------------ scoring

def test_truth_on_grid_is_area_average_then_half():
    truth = np.zeros((4, 6), bool)
    truth[:2, :2] = True  # block (0, 0): all tumour
    truth[2, 2:4] = True  # block (1, 1): exactly half -> tumour
    truth[0, 4] = True  # block (0, 2): a quarter -> not
    np.testing.assert_array_equal(real.truth_on_grid(truth, (2, 3)), [[True, False, False], [False, True, False]])
    np.testing.assert_array_equal(real.truth_on_grid(truth, truth.shape), truth)


@pytest.mark.parametrize("region_id", sorted(README_SHARES))
@pytest.mark.slow
def test_scoring_with_stub_predictors(real_data, tmp_path, region_id):
    region = _region(real_data, region_id)
    truth = _numpy_truth(region)
    p = truth.mean()
    assert p == pytest.approx(README_SHARES[region_id], abs=0.01)
    seen = []

    def stub(answer):
        def predict(slide):
            seen.append((slide.mpp, slide.dimensions))
            return answer
        return predict

    # the truth itself as the prediction: Dice 1
    row = real.evaluate_region(region, stub(truth.astype(np.float32)), tmp_path).row
    assert row["dice"] == 1.0 and row["recall"] == 1.0 and row["precision"] == 1.0
    assert row["pred_share"] == pytest.approx(p) and row["true_share"] == pytest.approx(p)
    # all tumour at full resolution: Dice = 2p / (1 + p) exactly
    row = real.evaluate_region(region, stub(np.ones(truth.shape, np.float32)), tmp_path).row
    assert row["dice"] == pytest.approx(2 * p / (1 + p), rel=1e-9)
    assert row["pred_share"] == 1.0 and row["precision"] == pytest.approx(p, rel=1e-9)
    assert row["dice_all_tumour"] == pytest.approx(2 * p / (1 + p), rel=1e-9)
    # all tumour on a 512 x 512 grid (a run's refinement resolution): the truth is
    # area-averaged onto the grid, which keeps its share to within grid rounding
    prediction = real.Prediction(prob=np.ones((512, 512), np.float32), heat=np.zeros((512, 512), np.float32))
    result = real.evaluate_region(region, stub(prediction), tmp_path)
    assert result.row["grid"] == "512x512"
    assert result.row["true_share_grid"] == pytest.approx(p, abs=0.005)
    assert result.row["dice"] == pytest.approx(2 * p / (1 + p), abs=0.005)
    assert result.row["dice_heatmap"] == 0.0 and result.row["heatmap_share"] == 0.0
    # every predictor saw the region as a 0.25 um/px slide of the JPEG's size; no slide left behind
    w, h = Image.open(region.image_path).size
    assert seen == [(pytest.approx(0.25), (w, h))] * 3
    assert not list(tmp_path.glob("*.tiff"))

    paths = real.write_outputs(tmp_path / "out", [result], design="stub")
    doc = json.loads(paths["json"].read_text())
    assert doc["mean_dice"] == pytest.approx(result.row["dice"]) and doc["design"] == "stub"
    assert paths["csv"].read_text().splitlines()[0].startswith("region,width,height,mpp,dice,")
    assert Image.open(paths["figure"]).size[0] <= 1200


# ------------------------------------------------------------------------ CLI

def _fake_run(folder, design="mob_pw_unet", models=True):
    (folder / "models").mkdir(parents=True)
    from h2g.systems.registry import load_config

    (folder / "config.json").write_text(json.dumps({"design": design, **load_config("smoke").to_dict()}))
    (folder / "metrics.json").write_text("{}")
    if models:
        for name in ("patch_classifier", "refiner"):
            (folder / "models" / f"{name}.keras").write_bytes(b"")
    return folder


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    tool = _tool()

    def err(argv) -> str:
        assert run_cli(tool.main, argv) == 2
        text = capsys.readouterr().err.strip()
        assert text.count("\n") == 0, text
        return text

    missing = tmp_path / "no_such_run"
    assert str(missing) in err([str(missing)])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    assert str(unfinished / "metrics.json") in err([str(unfinished)])
    assert "not a patch-classifier + refinement design" in err([str(_fake_run(tmp_path / "pw", "mob_pw"))])
    no_model = _fake_run(tmp_path / "nomodel", models=False)
    assert str(no_model / "models" / "patch_classifier.keras") in err([str(no_model)])
    run = _fake_run(tmp_path / "run")
    assert str(tmp_path / "nodata") in err([str(run), "--real-data", str(tmp_path / "nodata")])
