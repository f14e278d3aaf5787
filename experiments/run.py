"""Run designs of any system end to end.

    python experiments/run.py --design mob_pw_unet            # smoke preset, embedded cohort
    python experiments/run.py --system h2g                    # every H2G-Net design
    python experiments/run.py --design all --preset paper --manifest my_slides.csv --out runs/paper
    python experiments/run.py --design mob_pw_unet --set refine.epochs=5 --set seed=3
    python experiments/run.py --system razn --seeds 0 1 2       # each seed in OUT/seed<S>/; seeds.md, claims.md
    python experiments/run.py --design mob_pw --strategy mirrored            # all local GPUs
    TF_CONFIG=... python experiments/run.py --design mob_pw --strategy multiworker   # one per host

Every stage a design needs runs, stage outputs whose declared inputs did not change are
reused, and ``OUT/NAME/metrics.json`` and ``config.json`` plus tables and figures are
written; with several designs, ``OUT/tables.md`` compares them.  With ``--seeds`` each seed
runs into ``OUT/seed<S>/`` (one stage cache for all), then ``OUT/seeds.md`` gives every
design's metrics as mean ± sd over the seeds and ``OUT/claims.md`` / ``claims.json`` the
papers' claims between the chosen designs, tested over seeds and slides
(:mod:`h2g.evaluation.claims`); they are rewritten after every seed (marked partial until
the last), so a stopped run keeps what it measured.  A bad manifest exits with code 2 and lists every bad row
before any work starts.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli, start_tensorflow
from h2g.core.config import PRESET_NAMES
from h2g.core.outputs import check_output_dir
from h2g.io.manifest import DEFAULT_MANIFEST
from h2g.systems import registry


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", nargs="+", default=[], choices=[*registry.designs(), "all"], metavar="NAME",
                   help=f"design name(s) or 'all': {', '.join(registry.designs())}")
    p.add_argument("--system", choices=list(registry.systems()), help="run every design of one system")
    p.add_argument("--preset", default="smoke", choices=sorted(PRESET_NAMES))
    p.add_argument("--manifest", type=Path, default=None,
                   help="slide manifest CSV (default: the embedded cohort, generated on first use: "
                        "data_manifest.csv for H2G-Net, data_manifest_multiclass.csv for DMMN)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default: runs/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="run every chosen design once per seed (OUT/seed<S>/) and test the papers' claims over them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value, e.g. refine.epochs=5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue interrupted training stages")
    p.add_argument("--strategy", default="none", choices=["none", "mirrored", "multiworker"],
                   help="tf.distribute strategy for training: mirrored (all local GPUs, or --replicas logical "
                        "CPUs), multiworker (from TF_CONFIG; the chief writes OUT, the others OUT/_workers/)")
    p.add_argument("--replicas", type=int, default=None,
                   help="mirrored: how many devices (default: every GPU, or 2 logical CPUs without one)")
    add_verbose_argument(p)
    args = p.parse_args(argv)
    if not args.design and not args.system:
        p.error("give --design NAME [NAME ...] (or 'all') or --system NAME")
    if args.seeds is not None and "--seed" in (argv or sys.argv[1:]):
        p.error("give --seed or --seeds, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out)
    start_tensorflow(args.verbose)  # after the arguments and --out are checked: a wrong one fails at once
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from h2g.io.manifest import load_manifest

    from h2g.training import distribute

    chosen = registry.resolve(args.design, system=args.system)
    config = registry.load_config(args.preset, seed=args.seed).override(args.overrides)
    strategy = distribute.make_strategy(args.strategy, args.replicas)  # before anything runs on TensorFlow
    manifests = ({registry.systems()[d.system].manifest for d in chosen} if args.manifest is None
                 else {args.manifest})
    from h2g.data.embedded import ensure_cohort

    if args.manifest is None or args.manifest.resolve() == DEFAULT_MANIFEST.resolve():
        for manifest in sorted(manifests | {DEFAULT_MANIFEST}):  # the embedded cohort: generated once
            ensure_cohort(manifest, seed=0)
    else:  # the embedded cohort's other manifests (data_manifest_geojson.csv, ...) generate their files too
        ensure_cohort(args.manifest, seed=0)
    for manifest in sorted(manifests):
        load_manifest(manifest)  # every bad row, before any work starts
    out = distribute.worker_folder(args.out, strategy)
    if args.seeds is not None:
        from h2g.evaluation.claims import claims_markdown

        _, claims = registry.run_seeds(chosen, args.manifest, out, config, args.seeds, resume=args.resume,
                                       strategy=strategy)
        print(f"\nthe papers' claims over seeds {' '.join(map(str, args.seeds))}:\n")
        print(claims_markdown(claims, {d.name: d.label for d in chosen}))
        print(f"results in {out.resolve()} (seeds.md, claims.md, seed<S>/)")
        return 0
    results = registry.run(chosen, args.manifest, out, config, resume=args.resume, strategy=strategy)
    print(f"\n{'design':<20} {'system':<8} {'recall':>8} {'precision':>10} {'dice':>14}  (binary tumour, test slides)")
    for m in results.values():
        print(f"{m['label'] + (' COLLAPSED' if m.get('collapsed') else ''):<20} {m['system']:<8} "
              f"{m['recall_mean']:>8.3f} {m['precision_mean']:>10.3f} "
              f"{m['dice_mean']:>7.3f} ± {m['dice_sd']:.3f}")
    multiclass = [m for m in results.values() if "classes" in m]
    if multiclass:
        names = list(multiclass[0]["classes"])
        print(f"\n{'design':<20} " + " ".join(f"{n[:9]:>9}" for n in names) + f" {'mean IoU':>9}  (per-class IoU, test slides)")
        for m in multiclass:
            ious = [m["classes"].get(n, {}).get("iou", float("nan")) for n in names]
            print(f"{m['label'] + (' COLLAPSED' if m.get('collapsed') else ''):<20} "
                  + " ".join(f"{v:>9.3f}" for v in ious) + f" {m['mean_iou']:>9.3f}")
    for m in results.values():
        if m.get("collapsed"):
            c = m["collapse"]
            print(f"COLLAPSED: {m['label']} predicts {c['dominant']} for {100 * c['share']:.1f} % of the {c['where']} "
                  f"pixels ({100 * c['truth_share']:.1f} % in the truth): not a trained model's figures")
    print(f"\nresults in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
