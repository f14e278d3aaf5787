"""Stage keys follow exactly what a stage declares it reads; config overrides."""
from __future__ import annotations

import dataclasses
import json

import pytest

from h2g.core.atomic import replace_atomically, write_json
from h2g.systems.registry import load_config
from h2g.core.errors import ConfigError
from h2g.core.stages import Stage


def _stage(root, config, **kw):
    return Stage(root, "refiner", config=config, sections=("refine", "patches"), data="d1", **kw)


def test_key_changes_with_declared_inputs_only(tmp_path):
    c = load_config("smoke")
    base = _stage(tmp_path, c).key
    assert _stage(tmp_path, c).key == base  # stable
    # a declared section, the seed, the data and the params change it
    assert _stage(tmp_path, c.replace(refine=dataclasses.replace(c.refine, epochs=3))).key != base
    assert _stage(tmp_path, c.replace(patches=dataclasses.replace(c.patches, annotation_downsample=8.0))).key != base
    assert _stage(tmp_path, c.replace(seed=1)).key != base
    assert Stage(tmp_path, "refiner", config=c, sections=("refine", "patches"), data="d2").key != base
    assert _stage(tmp_path, c, params={"architecture": "unet"}).key != base
    # a section it does not read does not
    assert _stage(tmp_path, c.replace(classifier=dataclasses.replace(c.classifier, epochs=99))).key == base
    unseeded = Stage(tmp_path, "heatmaps", config=c, sections=("patches",), seeded=False)
    assert Stage(tmp_path, "heatmaps", config=c.replace(seed=5), sections=("patches",), seeded=False).key == unseeded.key


def test_upstream_keys_chain(tmp_path):
    """Round k+1 declares round k as upstream: a change to round 1 changes every later key."""
    c = load_config("smoke")

    def rounds(config, n=3):
        previous, keys = None, []
        for i in range(n):
            previous = Stage(tmp_path, f"round{i}", config=config, sections=("refine",), upstream={"previous": previous})
            keys.append(previous.key)
        return keys

    a = rounds(c)
    b = rounds(c.replace(refine=dataclasses.replace(c.refine, epochs=2)))
    assert all(x != y for x, y in zip(a, b))
    model = tmp_path / "m.bin"
    model.write_bytes(b"one")
    k1 = Stage(tmp_path, "s", seeded=False, upstream={"model": model}).key
    model.write_bytes(b"two")
    assert Stage(tmp_path, "s", seeded=False, upstream={"model": model}).key != k1


def test_done_marks_completion_and_records_inputs(tmp_path):
    c = load_config("smoke")
    stage = _stage(tmp_path, c)
    assert not stage.done
    assert stage.prepare(resume=True) is False  # nothing to resume
    (stage.dir / "partial.txt").write_text("half")
    assert stage.prepare(resume=True) is True and (stage.dir / "partial.txt").exists()
    assert stage.prepare(resume=False) is False and not (stage.dir / "partial.txt").exists()
    stage.finish({"best_epoch": 3})
    info = json.loads((stage.dir / "done.json").read_text())
    assert info["best_epoch"] == 3 and info["key"] == stage.key
    assert info["inputs"]["config"]["refine"]["epochs"] == c.refine.epochs and info["inputs"]["data"] == "d1"
    assert _stage(tmp_path, c).done


def test_unknown_section_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section"):
        Stage(tmp_path, "x", config=load_config("smoke"), sections=("refinement",))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})

    def fail(tmp):
        tmp.write_text("half a fil")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_atomically(target, fail)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_overrides_parse_by_field_type():
    c = load_config("smoke").override([
        "refine.epochs=5", "seed=3", "sampler.stages=slide,class,patch", "classifier.weights=none",
        "classifier.bn_momentum=0.5", "refine.augment=false", "refine.loss=crossentropy", "refine.steps_per_epoch=none"])
    assert c.refine.epochs == 5 and c.seed == 3
    assert c.sampler.stages == ("slide", "class", "patch")
    assert c.classifier.weights is None and c.classifier.bn_momentum == 0.5
    assert c.refine.augment is False and c.refine.loss == "crossentropy" and c.refine.steps_per_epoch is None
    assert load_config("smoke").refine.epochs != 5  # the preset itself is untouched


@pytest.mark.parametrize("text, fragment", [
    ("refine.epochz=1", "unknown field 'epochz'"),
    ("refinement.epochs=1", "unknown section 'refinement'"),
    ("refine=3", "is a section"),
    ("refine.epochs=many", "not a valid int"),
    ("refine.augment=maybe", "not a valid bool"),
    ("epochs", "expected section.field=value"),
])
def test_bad_overrides_name_the_key(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("smoke").override([text])
