"""Cohort inference: every slide of a manifest or a folder segmented with exported models,
one task per slide (on Ray or a local process pool, see :mod:`h2g.export.executors`).

The per-slide work is :func:`segment_one`, exactly what export/segment_slide.py does for
one slide (:func:`h2g.export.deploy.deployment_plan`, :func:`~h2g.export.deploy.segment` /
:func:`~h2g.export.deploy.segment_windows`, :func:`~h2g.export.deploy.write_outputs` /
:func:`~h2g.export.deploy.write_raster_outputs`).  :func:`run_cohort` drives a cohort:

- Outputs of slide ``ID`` go to ``DIR/ID/``.  They are written into a hidden
  ``DIR/.ID.tmp-<pid>-<random>/`` folder, ``done.json`` last, and the folder is then
  renamed to ``DIR/ID`` in one step, so ``DIR/ID/done.json`` exists exactly when the
  slide's outputs are complete.  A resumed run skips those slides (they keep their files
  untouched); temporary folders an interrupted run left behind are removed.
- ``DIR/cohort.json`` records the models (file names and SHA-256) and the settings that
  change outputs; resuming into a folder made with other models or settings is refused
  rather than mixing two cohorts' outputs.
- A slide whose task fails (bad file, worker crash, out of memory) is retried once, then
  recorded as ``failed`` with its error; the other slides go on.
- ``DIR/cohort.csv`` (:data:`COLUMNS`, one row per slide, rewritten atomically after each
  slide) holds: ``status`` (``done``, ``skipped`` = complete from an earlier run, with the
  figures that run recorded, or ``failed``), ``attempts``, ``seconds`` (the slide's wall
  time in its worker: loading the models, segmenting, writing; for a failure, until it),
  ``patches`` (patches for H2G-Net, windows for sliding-window models),
  ``tumour_mm2``, ``peak_memory_mb``, ``warning`` and ``error``.
- ``tumour_mm2``: tumour pixels of the output mask times the area of a mask pixel from the
  slide's microns per pixel (H2G-Net's mask spans the slide's extent at S x S; a raster
  pixel is ``(downsample x mpp)^2``).  For multi-class models, the area of the class the
  metadata names like tumour (the names of :data:`h2g.io.classes.TUMOUR_NAMES`); empty
  when no class is.
- ``peak_memory_mb``: the worker process's peak resident memory during the slide's task
  (:func:`peak_memory_mb`).  Workers are reused from slide to slide, so each task first
  resets the process's high-water mark (:func:`reset_peak_memory`, Linux): the figure is
  that slide's peak (model loading, segmentation, writing).  Where the OS does not allow
  the reset it is the worker's peak so far.

A slide without tissue is ``done`` with a ``warning`` ("no tissue found ..."), not
``failed``: the pipeline ran correctly and wrote its (empty) outputs, the slide needs a
person to look at it (an empty or mis-scanned glass, a wrong file), and re-running it
would give the same result, so it must not be retried on every resume.  The printed
summary names these slides next to the failed ones.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2g.core.atomic import write_json, write_text
from h2g.core.errors import ConfigError

log = logging.getLogger(__name__)

COLUMNS = ("slide_id", "path", "status", "attempts", "seconds", "patches", "tumour_mm2", "peak_memory_mb",
           "warning", "error")
DONE_MARKER = "done.json"
TABLE_NAME = "cohort.csv"
SETTINGS_NAME = "cohort.json"
#: Options that change a slide's outputs (recorded in cohort.json with the models' hashes).
OUTPUT_SETTINGS = ("engine", "device", "precision", "mpp", "reader", "magnification", "patch_size", "heatmap_stride",
                   "size", "stride", "keep", "blend")
TMP_MARK = ".tmp-"
#: The options every slide's task gets (those of add_pipeline_arguments and the sliding window).
TASK_OPTIONS = ("patch_model", "refine_model", "engine", "device", "precision", "threads", "patch_hint", "mpp",
                "magnification", "patch_size", "heatmap_stride", "size", "batch_size", "readers", "reader", "stride",
                "keep", "blend")


@dataclass(frozen=True)
class CohortSlide:
    """One slide to segment: its id (the output folder's name), file and mpp override."""

    slide_id: str
    path: Path
    mpp: float | None = None


# --------------------------------------------------------------------------------------
# What to segment
# --------------------------------------------------------------------------------------
def cohort_slides(source, split: str | None = None) -> list[CohortSlide]:
    """The slides of ``source``: a manifest (:func:`h2g.io.manifest.load_manifest`; every
    split, or only ``split``) or a folder (every file with a slide suffix,
    :data:`h2g.io.slide.SLIDE_SUFFIXES`, not hidden, sorted; the id is the file's stem).
    Missing slide files are not an error here: each fails as its own slide."""
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import SLIDE_SUFFIXES

    source = Path(source)
    if source.is_dir():
        if split is not None:
            raise ConfigError(f"{source}: --split applies to a manifest, not a folder")
        files = sorted(p for p in source.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES)
        if not files:
            raise ConfigError(f"{source}: no slide files in the folder (suffixes {', '.join(sorted(SLIDE_SUFFIXES))})")
        stems: dict[str, Path] = {}
        for path in files:
            if path.stem in stems:
                raise ConfigError(f"{source}: {stems[path.stem].name} and {path.name} would share the output "
                                  f"folder {path.stem!r}; use a manifest to give them ids")
            stems[path.stem] = path
        slides = [CohortSlide(path.stem, path) for path in files]
    elif source.is_file():
        manifest = load_manifest(source, check_files=False)
        records = manifest.split(split) if split is not None else list(manifest)
        if not records:
            raise ConfigError(f"{source}: no slides in split {split!r}")
        slides = [CohortSlide(r.slide_id, r.slide_path, r.mpp) for r in records]
    else:
        raise ConfigError(f"{source}: no such manifest or folder")
    for s in slides:
        if s.slide_id in (".", "..") or s.slide_id.startswith(".") or re.search(r"[/\\]", s.slide_id):
            raise ConfigError(f"{source}: slide_id {s.slide_id!r} cannot name an output folder")
    return slides


def task_options(args=None, **overrides) -> dict:
    """The options of :data:`TASK_OPTIONS` from parsed command-line ``args`` (default: the
    defaults of :func:`h2g.export.deploy.add_pipeline_arguments` and
    :func:`~h2g.export.deploy.add_window_arguments`), with ``overrides``; paths as text, so that a job pickles anywhere."""
    if args is None:
        from h2g.export.deploy import add_pipeline_arguments, add_window_arguments

        parser = argparse.ArgumentParser()
        add_pipeline_arguments(parser, models_required=False)
        add_window_arguments(parser)
        args = parser.parse_args([])
    options = {k: getattr(args, k) for k in TASK_OPTIONS}
    options.update(overrides)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}


