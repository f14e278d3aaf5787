"""The one registry of designs across systems, and experiments/run.py over it."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from h2g.core.errors import ConfigError
from h2g.systems import registry

H2G = ["otsu", "unet_lr", "inc_pw", "mob_pw", "mob_km_pw", "mob_pw_unet", "mob_pw_agunet", "mob_pw_dagunet",
       "mob_pw_doubleunet"]


def test_h2g_registers_its_nine_designs_in_the_papers_order():
    assert "h2g" in registry.systems()
    assert [d.name for d in registry.systems()["h2g"].designs] == H2G
    assert [d.numeral for d in registry.systems()["h2g"].designs] == ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]
    assert all(registry.get_design(n).system == "h2g" for n in H2G)


def test_resolve_by_name_all_and_system():
    assert [d.name for d in registry.resolve(["mob_pw_unet", "otsu"])] == ["otsu", "mob_pw_unet"]  # registry order
    assert [d.name for d in registry.resolve("all")] == list(registry.designs())
    assert [d.name for d in registry.resolve(system="h2g")] == H2G
    assert [d.name for d in registry.resolve(["otsu"], system="h2g")] == ["otsu"]
    with pytest.raises(ConfigError, match="unknown design 'bogus'"):
        registry.resolve(["bogus"])
    with pytest.raises(ConfigError, match="unknown system"):
        registry.resolve(system="nope")
    with pytest.raises(ConfigError):
        registry.resolve([])


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_lists_every_design_and_system():
    proc = _cli("--help")
    assert proc.returncode == 0
    for name in [*H2G, "--system", "--set"]:
        assert name in proc.stdout, name


def test_cli_bad_override_is_one_clear_line(tmp_path):
    proc = _cli("--design", "otsu", "--set", "refine.epochz=3", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "refine.epochz" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_design_or_a_system():
    proc = _cli()
    assert proc.returncode == 2 and "--design" in proc.stderr
