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
DMMN = ["dsmn_s2", "dmmn_ms", "dmmn_m2s", "dmmn_m3"]
MUNET = ["unet_b0", "munet_b4"]
RAZN = ["razn_scale1", "razn_scale2", "razn_ms", "razn_attention", "razn"]


def test_h2g_registers_its_nine_designs_in_the_papers_order():
    assert "h2g" in registry.systems()
    assert [d.name for d in registry.systems()["h2g"].designs] == H2G
    assert [d.numeral for d in registry.systems()["h2g"].designs] == ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]
    assert all(registry.get_design(n).system == "h2g" for n in H2G)


def test_dmmn_registers_its_four_architectures_on_the_multiclass_manifest():
    dmmn = registry.systems()["dmmn"]
    assert [d.name for d in dmmn.designs] == DMMN
    assert [d.label for d in dmmn.designs] == ["DSMN-S2", "DMMN-MS", "DMMN-M2S", "DMMN-M3"]
    assert dmmn.manifest == REPO / "data_manifest_multiclass.csv"
    assert registry.systems()["h2g"].manifest == REPO / "data_manifest.csv"
    assert [d.name for d in registry.resolve("all")] == H2G + DMMN + MUNET + RAZN
    assert [d.name for d in registry.resolve(system="dmmn")] == DMMN


def test_munet_registers_its_two_designs_on_the_multistain_manifest():
    munet = registry.systems()["munet"]
    assert [d.name for d in munet.designs] == MUNET
    assert [d.label for d in munet.designs] == ["U-Net-B0", "m-UNet-B4"]
    assert munet.manifest == REPO / "data_manifest_multistain.csv"


def test_razn_registers_its_table1_rows_on_the_multiclass_manifest():
    razn = registry.systems()["razn"]
    assert [d.name for d in razn.designs] == RAZN
    assert [d.label for d in razn.designs] == ["Scale 1", "Scale 2", "MS", "Attention", "RAZN"]
    assert razn.manifest == REPO / "data_manifest_multiclass.csv"


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
    for name in [*H2G, *DMMN, *RAZN, "--system", "--set", "--strategy"]:
        assert name in proc.stdout, name


@pytest.mark.slow
def test_cli_bad_override_is_one_clear_line(tmp_path):
    proc = _cli("--design", "otsu", "--set", "refine.epochz=3", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "refine.epochz" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_design_or_a_system():
    proc = _cli()
    assert proc.returncode == 2 and "--design" in proc.stderr


def _tf_cli(*args):
    code = ("import sys\nfrom h2g.core.cli import run_cli\n"
            "def main(argv):\n    import tensorflow as tf\n    print(int(tf.reduce_sum(tf.ones(3))))\n"
            "sys.exit(run_cli(main, sys.argv[1:], tensorflow=True))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_cli_keeps_tensorflow_start_up_lines_quiet_unless_verbose():
    quiet = _tf_cli()
    assert quiet.returncode == 0 and quiet.stdout.strip() == "3"
    assert quiet.stderr.strip() == "", quiet.stderr
    verbose = _tf_cli("-v")
    assert verbose.returncode == 0 and verbose.stdout.strip() == "3"
    assert verbose.stderr.strip() != ""  # TensorFlow's own lines are shown with -v
