#!/usr/bin/env python
"""Which sub-batch size runs a patch model fastest on this CPU, under the throughput hint
the deployment pipeline gives its main network (``--patch-sub-batch`` of the deployment
tools): inference-only patches/s of each size, and the ratio to the first (1 by default), measured in one run.

    python tools/bench_sub_batch.py MODEL.xml [MODEL_int8.xml ...] [--engine openvino]
                                    [--sizes 1 2 4 8] [--batch 32] [--batches 10] [--rounds 3]
                                    [--precision f32] [--markdown OUT.md]

Each model gets batches of ``--batch`` random patches (the size its metadata or input
shape fixes), split into sub-batches of each size on the engine's streams, as the slide
pipeline feeds it; a latency-hint row (one request on every thread) is added for
comparison.  Sizes run in turn within each round, and the figure is the median over
``--rounds`` of ``--batches`` batches each, after three warm-up batches.  Inference only:
in the slide pipeline, patch reading shares the cores, so the best size there is measured
with ``export/benchmark.py --patch-sub-batch N``.  The best size depends on the CPU and
the precision: on a 2-core AMD EPYC with AVX-512, the full-size MobileNetV2 ran 1.06-1.07x
faster at 2-4 than at 1 in bf16, and within 3 % at every size in int8.  Sizes are
interleaved within each round, so that no size always runs first: measured one after the
other, the first size measured came out 20 % slower on this machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from h2g.core.cli import add_verbose_argument, run_cli
from h2g.core.errors import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="patch models (.xml or .onnx)")
    p.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    p.add_argument("--precision", default=None, help="OpenVINO inference precision (default: the engine's choice)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="sub-batch sizes (default 1 2 4 8)")
    p.add_argument("--batch", type=int, default=32, help="patches per batch (the pipeline's default, 32)")
    p.add_argument("--batches", type=int, default=10, help="batches per round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    p.add_argument("--size", type=int, default=None, help="patch size for a model whose input size is not fixed")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    add_verbose_argument(p)
    args = p.parse_args(argv)
    for name in ("batch", "batches", "rounds"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(s < 1 or s > args.batch for s in args.sizes):
        raise ConfigError(f"--sizes must be from 1 to --batch ({args.batch}), got {args.sizes}")
    for model in args.models:
        if not model.is_file():
            raise ConfigError(f"{model}: model file not found")
    if args.markdown is not None and not args.markdown.parent.is_dir():
        raise ConfigError(f"{args.markdown.parent}: output folder does not exist")
    return args


def _patches_per_second(backend, batch: dict, n_batches: int) -> float:
    start = time.perf_counter()
    for _ in range(n_batches):
        backend.predict(batch)
    return n_batches * len(next(iter(batch.values()))) / (time.perf_counter() - start)


def measure(path: Path, args) -> list[dict]:
    """Rows (setting, patches/s, runs) for one model: every size, then the latency hint."""
    from h2g.inference.backends import make_backend

    settings = [("throughput", s) for s in args.sizes] + [("latency", None)]
    backends = [make_backend(path, engine=args.engine, device="CPU", precision=args.precision,
                             threads=args.threads, hint=h, sub_batch=s) for h, s in settings]
    size = backends[0].image_size or args.size
    if size is None:
        raise ConfigError(f"{path}: the model's input size is not fixed; give --size")
    if len(backends[0].input_names) != 1:
        raise ConfigError(f"{path}: a patch model takes one input, this one takes {list(backends[0].input_names)}")
    rng = np.random.default_rng(0)
    batch = {backends[0].input_names[0]: rng.random((args.batch, size, size, 3), dtype=np.float32)}
    for backend in backends:
        for _ in range(3):
            backend.predict(batch)
    runs: list[list[float]] = [[] for _ in backends]
    for _ in range(args.rounds):
        for i, backend in enumerate(backends):
            runs[i].append(_patches_per_second(backend, batch, args.batches))
    rows = []
    for (hint, sub), backend, values in zip(settings, backends, runs):
        info = backend.info()
        rows.append({"model": path.name, "hint": hint, "sub_batch": sub, "streams": info.get("streams"),
                     "precision": info.get("precision"), "patches_per_s": float(np.median(values)),
                     "runs": [round(v, 1) for v in values]})
    base = rows[0]["patches_per_s"]
    for row in rows:
        row["ratio"] = row["patches_per_s"] / base
    return rows


def markdown(rows: list[dict], args) -> str:
    from h2g.core.numerics import numerics_host

    host = numerics_host()
    lines = [f"Sub-batch sizes on {host.get('cpu', 'this CPU')} ({', '.join(host.get('isa', []))}; "
             f"{host.get('cpus', '?')} cores), engine "
             f"{args.engine}; batches of {args.batch}, median of {args.rounds} rounds of {args.batches} batches; "
             f"ratio to sub-batch {args.sizes[0]} (the first size) of the same model, measured in this run.", "",
             "| Model | Hint | Sub-batch | Streams | Precision | Patches/s | Ratio | Runs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['hint']} | {r['sub_batch'] or '-'} | {r['streams']} | {r['precision']} | "
                     f"{r['patches_per_s']:.1f} | {r['ratio']:.2f}x | {', '.join(f'{v:.0f}' for v in r['runs'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for path in args.models:
        rows += measure(path, args)
    text = markdown(rows, args)
    print(text, end="")
    if args.markdown is not None:
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
