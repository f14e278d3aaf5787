"""Cohort inference: every slide of a manifest or a folder segmented with exported models,
one task per slide (on Ray or a local process pool, see :mod:`h2g.export.executors`).

The per-slide work is :func:`segment_one`, exactly what export/segment_slide.py does for
one slide: the :class:`~h2g.export.deploy.Deployment`'s segmenter (the system the models'
metadata names, :func:`h2g.systems.registry.load_segmenter`) segments it and writes its
outputs.  :func:`run_cohort` drives a cohort:

- Outputs of slide ``ID`` go to ``DIR/ID/``.  They are written into a hidden
  ``DIR/.ID.tmp-<pid>-<random>/`` folder, ``done.json`` last, and the folder is then
  renamed to ``DIR/ID`` in one step, so ``DIR/ID/done.json`` exists exactly when the
  slide's outputs are complete.  A resumed run skips those slides (they keep their files
  untouched); temporary folders an interrupted run left behind are removed.
- ``DIR/cohort.json`` records the models (file names and SHA-256), the engine and the
  segmenter's resolved settings; resuming into a folder made with other models or
  settings is refused rather than mixing two cohorts' outputs.
- A slide whose task fails (bad file, worker crash, out of memory) is retried once, then
  recorded as ``failed`` with its error; the other slides go on.
- ``DIR/cohort.csv`` (:data:`COLUMNS`, one row per slide, rewritten atomically after each
  slide) holds: ``status`` (``done``, ``skipped`` = complete from an earlier run, with the
  figures that run recorded, or ``failed``), ``attempts``, ``seconds`` (the slide's wall
  time in its worker: loading the models, segmenting, writing; for a failure, until it),
  ``patches`` (patches for H2G-Net, windows for sliding-window models, regions for
  RAZN), ``tumour_mm2``, ``mpp`` and ``mpp_source`` (the scale the slide was read at and
  where it came from: ``metadata``, ``objective power``, ``override`` (a manifest's
  ``mpp`` or ``--force-mpp``) or ``fallback`` (``--mpp``, for a slide without a scale)),
  ``peak_memory_mb``, ``warning`` and ``error``.
- ``tumour_mm2``: the segmenter's tumour area (H2G-Net's mask spans the slide's extent
  at S x S; a raster pixel is ``(downsample x mpp)^2``; for multi-class models the class
  the metadata names like tumour, :data:`h2g.io.classes.TUMOUR_NAMES`); empty when no
  class is.
- ``peak_memory_mb``: the worker process's peak resident memory during the slide's task
  (:func:`h2g.core.measure.peak_memory_mb`).  Workers are reused from slide to slide, so
  each task first resets the process's high-water mark
  (:func:`h2g.core.measure.reset_peak_memory`, Linux): the figure is
  that slide's peak (model loading, segmentation, writing).  Where the OS does not allow
  the reset it is the worker's peak so far.

One run per folder: :func:`run_cohort` holds ``DIR/.cohort.lock`` (:class:`h2g.core.lock.RunLock`)
while it runs.  On Ctrl-C it stops the workers, records every slide whose folder is complete
and re-raises (:func:`_interrupted`; the CLI exits with 130).  Each task also returns the
worker's ``pid`` and resident memory after the slide (``rss_mb``; tools/bench_memory.py),
after handing freed memory back to the system (:func:`release_free_memory`).

A slide without tissue is ``done`` with a ``warning`` ("no tissue found ..."), not
``failed``: the pipeline ran correctly and wrote its (empty) outputs, the slide needs a
person to look at it (an empty or mis-scanned glass, a wrong file), and re-running it
would give the same result, so it must not be retried on every resume.  The printed
summary names these slides next to the failed ones.
"""
from __future__ import annotations

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

from h2g.core.atomic import write_json, write_text
from h2g.core.errors import ConfigError
from h2g.core.lock import RunLock
from h2g.core.measure import peak_memory_mb, reset_peak_memory, resident_memory_mb

log = logging.getLogger(__name__)

COLUMNS = ("slide_id", "path", "status", "attempts", "seconds", "patches", "tumour_mm2", "mpp", "mpp_source",
           "peak_memory_mb", "warning", "error")
DONE_MARKER = "done.json"
TABLE_NAME = "cohort.csv"
SETTINGS_NAME = "cohort.json"
LOCK_NAME = ".cohort.lock"  # pid and host of the run using the folder (h2g.core.lock)
TMP_MARK = ".tmp-"


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


