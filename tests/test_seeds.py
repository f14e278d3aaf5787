"""Designs over several seeds (h2g.evaluation.seeds, tools/seed_summary.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

from h2g.core.errors import ConfigError
from h2g.evaluation import seeds

DICE = {  # seed -> design -> mean test Dice (made up; means and sds below by hand)
    0: {"unet_lr": 0.70, "mob_pw": 0.66, "mob_pw_unet": 0.80},
    1: {"unet_lr": 0.74, "mob_pw": 0.70, "mob_pw_unet": 0.76},
    2: {"unet_lr": 0.72, "mob_pw": 0.71, "mob_pw_unet": 0.81},
}
LABELS = {"unet_lr": "UNet-LR", "mob_pw": "Mob-PW", "mob_pw_unet": "Mob-PW-UNet"}


def write_run(folder, seed, dice, *, preset="smoke", n=6):
    for name, value in dice.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "metrics.json").write_text(json.dumps(
            {"design": name, "label": LABELS[name], "dice_mean": value, "seed": seed, "preset": preset,
             "n_test_slides": n}))
    return folder


@pytest.fixture()
def runs(tmp_path):
    # written out of seed order: loading sorts them
    return [write_run(tmp_path / f"run{s}", s, DICE[s]) for s in (2, 0, 1)]


def test_mean_sd_and_paired_differences_hand_computed(runs):
    loaded = seeds.load_runs(runs)
    assert [r.seed for r in loaded] == [0, 1, 2]
    d = seeds.design_dice(loaded, "mob_pw_unet")
    assert d.values == (0.80, 0.76, 0.81)
    assert d.mean == pytest.approx(0.79)
    # deviations 0.01, -0.03, 0.02: sum of squares 0.0014 over n - 1 = 2
    assert d.sd == pytest.approx(0.0007 ** 0.5)
    diff = seeds.paired_difference(loaded, "mob_pw_unet", "unet_lr")
    assert diff.values == pytest.approx((0.10, 0.02, 0.09))
    assert diff.mean == pytest.approx(0.07)
    # deviations 0.03, -0.05, 0.02: 0.0038 / 2
    assert diff.sd == pytest.approx(0.0019 ** 0.5)
    assert seeds.OverSeeds((0.5,)).sd == 0.0


def test_markdown_table_reports_every_seed_and_the_pair(runs):
    from h2g.systems.registry import designs

    text = seeds.summary_markdown(seeds.load_runs(runs), [("mob_pw_unet", "unet_lr"), ("mob_pw", "unet_lr")],
                                  order=list(designs()))
    assert "| Mob-PW-UNet | 0.800 | 0.760 | 0.810 | 0.790 ± 0.026 |" in text
    assert "| Mob-PW-UNet − UNet-LR | +0.100 | +0.020 | +0.090 | +0.070 ± 0.044 | 3 of 3 |" in text
    assert "| Mob-PW − UNet-LR | -0.040 | -0.040 | -0.010 | -0.030 ± 0.017 | 0 of 3 |" in text
    assert "smoke preset, 6 test slides" in text and "3 seeds" in text
    # the registry's (the paper's) order, not the folders' alphabetical one
    assert text.index("| UNet-LR |") < text.index("| Mob-PW |") < text.index("| Mob-PW-UNet |")


def test_runs_that_cannot_be_compared_are_refused(tmp_path, runs):
    with pytest.raises(ConfigError, match="one folder per seed: seed 0"):
        seeds.load_runs([*runs, write_run(tmp_path / "again", 0, DICE[0])])
    with pytest.raises(ConfigError, match="different presets or test sets"):
        seeds.load_runs([*runs, write_run(tmp_path / "paper", 3, DICE[0], preset="paper")])
    with pytest.raises(ConfigError, match="no <design>/metrics.json"):
        seeds.load_runs([tmp_path / "empty"])
    mixed = write_run(tmp_path / "mixed", 4, {"unet_lr": 0.7})
    write_run(mixed, 5, {"mob_pw": 0.7})
    with pytest.raises(ConfigError, match="different seeds"):
        seeds.load_run(mixed)
    (tmp_path / "broken" / "otsu").mkdir(parents=True)
    (tmp_path / "broken" / "otsu" / "metrics.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.*unreadable"):
        seeds.load_run(tmp_path / "broken")
    partial = write_run(tmp_path / "partial", 7, {"unet_lr": 0.7})
    with pytest.raises(ConfigError, match="'mob_pw_unet' is not in .*partial"):
        seeds.paired_difference(seeds.load_runs([*runs, partial]), "mob_pw_unet", "unet_lr")


@pytest.mark.slow
def test_cli_prints_writes_table_and_figure_and_fails_cleanly(runs, tmp_path):
    out = tmp_path / "summary"
    cmd = [sys.executable, str(REPO / "tools" / "seed_summary.py"), *map(str, runs),
           "--pair", "mob_pw_unet", "unet_lr", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert "+0.070 ± 0.044 | 3 of 3" in proc.stdout
    assert (out / "seeds.md").read_text() in proc.stdout
    with Image.open(out / "seeds.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "seed_summary.py"), str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nothing" in bad.stderr
