"""What decides a run's floating-point results besides its seed and its inputs.

On one machine the same seed gives bit-identical figures.  Across machines it need not:
oneDNN (TensorFlow's CPU kernels for convolutions and matrix products, and the GEMM behind
Eigen's contractions even with ``TF_ENABLE_ONEDNN_OPTS=0``) picks its code path by the
instruction sets the CPU reports, and an op split over another number of threads sums in
another order.  :func:`numerics_host` records those inputs (the CPU, the instruction sets
oneDNN dispatches on, the thread settings, the settings that cap them, the library
versions) in every run's ``config.json`` (``machine``), so two runs' figures can be told
apart by the machine that made them; ``tools/numerics_probe.py`` measures which settings
change a small training run's weights.
"""
from __future__ import annotations

import os
from importlib import metadata

from h2g.core.measure import host

#: the /proc/cpuinfo flags that select oneDNN's x86 code paths (AVX2, AVX-512, VNNI, bf16, AMX)
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
#: environment settings that change which kernels run or how ops are split over threads
SETTINGS = ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
            "OMP_NUM_THREADS")
PACKAGES = ("tensorflow", "keras", "numpy")


def cpu_info(text: str | None = None) -> dict:
    """``{"cpu": model name, "isa": [flags of ISA_FLAGS the CPU has]}`` from ``/proc/cpuinfo``
    (or ``text``, its contents); ``cpu`` is None and ``isa`` empty where there is none."""
    if text is None:
        try:
            with open("/proc/cpuinfo") as fh:
                text = fh.read()
        except OSError:
            text = ""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def numerics_host() -> dict:
    """The machine's part of a run's numbers: :func:`~h2g.core.measure.host` (Python, machine,
    the cores this process may use), CPU model and instruction sets, the settings of
    :data:`SETTINGS` (None: unset, the library's default) and the versions of :data:`PACKAGES`."""
    return {**host(), **cpu_info(),
            "settings": {name: os.environ.get(name) for name in SETTINGS},
            "versions": {name: _version(name) for name in PACKAGES}}
