#!/usr/bin/env python
"""Designs compared over several seeds: the test Dice of each design per seed, its mean
and sd over seeds, and paired per-seed differences between designs.

    for s in 0 1 2; do python experiments/run.py --design unet_lr mob_pw mob_pw_unet --seed $s --out runs/seed$s; done
    python tools/seed_summary.py runs/seed0 runs/seed1 runs/seed2 \\
        --pair mob_pw_unet unet_lr --pair mob_pw_unet mob_pw --out runs/seeds

Each folder is one run of experiments/run.py (one seed; same preset and test slides).
Prints a Markdown table; with --out also writes it (seeds.md) and a figure (seeds.png).
Bad input: exit code 2, one line naming the folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2g.core.cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders, one seed each")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also report Dice of design A minus design B per seed (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="folder for seeds.md and seeds.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.evaluation.seeds import load_runs, seed_figure, summary_markdown
    from h2g.systems.registry import designs

    runs = load_runs(args.runs)
    text = summary_markdown(runs, [tuple(p) for p in args.pair], order=list(designs()))
    print(text, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "seeds.md").write_text(text)
        seed_figure(args.out / "seeds.png", runs, order=list(designs()))
        print(f"wrote {args.out / 'seeds.md'} and {args.out / 'seeds.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
