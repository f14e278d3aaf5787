#!/usr/bin/env python
"""Generate the embedded synthetic cohort (slides, tumour masks, manifest).

    python tools/make_cohort.py                       # smoke preset into the repository
    python tools/make_cohort.py --preset standard     # 12 slides of 30k-36k px a side, cohort/standard/
    python tools/make_cohort.py --preset full         # one ~100k x 100k slide, cohort/full/
    python tools/make_cohort.py --preset tiny --out /tmp/tiny --seed 3
    python tools/make_cohort.py --multistain          # + IHC slides, data_manifest_multistain.csv (m-UNet)

The same seed gives the same files.  See :mod:`h2g.data.cohort` for what the slides contain
(:mod:`h2g.data.lesions`: the tumour mimics; :mod:`h2g.data.artefacts`: stains and artefacts).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError
from h2g.data.cohort import PRESETS, cohort_specs, make_cohort
from h2g.io.manifest import DEFAULT_MANIFEST, load_manifest


def default_out(preset: str) -> Path:
    """The smoke cohort lives beside the committed manifest; the others in cohort/<preset>
    (ignored by git), so that they never overwrite data_manifest.csv."""
    root = DEFAULT_MANIFEST.parent
    return root if preset == "smoke" else root / "cohort" / preset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(parser)
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS),
                        help="cohort size (default: smoke, 24 slides)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for data_manifest.csv and cohort/ (default: the "
                             "repository for smoke, cohort/<preset> otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--multistain", action="store_true",
                        help="also render IHC versions of the layouts and write data_manifest_multistain.csv "
                             "(h2g.data.multistain; the H&E files are unchanged)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    out = args.out if args.out is not None else default_out(args.preset)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    start = time.perf_counter()
    manifest = make_cohort(out, args.preset, args.seed, progress=not args.quiet)
    if args.multistain:
        from h2g.data.multistain import make_multistain

        print(f"wrote {make_multistain(out, args.preset, args.seed, progress=not args.quiet, only_missing=True)}")
    files = [Path(manifest).parent / path for spec in cohort_specs(args.preset) for path in spec.outputs]
    size = sum(f.stat().st_size for f in files if f.is_file())
    print(f"wrote {manifest} in {time.perf_counter() - start:.1f} s ({size / 2**20:.0f} MiB of slides and label maps)")
    if args.preset != "smoke":  # say where the slides are (paths in the manifest are relative to it)
        for row in load_manifest(manifest).records:
            print(f"{row.slide_id}: {row.slide_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
