#!/usr/bin/env python
"""Parameter counts of every architecture at full size against the paper's figures.

    python tools/model_summary.py            # a table
    python tools/model_summary.py --json     # {"unet": {"params": N, "paper_params": P}, ...}
    python tools/model_summary.py unet agunet
    python tools/model_summary.py mobilenetv2 unet --save models/untrained   # .keras files

Models are built with their default (full-size, paper) settings and never run, so no
1024x1024 forward pass happens.  ``paper_params`` is null where the paper gives no
figure (UNet-LR).  ``--save DIR`` also writes each model, randomly initialised with
``--seed``, as ``DIR/<name>.keras`` (single-output for deeply supervised nets): full-size
stand-ins for the runtime benchmark (``export/convert.py DIR`` then
``export/benchmark.py``), whose timings do not depend on the weights.  They are
untrained: never use them for segmentation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads (in main)


def summary(names, save_dir: Path | None = None, seed: int = 0) -> dict:
    """``{name: {"params": N, "paper_params": P or None}}`` for each name; with
    ``save_dir``, each model (seeded random weights, inference outputs only) is saved
    there as ``<name>.keras`` and its row gets ``"saved": path``."""
    import keras

    from h2g import models

    out = {}
    for name in names:
        keras.utils.set_random_seed(seed)
        model = models.build(name)
        out[name] = {"params": int(model.count_params()), "paper_params": models.PAPER_PARAMS.get(name)}
        if save_dir is not None:
            path = save_dir / f"{name}.keras"
            models.inference_model(model).save(path)
            out[name]["saved"] = str(path)
        keras.backend.clear_session()
    return out


def table(rows: dict) -> str:
    lines = [f"{'architecture':<14}{'params':>14}{'paper':>14}{'deviation':>11}"]
    for name, row in rows.items():
        paper = row["paper_params"]
        if paper is None:
            lines.append(f"{name:<14}{row['params']:>14,}{'-':>14}{'-':>11}")
        else:
            lines.append(f"{name:<14}{row['params']:>14,}{paper:>14,}{(row['params'] - paper) / paper:>+10.2%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from h2g.models import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(parser)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"architectures (default: all of {', '.join(ARCHITECTURES)})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="also save each model, untrained, as DIR/<name>.keras (benchmark stand-ins)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the saved models' random weights")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ARCHITECTURES]
    if unknown:
        raise ConfigError(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}")
    if args.save is not None:
        if args.save.exists() and not args.save.is_dir():
            raise ConfigError(f"--save {args.save} exists and is not a folder")
        args.save.mkdir(parents=True, exist_ok=True)
    rows = summary(args.names or list(ARCHITECTURES), args.save, args.seed)
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    for row in rows.values():
        if "saved" in row and not args.json:
            print(f"saved {row['saved']} (untrained: for timing only)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=True))