# --------------------------------------------------------------------------------------
# One slide
# --------------------------------------------------------------------------------------
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


_SEGMENTERS: dict = {}  # this worker's segmenter, kept from slide to slide


def worker_segmenter(plan):
    """``plan``'s segmenter, built once per worker process and reused for its next
    slides (compiling the networks per slide costs time and memory)."""
    key = repr(plan)
    if key not in _SEGMENTERS:
        _SEGMENTERS.clear()
        _SEGMENTERS[key] = plan.segmenter()
    return _SEGMENTERS[key]


def segment_one(slide_path, out_dir, plan, *, mpp: float | None = None, slide_id: str | None = None) -> dict:
    """Segment ``slide_path`` with ``plan`` (a :class:`~h2g.export.deploy.Deployment`) as
    export/segment_slide.py does, writing its outputs atomically as the folder
    ``out_dir``, ``done.json`` (the returned row) last (see the module doc); ``mpp`` (a
    manifest's) overrides the slide's scale.  The row: slide_id, path, patches (the
    segmenter's count), tumour_mm2, mpp, mpp_source, seconds, peak_memory_mb, warning (no
    tissue, and the package's other warnings)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    handler = _Warnings()
    package = logging.getLogger("h2g")
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.WARNING:
        package.setLevel(logging.WARNING)
    tmp = out_dir.with_name(f".{out_dir.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}")
    try:
        segmenter = worker_segmenter(plan)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with plan.slides.open(slide_path, mpp=mpp) as slide:
            seg = segmenter.segment(slide)
            paths = segmenter.write(seg, slide, tmp)
            area = segmenter.tumour_mm2(seg, slide)
            used_mpp = slide.mpp if slide.has_scale else None
            source = slide.mpp_source
        _retarget_summary(paths["summary"], tmp, out_dir)
        row = {
            "slide_id": slide_id or out_dir.name,
            "path": str(slide_path),
            "patches": int(seg.count),
            "tumour_mm2": None if area is None else round(area, 6),
            "mpp": None if used_mpp is None else round(float(used_mpp), 6),
            "mpp_source": source,
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


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc ``malloc_trim``): a
    worker's resident size then shows what it holds, not what earlier slides freed.
    A no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_task(job: dict) -> dict:
    """The worker's side of one slide: :func:`segment_one` on ``job`` (slide_id, path, mpp,
    out_dir, plan), never raising: a failure is a row with status ``failed``, the error,
    the seconds until it and the peak memory.  The worker's peak memory is reset first
    (:func:`h2g.core.measure.reset_peak_memory`), so the row's is this slide's; after the
    slide the freed memory goes back to the system (:func:`release_free_memory`) and the
    row gets the worker's ``pid`` and resident memory ``rss_mb`` (not columns of
    cohort.csv: tools/bench_memory.py reads them)."""
    reset_peak_memory()
    start = time.perf_counter()
    try:
        row = segment_one(job["path"], job["out_dir"], job["plan"], mpp=job.get("mpp"), slide_id=job["slide_id"])
        row = {**row, "status": "done"}
    except Exception as exc:  # noqa: BLE001  (recorded; the cohort goes on)
        row = {"slide_id": job["slide_id"], "path": str(job["path"]), "status": "failed",
               "error": _one_line(exc), "seconds": round(time.perf_counter() - start, 3),
               "peak_memory_mb": round(peak_memory_mb(), 1)}
    release_free_memory()
    rss = resident_memory_mb()
    return {**row, "pid": os.getpid(), "rss_mb": None if rss is None else round(rss, 1)}


# --------------------------------------------------------------------------------------
# The cohort
# --------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cohort_settings(plan, segmenter) -> dict:
    """What makes the cohort's outputs: the model files (name and SHA-256; an OpenVINO
    ``.xml`` with its ``.bin``), the engine, how slides are opened and the segmenter's
    resolved settings (:meth:`~h2g.inference.segmenter.Segmenter.settings`)."""
    described = []
    for path in plan.files():
        for part in (path, path.with_suffix(".bin")) if path.suffix.lower() == ".xml" else (path,):
            if part.is_file():
                described.append({"file": part.name, "sha256": _file_digest(part)})
    engine = plan.engine.to_dict()
    engine.pop("threads", None)  # threads and the hint change speed, not outputs
    engine.pop("hint", None)
    if engine.get("sub_batch") is None:  # a set sub-batch size may change the rounding: kept
        engine.pop("sub_batch", None)
    return {"models": described, "engine": engine,
            "slides": {"mpp": plan.slides.mpp, "force_mpp": plan.slides.force_mpp, "reader": str(plan.slides.reader)},
            **segmenter.settings()}


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
    return {**{k: done.get(k) for k in ("patches", "tumour_mm2", "mpp", "mpp_source", "seconds", "peak_memory_mb",
                                        "warning")},
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


def run_cohort(slides: list[CohortSlide], out_dir, plan, executor, *, retries: int = 1,
               progress: bool = True) -> list[dict]:
    """Segment ``slides`` into ``out_dir`` with ``plan`` (a
    :class:`~h2g.export.deploy.Deployment`; its segmenter is built here once to check the
    models and record the settings), skipping the complete ones and retrying a failed
    slide ``retries`` times; writes ``cohort.csv`` after each slide and returns the rows
    in ``slides``' order.  ``executor`` (:mod:`h2g.export.executors`: ``submit(job) ->
    key``, ``wait() -> (key, row)``, ``abort()``) or a callable making one, called only once
    the folder's settings are checked and some slide needs to run (a finished cohort starts
    no Ray), then closed at the end.

    The folder is locked for the run (``DIR/.cohort.lock``, :class:`h2g.core.lock.RunLock`:
    a second run on it is refused; a lock left by a process that is gone is cleared).  A
    Ctrl-C (KeyboardInterrupt) stops the workers, records what finished and re-raises
    (:func:`_interrupted`)."""
    import dataclasses

    out_dir = Path(out_dir)
    # bad models fail here, once, not in every slide's task (on this machine's CPU, with one
    # thread: the driver of a GPU cluster may have no GPU)
    check = dataclasses.replace(plan, engine=dataclasses.replace(plan.engine, device="CPU", threads=1))
    settings = cohort_settings(plan, check.segmenter())
    del check
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir / LOCK_NAME, what="cohort run"):
        return _run_locked(slides, out_dir, plan, settings, executor, retries=retries, progress=progress)


def _run_locked(slides: list[CohortSlide], out_dir: Path, plan, settings: dict, executor, *, retries: int,
                progress: bool) -> list[dict]:
    """:func:`run_cohort` once the folder's lock is held."""
    from tqdm import tqdm

    check_settings(out_dir, settings)
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
                                 "out_dir": str(target), "plan": plan}))
    ordered = lambda: [rows[s.slide_id] for s in slides if s.slide_id in rows]
    write_table(table, ordered())
    if not todo:
        return ordered()
    owned = callable(executor) and not hasattr(executor, "submit")
    runner = None
    attempts = {slide.slide_id: 1 for slide, _ in todo}
    try:
        runner = executor() if owned else executor
        jobs = {}  # executor key -> (slide, job)
        for slide, job in todo:
            jobs[runner.submit(job)] = (slide, job)
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
    except KeyboardInterrupt:
        _interrupted(runner, out_dir, [slide for slide, _ in todo], rows, attempts, table, ordered)
        raise
    finally:
        if owned and runner is not None:
            runner.close()
    return ordered()


def _interrupted(runner, out_dir: Path, todo: list[CohortSlide], rows: dict, attempts: dict, table: Path,
                 ordered) -> None:
    """The one interrupt path (Ctrl-C): with further Ctrl-C ignored until it is done, stop
    submitting and stop the workers (:meth:`abort`: cancel, terminate, reap), then record
    in ``cohort.csv`` every slide whose folder is complete (finished by a worker before it
    was stopped, even if its result never reached this process), and remove the
    temporary folders the stopped workers left.  The caller re-raises: exit code 130."""
    from h2g.core.interrupts import interrupts_ignored

    with interrupts_ignored():
        if runner is not None and hasattr(runner, "abort"):
            runner.abort()
        for slide in todo:
            target = out_dir / slide.slide_id
            if slide.slide_id not in rows and is_done(target):
                rows[slide.slide_id] = {**skipped_row(slide, target), "status": "done",
                                        "attempts": attempts.get(slide.slide_id, 1)}
        write_table(table, ordered())
        remove_stale_temporaries(out_dir)
        left = sum(s.slide_id not in rows for s in todo)
        log.warning("interrupted: %d slide(s) recorded in %s, %d not run; the same command resumes", len(rows), table,
                    left)


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