# --------------------------------------------------------------------------------------
# One slide
# --------------------------------------------------------------------------------------
def mask_area_mm2(mask: np.ndarray, extent: tuple[int, int], mpp: float) -> float:
    """Area in mm^2 of the true pixels of ``mask``, a map stretched over a slide of
    level-0 ``extent`` (w, h) at ``mpp`` microns per pixel."""
    rows, cols = mask.shape
    pixel_um2 = (extent[0] * mpp / cols) * (extent[1] * mpp / rows)
    return float(np.count_nonzero(mask)) * pixel_um2 / 1e6


def raster_tumour_mm2(raster, class_names, mpp: float) -> float | None:
    """Area in mm^2 of the raster pixels whose arg-max is the tumour class (None: no class
    is named like tumour)."""
    from h2g.io.classes import tumour_index_of

    index = tumour_index_of(class_names)
    if index is None:
        return None
    pixel_um2 = (raster.downsample * mpp) ** 2
    return float(np.count_nonzero(raster.class_mask(index))) * pixel_um2 / 1e6


def _slide_mpp(slide) -> float | None:
    from h2g.core.errors import SlideError

    try:
        return slide.mpp
    except SlideError:
        return None


def _publish(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` to ``target``, replacing an older ``target``."""
    if target.exists():
        old = target.with_name(f".{target.name}{TMP_MARK}old-{os.getpid()}-{secrets.token_hex(3)}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _retarget_summary(summary_path: Path, tmp: Path, final: Path) -> None:
    """Make summary.json's file paths name the final folder, not the temporary one."""
    summary = json.loads(summary_path.read_text())
    summary["files"] = {k: str(final / Path(v).relative_to(tmp)) for k, v in summary.get("files", {}).items()}
    write_json(summary_path, summary)


def reset_peak_memory() -> bool:
    """Restart this process's peak-memory count: on Linux, writing ``5`` to
    ``/proc/self/clear_refs`` resets the high-water mark that ``ru_maxrss`` reports to the
    current resident size.  False where that is not possible (other systems, a locked-down
    /proc): ``ru_maxrss`` then keeps the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB since it started or since
    :func:`reset_peak_memory`: Linux's ``VmHWM`` (``/proc/self/status``), the high-water
    mark that ``ru_maxrss`` reports without the part inherited through fork + exec (a
    spawned pool worker's ``ru_maxrss`` starts at its parent's peak); elsewhere
    ``ru_maxrss`` (:func:`h2g.export.benchmark.peak_memory_mib`)."""
    from h2g.export.benchmark import peak_memory_mib

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_memory_mib()


class _Warnings(logging.Handler):
    """Collects the package's warnings while a slide is segmented (they go into its row)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _warnings(seg, messages: list[str]) -> str:
    found = ["no tissue found (empty outputs; check the scan)"] if seg.no_tissue else []
    return "; ".join(found + [m for m in messages if "no tissue found" not in m])


def segment_one(slide_path, out_dir, models, options: dict, *, mpp: float | None = None,
                slide_id: str | None = None) -> dict:
    """Segment ``slide_path`` with ``models`` (exported files; or ``options``'
    ``patch_model`` / ``refine_model``) as export/segment_slide.py does, writing its
    outputs atomically as the folder ``out_dir``, ``done.json`` (the returned row) last
    (see the module doc).  ``options`` holds :func:`h2g.export.deploy.add_pipeline_arguments`'
    settings plus ``stride``, ``keep``, ``blend``; ``mpp`` (a manifest's) overrides
    ``options["mpp"]``.  The row: slide_id, path, kind, patches, tumour_mm2, seconds,
    peak_memory_mb, warning (no tissue, and the package's other warnings)."""
    from h2g.export.deploy import (
        deployment_plan,
        segment,
        segment_windows,
        write_outputs,
        write_raster_outputs,
    )
    from h2g.io.slide import Slide

    start = time.perf_counter()
    out_dir = Path(out_dir)
    handler = _Warnings()
    package = logging.getLogger("h2g")
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.WARNING:
        package.setLevel(logging.WARNING)
    tmp = out_dir.with_name(f".{out_dir.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}")
    try:
        args = argparse.Namespace(**options)  # a copy: the plan fills in sizes from the metadata
        plan = deployment_plan(args, models)
        backends = plan.backends
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with Slide(slide_path, mpp=mpp if mpp is not None else args.mpp, reader=args.reader) as slide:
            slide_mpp = _slide_mpp(slide)
            if plan.kind == "h2g":
                seg = segment(slide, *backends, size=args.size, magnification=args.magnification,
                              patch_size=args.patch_size, heatmap_stride=args.heatmap_stride,
                              batch_size=args.batch_size, readers=args.readers, progress=False)
                paths = write_outputs(seg, slide, tmp, extra={"patch_backend": backends[0].info(),
                                                              "refine_backend": backends[1].info()})
                patches = seg.heatmap.n_patches
                area = mask_area_mm2(seg.mask, slide.dimensions, slide_mpp) if slide_mpp else None
            else:
                seg = segment_windows(slide, backends[0], plan.metadata, stride=args.stride, keep=args.keep,
                                      blend=args.blend, magnification=args.magnification,
                                      patch_size=args.patch_size, batch_size=args.batch_size,
                                      readers=args.readers, progress=False)
                paths = write_raster_outputs(seg, slide, tmp, extra={"backend": backends[0].info()})
                patches = seg.timings.get("windows", 0)
                names = [c["name"] for c in json.loads(paths["summary"].read_text())["classes"]]
                area = raster_tumour_mm2(seg.raster, names, slide_mpp) if slide_mpp else None
        _retarget_summary(paths["summary"], tmp, out_dir)
        row = {
            "slide_id": slide_id or out_dir.name,
            "path": str(slide_path),
            "kind": plan.kind,
            "patches": int(patches),
            "tumour_mm2": None if area is None else round(area, 6),
            "warning": _warnings(seg, handler.messages),
            "seconds": round(time.perf_counter() - start, 3),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }
        write_json(tmp / DONE_MARKER, row)  # last: the folder is complete
        _publish(tmp, out_dir)
    finally:
        package.removeHandler(handler)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return row


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def run_task(job: dict) -> dict:
    """The worker's side of one slide: :func:`segment_one` on ``job`` (slide_id, path, mpp,
    out_dir, models, options), never raising: a failure is a row with status ``failed``,
    the error, the seconds until it and the peak memory.  The worker's peak memory is reset
    first (:func:`reset_peak_memory`), so the row's is this slide's."""
    reset_peak_memory()
    start = time.perf_counter()
    try:
        row = segment_one(job["path"], job["out_dir"], job["models"], job["options"], mpp=job.get("mpp"),
                          slide_id=job["slide_id"])
        return {**row, "status": "done"}
    except Exception as exc:  # noqa: BLE001  (recorded; the cohort goes on)
        return {"slide_id": job["slide_id"], "path": str(job["path"]), "status": "failed",
                "error": _one_line(exc), "seconds": round(time.perf_counter() - start, 3),
                "peak_memory_mb": round(peak_memory_mb(), 1)}


# --------------------------------------------------------------------------------------
# The cohort
# --------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cohort_settings(models, options: dict) -> dict:
    """What makes the cohort's outputs: the model files (name and SHA-256; an OpenVINO
    ``.xml`` with its ``.bin``) and :data:`OUTPUT_SETTINGS`."""
    files = [Path(m) for m in models] + [Path(options[k]) for k in ("patch_model", "refine_model")
                                         if options.get(k)]
    described = []
    for path in files:
        for part in (path, path.with_suffix(".bin")) if path.suffix.lower() == ".xml" else (path,):
            if part.is_file():
                described.append({"file": part.name, "sha256": _file_digest(part)})
    return {"models": described, **{k: options.get(k) for k in OUTPUT_SETTINGS}}


def check_settings(out_dir: Path, settings: dict) -> None:
    """Record ``settings`` in ``DIR/cohort.json``, or refuse (:class:`ConfigError`) when the
    folder holds a cohort made with other models or settings."""
    path = out_dir / SETTINGS_NAME
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if before is not None and before != json.loads(json.dumps(settings, default=str)):
            differ = sorted(k for k in set(before) | set(settings)
                            if before.get(k) != json.loads(json.dumps(settings.get(k), default=str)))
            raise ConfigError(f"{path}: the slides in {out_dir} were segmented with other "
                              f"{', '.join(differ)}; give another --out folder (or remove this one)")
    write_json(path, settings)


def is_done(out_dir: Path) -> bool:
    return (out_dir / DONE_MARKER).is_file()


def skipped_row(slide: CohortSlide, out_dir: Path) -> dict:
    """The row of a slide complete from an earlier run: its recorded figures, ``skipped``."""
    try:
        done = json.loads((out_dir / DONE_MARKER).read_text())
    except (OSError, ValueError):
        done = {}
    return {**{k: done.get(k) for k in ("patches", "tumour_mm2", "seconds", "peak_memory_mb", "warning")},
            "slide_id": slide.slide_id, "path": str(slide.path), "status": "skipped", "attempts": 0}


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary slide folders an interrupted run left in ``out_dir``."""
    stale = [p for p in out_dir.glob(f".*{TMP_MARK}*") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_table(path: Path, rows) -> Path:
    """``cohort.csv``: :data:`COLUMNS`, one row per slide (atomically)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return write_text(path, buffer.getvalue())


def run_cohort(slides: list[CohortSlide], out_dir, models, options: dict, executor, *, retries: int = 1,
               progress: bool = True) -> list[dict]:
    """Segment ``slides`` into ``out_dir``, skipping the complete ones and retrying a failed
    slide ``retries`` times; writes ``cohort.csv`` after each slide and returns the rows
    in ``slides``' order.  ``executor`` (:mod:`h2g.export.executors`: ``submit(job) ->
    key``, ``wait() -> (key, row)``) or a callable making one, called only once the folder's
    settings are checked and some slide needs to run (a finished cohort starts no Ray),
    then closed at the end."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, cohort_settings(models, options))
    stale = remove_stale_temporaries(out_dir)
    if stale:
        log.info("%s: removed %d temporary folder(s) of an interrupted run", out_dir, len(stale))
    table = out_dir / TABLE_NAME
    rows: dict[str, dict] = {}
    todo = []
    for slide in slides:
        target = out_dir / slide.slide_id
        if is_done(target):
            rows[slide.slide_id] = skipped_row(slide, target)
        else:
            todo.append((slide, {"slide_id": slide.slide_id, "path": str(slide.path), "mpp": slide.mpp,
                                 "out_dir": str(target), "models": [str(m) for m in models],
                                 "options": dict(options)}))
    ordered = lambda: [rows[s.slide_id] for s in slides if s.slide_id in rows]
    write_table(table, ordered())
    if not todo:
        return ordered()
    owned = callable(executor) and not hasattr(executor, "submit")
    runner = executor() if owned else executor
    try:
        jobs = {runner.submit(job): (slide, job) for slide, job in todo}  # executor key -> (slide, job)
        attempts = {slide.slide_id: 1 for slide, _ in todo}
        start, patches = time.perf_counter(), 0
        with tqdm(total=len(slides), initial=len(rows), unit="slide", desc="cohort", disable=not progress) as bar:
            while jobs:
                key, row = runner.wait()
                slide, job = jobs.pop(key)
                if row["status"] == "failed" and attempts[slide.slide_id] <= retries:
                    log.info("%s failed (%s); retrying", slide.slide_id, row.get("error"))
                    attempts[slide.slide_id] += 1
                    jobs[runner.submit(job)] = (slide, job)
                    continue
                row["attempts"] = attempts[slide.slide_id]
                rows[slide.slide_id] = row
                patches += int(row.get("patches") or 0)
                failed = sum(r["status"] == "failed" for r in rows.values())
                bar.set_postfix({"patches/s": f"{patches / max(time.perf_counter() - start, 1e-9):.1f}",
                                 "failed": failed}, refresh=False)
                bar.update(1)
                write_table(table, ordered())
    finally:
        if owned:
            runner.close()
    return ordered()


def summary_lines(rows: list[dict], out_dir) -> list[str]:
    """The printed summary: counts, patches and task seconds of the slides run now, the
    failed slides and the warnings (of this run's slides and the skipped ones)."""
    count = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    ran = [r for r in rows if r["status"] == "done"]
    busy = sum(float(r.get("seconds") or 0) for r in ran)
    patches = sum(int(r.get("patches") or 0) for r in ran)
    work = f"; {patches} patches in {busy:.1f} task-seconds" if ran else ""
    head = (f"{len(rows)} slides: {count['done']} done, {count['skipped']} skipped (complete earlier), "
            f"{count['failed']} failed{work}; table {Path(out_dir) / TABLE_NAME}")
    lines = [head]
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"  failed: {r['slide_id']} ({r['path']}): {r.get('error')}")
    for r in rows:
        if r["status"] != "failed" and r.get("warning"):
            lines.append(f"  warning: {r['slide_id']} ({r['path']}): {r['warning']}")
    return lines
