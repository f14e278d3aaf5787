#!/usr/bin/env python
"""Parameter counts of every architecture at full size against the paper's figures.

    python tools/model_summary.py            # a table
    python tools/model_summary.py --json     # {"unet": {"params": N, "paper_params": P}, ...}
    python tools/model_summary.py unet agunet

Models are built with their default (full-size, paper) settings and never run, so no
1024x1024 forward pass happens.  ``paper_params`` is null where the paper gives no
figure (UNet-LR).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from h2g.cli import run_cli
from h2g.errors import ConfigError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads (in main)


def summary(names) -> dict:
    """``{name: {"params": N, "paper_params": P or None}}`` for each name."""
    import keras

    from h2g import models

    out = {}
    for name in names:
        model = models.build(name)
        out[name] = {"params": int(model.count_params()), "paper_params": models.PAPER_PARAMS.get(name)}
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
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"architectures (default: all of {', '.join(ARCHITECTURES)})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ARCHITECTURES]
    if unknown:
        raise ConfigError(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}")
    rows = summary(args.names or list(ARCHITECTURES))
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
