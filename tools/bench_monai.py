#!/usr/bin/env python
"""Our sliding-window segmentation against the MONAI peer (h2g.export.monai_peer: MONAI's
sliding_window_inference over monai.data.WSIReader with an ONNX Runtime predictor), on one
slide and one exported model, measured in one run: windows/s of each and the ratio.

    python tools/bench_monai.py --slide S --model M.onnx [--stride N] [--blend centre|tent]
        [--batch-size 8] [--readers 2] [--repeats 3] [--chunk 16] [--backend openslide|tifffile]
        [--device CPU|GPU] [--provider auto|tensorrt|cuda] [--threads N] [--torch-threads 1]
        [--json OUT.json] [--markdown OUT.md]

The model needs views in its metadata (DMMN, m-UNet: export/convert.py writes them).  Both
sides detect tissue in each run (the same detector), run the same windows with the same
batch size and model, and build the same probability raster; ours reads ahead in
``--readers`` threads on our ONNX Runtime backend (the ``throughput`` hint on CPU, as
export/benchmark.py), MONAI's reads each chunk, then runs the windows (a plain
InferenceSession).  One warm-up each, then ``--repeats`` rounds alternating the two;
windows/s is over everything after tissue detection.  Needs the ``peers`` extra
(``pip install 'h2g[peers]'``); without it, says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from h2g.core.cli import add_verbose_argument, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    from h2g.export.monai_peer import BACKENDS
    from h2g.inference.backends import DEVICES, PROVIDERS
    from h2g.inference.sliding import BLENDS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="exported .onnx whose metadata names its views")
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--stride", type=int, default=None, help="target-view px between windows (default: its size)")
    p.add_argument("--blend", choices=BLENDS, default="centre")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--readers", type=int, default=2, help="our reader threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=16, help="MONAI: window cells a side per sliding_window_inference "
                                                         "call (0: the whole slide)")
    p.add_argument("--backend", choices=BACKENDS, default="openslide", help="MONAI WSIReader backend")
    p.add_argument("--device", choices=DEVICES, default="CPU")
    p.add_argument("--provider", choices=PROVIDERS, default="auto")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads, both sides (default: all cores)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="MONAI side: PyTorch threads (default 1: ONNX Runtime has the cores; 0: PyTorch's default)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT.md")
    return p.parse_args(argv)


def our_run(slide_path, backend, metadata, args) -> dict:
    """One run of our sliding-window segmentation (tissue detection included)."""
    from h2g.inference.sliding import sliding_segmentation
    from h2g.io.slide import Slide

    timings: dict = {}
    t0 = time.perf_counter()
    with Slide(slide_path, mpp=args.mpp, reader="tiles") as slide:
        sliding_segmentation(slide, backend, metadata.views, target=metadata.view().name, stride=args.stride,
                             blend=args.blend, batch_size=args.batch_size, readers=args.readers, progress=False,
                             timings=timings)
    timings["total"] = time.perf_counter() - t0
    return timings


def main(argv=None) -> int:
    args = parse_args(argv)
    from h2g.core.errors import ConfigError
    from h2g.core.measure import host, mean_sd, peak_memory_mib
    from h2g.export.monai_peer import MonaiSlidingWindow, monai_available, peer_rows
    from h2g.inference.backends import make_backend

    why = monai_available()
    if why:
        raise ConfigError(why)
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    for path in (args.slide, args.model):
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
    backend = make_backend(args.model, engine="onnxruntime", device=args.device, threads=args.threads,
                           hint="throughput", provider=args.provider)
    metadata = backend.metadata
    peer = MonaiSlidingWindow(args.slide, args.model, metadata=metadata, stride=args.stride, blend=args.blend,
                              batch_size=args.batch_size, chunk=args.chunk, backend=args.backend,
                              device=args.device, provider=args.provider, threads=args.threads, mpp=args.mpp,
                              torch_threads=args.torch_threads or None)
    runs: dict = {"ours": [], "monai": []}
    for k in range(args.repeats + 1):  # round 0: warm-up of each
        order = ("ours", "monai") if k % 2 == 0 else ("monai", "ours")
        for side in order:
            if side == "ours":
                timings = our_run(args.slide, backend, metadata, args)
            else:
                timings = {}
                peer.segment(timings=timings)
            if k:
                runs[side].append(timings)
    if runs["ours"][-1]["windows"] != runs["monai"][-1]["windows"]:
        raise ConfigError(f"the two sides ran {runs['ours'][-1]['windows']} and {runs['monai'][-1]['windows']} "
                          "windows")

    def summary(rs: list[dict], info: dict) -> dict:
        return {**info, "windows": rs[-1]["windows"],
                "stages": {s: mean_sd(r[s] for r in rs) for s in rs[0] if s != "windows"},
                "windows_per_second": mean_sd(r["windows"] / (r["total"] - r["tissue"]) for r in rs), "runs": rs}

    info = backend.info()
    ours = summary(runs["ours"], {"engine": f"h2g sliding window, ONNX Runtime ({info['hint']} hint)",
                                  "version": info["version"], "device": info["device"],
                                  "providers": info["providers"], "readers": args.readers})
    theirs = summary(runs["monai"], peer.info())
    ratio = ours["windows_per_second"]["mean"] / theirs["windows_per_second"]["mean"]
    target = metadata.view()
    result = {"slide": str(args.slide), "model": str(args.model), "system": metadata.system,
              "design": metadata.design, "views": [v.to_dict() for v in metadata.views],
              "stride": peer.stride, "blend": args.blend, "batch_size": args.batch_size, "chunk": args.chunk,
              "repeats": args.repeats, "warmup": 1, "ours": ours, "monai": theirs, "ratio_ours_over_monai": ratio,
              "peak_memory_mib": peak_memory_mib(), "host": host()}
    views = ", ".join(f"{v.name} {v.size} px at {v.magnification:g}x" for v in metadata.views)
    lines = [f"# Sliding-window segmentation: h2g against MONAI ({metadata.system} {metadata.design})", "",
             f"Slide `{args.slide}`, views {views} (target {target.name}), stride {peer.stride}, blend "
             f"{args.blend}, batch {args.batch_size}; MONAI chunks of {args.chunk or 'all'} cells; "
             f"{args.repeats} rounds after a warm-up, alternating; mean ± sd.", "",
             *peer_rows(ours, theirs), "",
             f"- ours / MONAI windows/s, measured in this run: **{ratio:.2f}x**",
             f"- ours: reading {ours['stages']['reading']['mean']:.2f} s busy (summed over {args.readers} readers), "
             f"inference {ours['stages']['inference']['mean']:.2f} s; MONAI: reading "
             f"{theirs['stages']['reading']['mean']:.2f} s, inference {theirs['stages']['inference']['mean']:.2f} s "
             f"inside sliding_window_inference {theirs['stages']['sliding_window']['mean']:.2f} s",
             f"- providers: ours {ours['providers']}, MONAI's {theirs['providers']}",
             f"- peak resident memory: {result['peak_memory_mib']:.0f} MiB", ""]
    markdown = "\n".join(lines)
    print(markdown)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
