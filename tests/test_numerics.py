"""What a run records of the machine behind its numbers (h2g.core.numerics) and the probe
that measures which settings change them (tools/numerics_probe.py)."""
from __future__ import annotations

import pytest
from helpers import load_cli, run_tool

from h2g.core.errors import ConfigError
from h2g.core.numerics import cpu_info, numerics_host

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8 sha_ni

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8 sha_ni
"""


def test_cpu_info_reads_the_model_and_the_instruction_sets_onednn_dispatches_on():
    assert cpu_info(CPUINFO) == {
        "cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
        "isa": ["avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]}
    amd = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma sha_ni\n"
    assert cpu_info(amd) == {"cpu": "AMD EPYC", "isa": ["avx", "avx2", "fma"]}
    assert cpu_info("") == {"cpu": None, "isa": []}


def test_numerics_host_records_the_settings_that_change_the_numbers(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    host = numerics_host()
    assert host["settings"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and host["settings"]["TF_ENABLE_ONEDNN_OPTS"] is None
    assert host["cpus"] >= 1 and host["versions"]["numpy"]


def test_probe_settings_parse_and_bad_ones_are_refused():
    probe = load_cli("numerics_probe", "tools")
    assert probe.parse_setting("") == {}
    assert probe.parse_setting("A_B=1, C=x") == {"A_B": "1", "C": "x"}
    for bad in ("FOO", "=1", "A=1,B", "A-B=1"):
        with pytest.raises(ConfigError, match="is not NAME=VALUE"):
            probe.parse_setting(bad)
    with pytest.raises(SystemExit):
        probe.parse_args(["--steps", "12"])


@pytest.mark.slow  # two fresh TensorFlow processes, each training a small CNN for 16 steps: ~25 s
def test_the_probe_gives_identical_weights_for_the_same_setting(tmp_path):
    out = run_tool("numerics_probe", "--setting", "", "--setting", "TF_CPP_MIN_LOG_LEVEL=2", "--steps", "16",
                   "--markdown", tmp_path / "probe.md")
    rows = [line for line in (tmp_path / "probe.md").read_text().splitlines() if line.startswith("| (as is)")
            or line.startswith("| TF_CPP")]
    assert len(rows) == 2 and all("| yes | 0.00e+00 |" in row for row in rows), out.stdout
    digests = {row.split("`")[1] for row in rows}
    assert len(digests) == 1  # same seed, same machine, same kernels: bit-identical weights
