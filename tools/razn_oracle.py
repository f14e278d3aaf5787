#!/usr/bin/env python
"""RAZN's oracle policy on a finished run: the mIoU of zooming exactly where Scale 2 beats
Scale 1, and where RAZN's own policy zooms.

    python tools/razn_oracle.py runs/razn_seed0               # test slides; writes RUN_DIR/razn_oracle.*
    python tools/razn_oracle.py runs/razn_seed0 --split val --out /tmp/oracle

RUN_DIR is a folder of ``experiments/run.py --system razn`` (at least ``razn_scale1`` and
``razn_scale2`` finished; with ``razn`` too, its policy and networks are measured beside
them).  Per region of the pipeline's grid (h2g.systems.razn.oracle): the oracle takes
Scale 2's prediction where it labels more of the region's annotated pixels correctly than
Scale 1's, else Scale 1's; the same over RAZN's own coarse and fine networks; RAZN's
decisions applied to Scale 1 / Scale 2; per majority class and (embedded cohort) per
mimic lesion: how often the oracle and RAZN zoom and what zooming gains; and, on the
first ``--reward-batches`` training batches, the reward the policy learns from per class,
from the networks' training pass and as inference runs them.

Writes ``OUT/razn_oracle.json``, ``OUT/razn_oracle.md`` (printed too) and
``OUT/razn_oracle.png`` (truth with the mimics outlined, Scale 2's gain per region, the
oracle's and RAZN's zooms); OUT defaults to RUN_DIR.  Bad input: exit code 2, one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, preload_tensorflow_quietly, require_training_stack, run_cli
from h2g.core.errors import ConfigError
from h2g.core.outputs import check_output_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a --system razn run folder, e.g. runs/razn_seed0")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR)")
    p.add_argument("--cohort-seed", type=int, default=0,
                   help="seed the embedded cohort was generated with (lesion kinds per region; default 0)")
    p.add_argument("--reward-batches", type=int, default=40,
                   help="training batches on which to show the policy's reward per class, from the networks' "
                        "training pass and as at inference (0: skip; default 40)")
    add_verbose_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.core.atomic import write_json, write_text
    from h2g.systems.razn import oracle

    oracle.load_run(args.run_dir)  # fast checks before TensorFlow starts
    if args.reward_batches < 0:
        raise ConfigError(f"--reward-batches must be >= 0, got {args.reward_batches}")
    out = args.out if args.out is not None else args.run_dir
    check_output_dir(out)
    require_training_stack("razn_oracle.py")
    if not args.verbose:
        preload_tensorflow_quietly()
    result = oracle.measure(args.run_dir, split=args.split, cohort_seed=args.cohort_seed)
    summary = oracle.summary(result)
    out.mkdir(parents=True, exist_ok=True)
    text = oracle.markdown(summary)
    if args.reward_batches > 0:
        summary["reward_signal"] = oracle.reward_signal(args.run_dir, batches=args.reward_batches)
        text += "\n" + oracle.reward_markdown(summary["reward_signal"])
    write_json(out / "razn_oracle.json", summary)
    write_text(out / "razn_oracle.md", text)
    oracle.figure(out / "razn_oracle.png", result)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
