#!/usr/bin/env python
"""Which settings change training's numbers on this machine: the same small training run
(a small CNN, fixed data, seed 0, Adam) once per setting, each in a fresh process (the
settings are read when TensorFlow loads), and whether its weights come out bit-identical to
the first setting's.

    python tools/numerics_probe.py                       # the default settings below
    python tools/numerics_probe.py --setting "" --setting ONEDNN_MAX_CPU_ISA=AVX2 \\
        --setting TF_ENABLE_ONEDNN_OPTS=0,TF_NUM_INTRAOP_THREADS=1 --markdown probe.md

A setting is ``NAME=VALUE[,NAME=VALUE...]`` of environment variables ("" runs as the
environment is).  oneDNN dispatches on the CPU's instruction sets at run time, so capping
them (``ONEDNN_MAX_CPU_ISA``) runs here the code path an older CPU would take; where a cap
changes the weights, two machines that differ in those instruction sets differ too.
Prints a Markdown table (weights' digest, max |difference| of the predictions from the first
setting's, final loss, ms per training step after the first epoch); bad input: exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from h2g.core.cli import run_cli
from h2g.core.errors import ConfigError

DEFAULT_SETTINGS = ("", "ONEDNN_MAX_CPU_ISA=AVX2", "ONEDNN_MAX_CPU_ISA=AVX", "ONEDNN_MAX_CPU_ISA=SSE41",
                    "TF_ENABLE_ONEDNN_OPTS=0", "TF_ENABLE_ONEDNN_OPTS=0,ONEDNN_MAX_CPU_ISA=AVX",
                    "TF_NUM_INTRAOP_THREADS=1", "TF_ENABLE_ONEDNN_OPTS=0,TF_NUM_INTRAOP_THREADS=1")


def parse_setting(text: str) -> dict[str, str]:
    """``"A=1,B=x"`` -> ``{"A": "1", "B": "x"}``; "" -> {}; a ConfigError naming the part."""
    env = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not name.strip().replace("_", "").isalnum():
            raise ConfigError(f"setting {text!r}: {part!r} is not NAME=VALUE")
        env[name.strip()] = value.strip()
    return env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", default=None, metavar="NAME=VALUE[,...]",
                   help=f"environment for one run (repeatable; default: {' | '.join(repr(s) for s in DEFAULT_SETTINGS)})")
    p.add_argument("--steps", type=int, default=24, help="training steps per run (default 24: 3 epochs of 8)")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT.md", help="also write the table here")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 16 or args.steps % 8:
        p.error("--steps must be a multiple of 8, at least 16 (one epoch is 8 steps; the first is not timed)")
    return args


def train_once(out: Path, steps: int) -> None:
    """The probe's training run in this process: predictions to ``out`` (.npy), a JSON line
    of the weights' digest, the final loss and ms per step to stdout."""
    import hashlib

    import numpy as np
    import keras

    from h2g.core.measure import Timed
    from h2g.core.numerics import numerics_host

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 32, 32, 3), dtype=np.float32)
    y = (x[:, :16].mean(axis=(1, 2, 3)) > x[:, 16:].mean(axis=(1, 2, 3))).astype("int32")  # learnable
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, padding="same"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2, padding="same"), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # traces and warms up
    with Timed() as timed:
        history = model.fit(x, y, batch_size=8, epochs=steps // 8 - 1, shuffle=False, verbose=0)
    ms_per_step = 1000 * timed.wall / (steps - 8)
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
    np.save(out, model.predict(x, batch_size=64, verbose=0))
    print(json.dumps({"digest": digest[:12], "loss": float(history.history["loss"][-1]),
                      "ms_per_step": ms_per_step, "machine": numerics_host()}))


def run_setting(setting: str, steps: int, folder: Path, index: int) -> dict:
    """One probe run in a fresh Python with ``setting`` added to the environment."""
    env = {**os.environ, **parse_setting(setting), "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = folder / f"run{index}.npy"
    proc = subprocess.run([sys.executable, __file__, "--child", str(out), "--steps", str(steps)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"setting {setting!r}: the training run failed: {tail[0]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"setting": setting, **result, "predictions": out}


def markdown(results: list[dict]) -> str:
    import numpy as np

    first = results[0]
    reference = np.load(first["predictions"])
    machine = first["machine"]
    lines = [f"Probe on {machine['cpu']} ({', '.join(machine['isa']) or 'no AVX'}; {machine['cpus']} cores; "
             f"TensorFlow {machine['versions']['tensorflow']}); compared with the first row.", "",
             "| Setting | Weights (sha256) | Same weights | Max abs difference of predictions | Final loss "
             "| ms / step |", "|---|---|---|---|---|---|"]
    for r in results:
        diff = float(np.abs(np.load(r["predictions"]) - reference).max())
        lines.append(f"| {r['setting'] or '(as is)'} | `{r['digest']}` | {'yes' if r['digest'] == first['digest'] else 'no'} "
                     f"| {diff:.2e} | {r['loss']:.6f} | {r['ms_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        train_once(args.child, args.steps)
        return 0
    settings = args.setting if args.setting is not None else list(DEFAULT_SETTINGS)
    for setting in settings:
        parse_setting(setting)  # every bad one before any run
    if args.markdown is not None and not args.markdown.parent.is_dir():
        raise ConfigError(f"{args.markdown}: its folder does not exist")
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        results = [run_setting(s, args.steps, Path(tmp), i)
                   for i, s in enumerate(tqdm(settings, desc="probe runs", unit="run"))]
        text = markdown(results)
    print(text, end="")
    if args.markdown is not None:
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
