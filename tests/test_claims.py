"""The papers' claims over seeds (h2g.evaluation.claims, registry.run_seeds): differences,
mean ± sd and the paired test checked against values computed here by hand from a fixture
of per-seed, per-slide numbers; the verdict rule; --seeds end to end on a system whose
runner writes those numbers."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import t as student_t

from h2g.evaluation import claims
from h2g.evaluation.claims import Claim, SeedResults
from h2g.systems import registry

# Dice of designs A and B on slides s1..s3, per seed
DICE = {0: {"a": (0.80, 0.70, 0.90), "b": (0.70, 0.72, 0.80)},
        1: {"a": (0.82, 0.66, 0.88), "b": (0.75, 0.70, 0.79)},
        2: {"a": (0.79, 0.71, 0.92), "b": (0.69, 0.69, 0.81)}}
SLIDES = ("s1", "s2", "s3")


def metrics(dice, **extra) -> dict:
    return {"dice_mean": float(np.mean(dice)), "dice_by_slide": dict(zip(SLIDES, dice)), **extra}


def seeds() -> list[SeedResults]:
    return [SeedResults(s, {d: metrics(v, mean_iou=0.5 + 0.1 * (d == "a") + 0.01 * s,
                                       relative_time={"mean": 2.0 if d == "a" else 3.0 + s / 10},
                                       rounds=[{"round": 0, "mean_iou": 0.4}, {"round": 1, "mean_iou": 0.45 + s / 100}])
                            for d, v in DICE[s].items()}) for s in sorted(DICE)]


def test_differences_mean_sd_and_the_paired_test_by_hand():
    result, = claims.evaluate([Claim("A beats B", "a", "b", "dice", (0.9, 0.8))], seeds())
    # per seed: mean Dice of A minus mean Dice of B
    by_hand = [(0.80 + 0.70 + 0.90 - 0.70 - 0.72 - 0.80) / 3, (0.82 + 0.66 + 0.88 - 0.75 - 0.70 - 0.79) / 3,
               (0.79 + 0.71 + 0.92 - 0.69 - 0.69 - 0.81) / 3]
    assert result["differences"] == pytest.approx(by_hand)
    mean = sum(by_hand) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in by_hand) / 2)
    assert result["mean"] == pytest.approx(mean) and result["sd"] == pytest.approx(sd)
    # per slide, averaged over the seeds, then a t-test over the three slides
    per_slide = [(0.10 + 0.07 + 0.10) / 3, (-0.02 - 0.04 + 0.02) / 3, (0.10 + 0.09 + 0.11) / 3]
    m = sum(per_slide) / 3
    s = math.sqrt(sum((d - m) ** 2 for d in per_slide) / 2)
    t = m / (s / math.sqrt(3))
    assert result["p"] == pytest.approx(2 * student_t.sf(abs(t), df=2))
    assert result["verdict"] == "undecided" and result["p"] > 0.05  # favours A, but 3 slides cannot show it
    assert "t-test over 3 test slides" in result["test"] and result["paper"] == [0.9, 0.8]
    assert result["seeds"] == [0, 1, 2]


def test_the_verdicts_and_a_cost_where_lower_is_better():
    assert claims.verdict(0.05, 0.01) == "holds" and claims.verdict(0.05, 0.2) == "undecided"
    assert claims.verdict(-0.01, 0.9) == "does not hold" and claims.verdict(-0.2, 0.001) == "does not hold"
    reverse, = claims.evaluate([Claim("B beats A", "b", "a", "dice")], seeds())
    assert reverse["verdict"] == "does not hold" and reverse["mean"] < 0
    # A takes 2.0 against B's 3.0, 3.1, 3.2: lower is better, so A's claim is favoured by +1.0, +1.1, +1.2
    faster, = claims.evaluate([Claim("A is faster", "a", "b", "relative_time", lower_is_better=True)], seeds())
    assert faster["differences"] == pytest.approx([1.0, 1.1, 1.2])
    t = 1.1 / (0.1 / math.sqrt(3))  # no per-slide values: over the seeds
    assert faster["p"] == pytest.approx(2 * student_t.sf(t, df=2)) and "over 3 seeds" in faster["test"]
    assert faster["verdict"] == "holds"


def test_rounds_of_a_design_and_claims_that_cannot_be_checked():
    rounds, = claims.evaluate([Claim("round 1 > round 0", "a/round1", "a/round0", "mean_iou")], seeds())
    assert rounds["differences"] == pytest.approx([0.05, 0.06, 0.07])
    assert "| Design A round 1 > Design A round 0: round 1 > round 0 |" in claims.claims_markdown([rounds],
                                                                                            {"a": "Design A"})
    missing = claims.evaluate([Claim("x", "a", "nowhere", "dice"), Claim("y", "a", "b", "iou:tumour")], seeds())
    assert missing == []  # a design that did not run, a class the designs do not report


def test_markdown_rows():
    text = claims.claims_markdown(claims.evaluate([Claim("A beats B", "a", "b", "dice", (0.9, None))], seeds()),
                                  {"a": "Design A", "b": "Design B"})
    assert "| Design A > Design B: A beats B | dice | 0.9 vs - | +0.060 | +0.040 | +0.077 |" in text
    assert "**undecided**" in text
    table = claims.seeds_markdown(seeds(), ["a", "b"], {"a": "Design A"})
    assert "| Design A | Dice | 0.800 | 0.787 | 0.807 | 0.798 ± 0.010 |" in table
    assert "collapsed" not in table and "collapsed" not in text


def test_a_collapsed_run_is_never_a_row_or_a_verdict_without_its_flag():
    runs = seeds()
    runs[1].metrics["b"].update(collapsed=True, collapse={"dominant": "tumour", "share": 0.985, "truth_share": 0.3,
                                                          "where": "test"})
    result, = claims.evaluate([Claim("A beats B", "a", "b", "dice")], runs)
    assert result["collapsed"] == ["b seed 1"]
    text = claims.claims_markdown([result], {"a": "Design A", "b": "Design B"})
    assert "**undecided** (collapsed: b seed 1) |" in text
    table = claims.seeds_markdown(runs, ["a", "b"], {"a": "Design A", "b": "Design B"})
    assert "| Design A | Dice | 0.800 | 0.787 | 0.807 | 0.798 ± 0.010 |" in table  # A did not collapse
    b_dice = [line for line in table.splitlines() if line.startswith("| Design B | Dice |")]
    assert b_dice == ["| Design B | Dice | 0.740 | 0.747 (collapsed) | 0.730 | 0.739 ± 0.008 (collapsed runs in it) |"]
    assert "Design B seed 1: collapsed: 98.5% tumour" in table


# ---------------------------------------------------------------------------- --seeds end to end
@dataclass(frozen=True)
class FixedDesign:
    name: str
    label: str
    system: str = "fixed"
    deep_learning: bool = True


def run_fixed(designs, manifest_path, out, config, resume=False, strategy=None, cache=None):
    """A runner that writes the fixture's numbers for the config's seed."""
    results = {}
    for design in designs:
        folder = out / design.name
        folder.mkdir(parents=True)
        result = {"design": design.name, "system": "fixed", "label": design.label, "seed": config.seed,
                  "resolution": 1, "recall_mean": 0.5, "precision_mean": 0.5, "dice_sd": 0.0,
                  **metrics(DICE[config.seed][design.name])}
        (folder / "metrics.json").write_text(json.dumps(result))
        results[design.name] = result
    return results, []


FIXED = registry.System(name="fixed", label="Fixed", source="(a test)",
                        designs=(FixedDesign("a", "Design A"), FixedDesign("b", "Design B")),
                        runner="test_claims:run_fixed", claims="test_claims:FIXED_CLAIMS")
FIXED_CLAIMS = (Claim("A beats B", "a", "b", "dice"),)


def test_run_seeds_writes_every_seed_and_the_claims(tmp_path, monkeypatch):
    registry.register(FIXED)
    try:
        monkeypatch.setattr("h2g.evaluation.tables.write_tables", lambda *a, **k: None)
        monkeypatch.setattr("h2g.evaluation.figures.dice_boxplot", lambda *a, **k: None)
        config = registry.load_config("smoke")
        results, found = registry.run_seeds(registry.resolve(system="fixed"), tmp_path, tmp_path / "out", config,
                                            [0, 1, 2])
    finally:
        registry.unregister("fixed")
    assert sorted(results) == [0, 1, 2] and all((tmp_path / "out" / f"seed{s}" / "a" / "metrics.json").is_file()
                                                for s in (0, 1, 2))
    saved = json.loads((tmp_path / "out" / "claims.json").read_text())
    expected, = claims.evaluate(FIXED_CLAIMS, seeds())
    assert saved == found and saved[0]["system"] == "fixed"
    assert saved[0]["differences"] == pytest.approx(expected["differences"]) and saved[0]["p"] == pytest.approx(
        expected["p"])
    assert set(saved[0]) >= {"claim", "better", "worse", "metric", "paper", "differences", "mean", "sd", "test", "p",
                             "verdict"}
    assert "Design A > Design B" in (tmp_path / "out" / "claims.md").read_text()
    seeds_md = (tmp_path / "out" / "seeds.md").read_text()
    assert "0.798 ± 0.010" in seeds_md
    assert seeds_md.startswith("Run on ") and all(f"seed {s} " in seeds_md.splitlines()[0] for s in (0, 1, 2))
    with pytest.raises(Exception, match="distinct seeds"):
        registry.run_seeds(registry.resolve("all"), None, tmp_path / "o", config, [1, 1])


def test_a_run_stopped_after_a_seed_leaves_its_tables_saying_so(tmp_path, monkeypatch):
    """seeds.md / claims.md are written after every seed: Ctrl-C during seed 1 of three
    leaves seed 0's tables (the claim's difference is seed 0's, by hand), marked partial;
    the finished run's files are not marked."""
    registry.register(FIXED)
    real = registry.run

    def stop_at_seed_1(chosen, manifest_path, out, config, **kw):
        if config.seed == 1:
            raise KeyboardInterrupt
        return real(chosen, manifest_path, out, config, **kw)

    try:
        monkeypatch.setattr("h2g.evaluation.tables.write_tables", lambda *a, **k: None)
        monkeypatch.setattr("h2g.evaluation.figures.dice_boxplot", lambda *a, **k: None)
        monkeypatch.setattr(registry, "run", stop_at_seed_1)
        config = registry.load_config("smoke")
        with pytest.raises(KeyboardInterrupt):
            registry.run_seeds(registry.resolve(system="fixed"), tmp_path, tmp_path / "out", config, [0, 1, 2])
        out = tmp_path / "out"
        seeds_md, claims_md = (out / "seeds.md").read_text(), (out / "claims.md").read_text()
        assert "**Partial: 1 of 3 seeds finished** (seed 1, 2 not yet run" in seeds_md
        assert claims_md.startswith("**Partial: 1 of 3 seeds finished**")
        # one seed has no sd over seeds: said, not printed as 0
        assert "| Design A | Dice | 0.800 | 0.800 (one seed) |" in seeds_md and "± 0.000" not in seeds_md
        assert "(one seed) |" in claims_md and "± 0.000" not in claims_md
        saved, = json.loads((out / "claims.json").read_text())
        assert saved["seeds"] == [0]
        assert saved["differences"] == pytest.approx([np.mean(DICE[0]["a"]) - np.mean(DICE[0]["b"])])
        monkeypatch.setattr(registry, "run", real)
        registry.run_seeds(registry.resolve(system="fixed"), tmp_path, tmp_path / "again", config, [0, 1])
    finally:
        registry.unregister("fixed")
    assert "Partial" not in (tmp_path / "again" / "seeds.md").read_text()
    assert "Partial" not in (tmp_path / "again" / "claims.md").read_text()


def test_seeds_share_one_stage_cache(tmp_path, monkeypatch):
    """run_seeds gives every seed's pipeline OUT as the cache root: stages land in
    OUT/_cache, not in each seed's folder."""
    seen = []

    def fake_run(chosen, manifest_path, out, config, resume=False, strategy=None, cache=None):
        seen.append((out, cache))
        return {}

    monkeypatch.setattr(registry, "run", fake_run)
    monkeypatch.setattr(claims, "load_seeds", lambda folders: [])
    registry.run_seeds(registry.resolve(["otsu"]), None, tmp_path / "out", registry.load_config("smoke"), [0, 1])
    assert seen == [(tmp_path / "out" / "seed0", tmp_path / "out"), (tmp_path / "out" / "seed1", tmp_path / "out")]
