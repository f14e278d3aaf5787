#!/usr/bin/env python
"""Parameter counts of every architecture at full size against the paper's figures.

    python tools/model_summary.py            # a table
    python tools/model_summary.py --json     # {"unet": {"params": N, "paper_params": P}, ...}
    python tools/model_summary.py unet agunet
    python tools/model_summary.py mobilenetv2 unet --save models/untrained   # .keras files
    python tools/model_summary.py mobilenetv2 unet dmmn_m3 --tiny --save /tmp/tiny   # small stand-ins

Models are built with their default (full-size, paper) settings and never run, so no
1024x1024 forward pass happens; without ``--save`` their weights are not even
initialised (only their shapes are counted).  ``paper_params`` is null where the paper gives no
figure (UNet-LR).  ``--save DIR`` also writes each model, randomly initialised with
``--seed``, as ``DIR/<name>.keras`` (single-output for deeply supervised nets): full-size
stand-ins for the runtime benchmark (``export/convert.py DIR`` then
``export/benchmark.py``), whose timings do not depend on the weights.  They are
untrained: never use them for segmentation.  Where deployment needs to know a model's
views (DMMN, m-UNet, RAZN), a ``<stem>.meta.json`` sidecar with the paper's settings is
written beside it (:func:`deployment_metadata`), so ``export/convert.py DIR`` gives
deployable models: ``munet.onnx``; RAZN's ``razn_policy``, ``razn_coarse`` and
``razn_fine`` (``razn_policy resnet18_fcn --save DIR``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError
from h2g.data.views import View

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads (in main)

#: The paper's arguments for builders that have no default for them: RAZN's FCN segments
#: BACH's four classes (normal, benign, in situ, invasive).
PAPER_ARGUMENTS = {"resnet18_fcn": {"n_classes": 4}}


#: --tiny: small stand-ins of the same architectures (same file names), for checking a
#: deployment pipeline end to end in seconds (tools/gpu_table3.sh --cpu-check)
TINY = {"mobilenetv2": {"input_size": 64, "alpha": 0.35}, "unet": {"input_size": 256, "width": 1 / 16},
        "dsmn_s2": {"input_size": 64, "width": 0.125}, "dmmn_ms": {"input_size": 64, "width": 0.125},
        "dmmn_m2s": {"input_size": 64, "width": 0.125}, "dmmn_m3": {"input_size": 64, "width": 0.125},
        "munet": {"input_size": 128, "encoder": "b0", "decoder_width": 0.125},
        "razn_policy": {"input_size": 64, "width": 0.125}, "resnet18_fcn": {"input_size": 64, "width": 0.125}}


def summary(names, save_dir: Path | None = None, seed: int = 0, tiny: bool = False) -> dict:
    """``{name: {"params": N, "paper_params": P or None}}`` for each name; with
    ``save_dir``, each model (seeded random weights, inference outputs only) is saved
    there as ``<name>.keras`` and its row gets ``"saved": path``."""
    import keras

    from h2g import models

    out = {}
    for name in names:
        keras.utils.set_random_seed(seed)
        # counting only: shapes, no weights initialised (the whole table: 31.1 s -> 16.5 s on 2 cores)
        with keras.StatelessScope(initialize_variables=False) if save_dir is None else contextlib.nullcontext():
            model = models.build(name, **PAPER_ARGUMENTS.get(name, {}), **(TINY[name] if tiny else {}))
        out[name] = {"params": int(model.count_params()),
                     "paper_params": None if tiny else models.PAPER_PARAMS.get(name)}  # no paper figure for stand-ins
        if save_dir is not None:
            from h2g.inference.metadata import write_sidecar

            # where deployment must know the views, the files a system deploys (RAZN's
            # coarse and fine FCN are one architecture under two roles), each with its sidecar
            deployable = deployment_metadata(name, model) or {name: None}
            inference = models.inference_model(model)
            for stem, meta in deployable.items():
                path = save_dir / f"{stem}.keras"
                inference.save(path)
                out[name].setdefault("saved", []).append(str(path))
                if meta is not None:  # what export/convert.py embeds
                    out[name].setdefault("sidecars", []).append(str(write_sidecar(path, meta)))
        keras.backend.clear_session()
    return out


def deployment_metadata(name: str, model) -> dict:
    """``{file stem: metadata}``: what deployment needs to know of a full-size stand-in, as
    each system's pipeline writes it for a trained model, with the paper's settings (each
    system's config defaults) and ``untrained: true``.  DMMN's architectures: their views
    (three 256 px views at 20x, 10x and 5x, target x20, stride 256); ``munet``: m-UNet's
    two 512 px views at 10x and 2.5x (the paper's levels 1 and 3), stride 512;
    ``razn_policy``: RAZN's policy (256 px regions at 20x, zoomed x2); ``resnet18_fcn``:
    RAZN's coarse and fine networks (``razn_coarse``, ``razn_fine``: the same architecture,
    the fine one on the zoomed region's four patches).  Empty for the others (H2G-Net's
    models get theirs inferred by convert).  A ``--tiny`` stand-in's views take its own
    input size."""
    from h2g.inference.metadata import ModelMetadata
    from h2g.systems.dmmn.config import DMMNConfig
    from h2g.systems.dmmn.designs import DESIGNS
    from h2g.systems.munet.config import MUNetConfig
    from h2g.systems.munet.pipeline import segmentation_metadata
    from h2g.systems.razn.config import RAZNConfig
    from h2g.systems.razn.pipeline import network_metadata

    size = int(model.inputs[0].shape[1])  # the config's size at full size
    if name == "munet":
        c = MUNetConfig(size=size, stride=size)
        return {name: segmentation_metadata(c, "munet_b4", untrained=True)}
    if name in ("razn_policy", "resnet18_fcn"):
        c = RAZNConfig(size=size)
        roles = ("policy",) if name == "razn_policy" else ("coarse", "fine")
        return {f"razn_{role}": network_metadata(role, c, untrained=True) for role in roles}
    design = next((d for d in DESIGNS.values() if d.architecture == name), None)
    if design is None:
        return {}
    c = DMMNConfig()
    every = {view: View(view, float(m), size) for view, m in zip(("x20", "x10", "x5"), c.magnifications)}
    return {name: ModelMetadata(system="dmmn", design=design.name, role="segmentation",
                                views=tuple(every[v] for v in design.views), output="pixel_probs",
                                extras={"target": "x20", "stride": size, "untrained": True})}


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(parser)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="architectures of h2g.models.ARCHITECTURES (default: all; a wrong name lists them)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="also save each model, untrained, as DIR/<name>.keras (benchmark stand-ins)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the saved models' random weights")
    parser.add_argument("--tiny", action="store_true",
                        help=f"small stand-ins instead of full size ({', '.join(TINY)}), under the same names: "
                             "for checking a pipeline end to end quickly")
    args = parser.parse_args(argv)
    from h2g.models import ARCHITECTURES  # TensorFlow: after --help

    unknown = [name for name in args.names if name not in ARCHITECTURES]
    if unknown:
        raise ConfigError(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}")
    if args.save is not None:
        if args.save.exists() and not args.save.is_dir():
            raise ConfigError(f"--save {args.save} exists and is not a folder")
        args.save.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        missing = [name for name in args.names or list(ARCHITECTURES) if name not in TINY]
        if missing or not args.names:
            raise ConfigError(f"--tiny has stand-ins for {', '.join(TINY)} only; name them "
                              + (f"(not {', '.join(missing)})" if missing and args.names else ""))
    rows = summary(args.names or list(ARCHITECTURES), args.save, args.seed, tiny=args.tiny)
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    for row in rows.values():
        if "saved" in row and not args.json:
            print(f"saved {', '.join(row['saved'])} (untrained: for timing only)"
                  + (f" with the paper's views in {', '.join(row['sidecars'])}" if "sidecars" in row else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=True))
