"""A manifest for a folder of slides and annotations (``tools/make_manifest.py``).

- :func:`pair_files`: slides (any file OpenSlide may read, by suffix) paired with
  annotation files (GeoJSON, XML, PNG / TIFF masks) by stem: ``case01.svs`` with
  ``case01.geojson``, ``case01_mask.tiff``, ``case01.annotations.json``, ... (one of
  :data:`STEM_TAILS` after the slide's stem).  A slide with two candidate annotations is
  ambiguous and refused; slides without an annotation and annotations without a slide
  are listed.
- :func:`assign_splits`: train / val / test by fractions, shuffled by a seed (the same
  seed gives the same splits), stratified by grade when grades are given.
- :func:`build_manifest`: checks every pair as ``tools/inspect_slide.py`` and
  ``tools/inspect_annotation.py`` would (the slide opens and has a scale, the annotation
  reads with the class table; a test slide's may not be empty) and writes the manifest
  CSV (paths relative to its folder) plus its class table sidecar, the files
  ``experiments/run.py --manifest`` reads as they are.  Every problem is listed in one
  :class:`~h2g.core.errors.ManifestError` before anything is written.

TensorFlow-free.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h2g.core.errors import AnnotationError, ConfigError, H2GError, ManifestError
from h2g.io.classes import load_class_table, sidecar_path
from h2g.io.manifest import GRADES, SPLITS, load_manifest

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml", ".png", ".tif", ".tiff")
#: what may follow a slide's stem in its annotation's stem
STEM_TAILS = ("", "_mask", "-mask", ".mask", "_annotation", "_annotations", ".annotations", "_labels", "_label")
HEADER = ("slide_id", "slide_path", "annotation_path", "grade", "split", "mpp")


@dataclass
class Pairing:
    """Slides and annotation files matched by stem."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    slides_without: list[Path] = field(default_factory=list)
    annotations_without: list[Path] = field(default_factory=list)
    ambiguous: list[tuple[Path, list[Path]]] = field(default_factory=list)


def _slide_suffixes() -> frozenset:
    from h2g.io.slide import SLIDE_SUFFIXES

    return SLIDE_SUFFIXES


def pair_files(slides_dir, annotations_dir=None) -> Pairing:
    """Pair the slides of ``slides_dir`` with the annotations of ``annotations_dir``
    (default: the same folder) by stem (see the module doc); files only, not recursive."""
    slides_dir = Path(slides_dir)
    annotations_dir = slides_dir if annotations_dir is None else Path(annotations_dir)
    for folder, what in ((slides_dir, "slides"), (annotations_dir, "annotations")):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such folder of {what}")
    suffixes = _slide_suffixes()
    candidates = sorted(p for p in annotations_dir.iterdir()
                        if p.is_file() and p.suffix.lower() in ANNOTATION_SUFFIXES)
    slides = sorted(p for p in slides_dir.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    out = Pairing()
    used: set[Path] = set()
    by_slide = {}
    for slide in slides:
        found = [a for a in candidates if a != slide and _stem_of(a) in {slide.stem + t for t in STEM_TAILS}]
        by_slide[slide] = found
        used.update(found)
    for slide in slides:
        if slide in used:  # a mask in the slides' folder matched as another slide's annotation
            continue
        found = by_slide[slide]
        if len(found) == 1:
            out.pairs.append((slide, found[0]))
        elif found:
            out.ambiguous.append((slide, found))
        else:
            out.slides_without.append(slide)
    slide_set = set(slides)
    out.annotations_without = [a for a in candidates if a not in used and a not in slide_set]
    return out


def _stem_of(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def parse_split(text: str) -> tuple[float, float, float]:
    """``"70/15/15"`` -> fractions of train, val and test (summing to 1)."""
    try:
        parts = [float(v) for v in str(text).split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(v < 0 for v in parts) or sum(parts) <= 0:
        raise ConfigError(f"--split {text!r}: give three non-negative numbers TRAIN/VAL/TEST, e.g. 70/15/15")
    total = sum(parts)
    return tuple(v / total for v in parts)


def _counts(n: int, fractions) -> list[int]:
    """``n`` split by ``fractions`` (largest remainders; ties to the earlier split)."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def assign_splits(ids: list[str], fractions, seed: int = 0, grades: dict | None = None) -> dict[str, str]:
    """``{id: split}``: ids (sorted) shuffled by ``seed`` and cut by ``fractions``
    (train, val, test).  With ``grades``, each grade gets its share of every split
    (rounded down) and the remainders go where they are largest (ties broken by the
    seed) so that the split sizes are those of the whole cohort."""
    rng = np.random.default_rng(seed)
    strata: dict = {}
    for slide_id in sorted(ids):
        strata.setdefault((grades or {}).get(slide_id), []).append(slide_id)
    keys = sorted(strata, key=lambda g: (g is None, g))
    members = {k: [strata[k][i] for i in rng.permutation(len(strata[k]))] for k in keys}
    quota = np.array([[len(members[k]) * f for f in fractions] for k in keys])
    counts = np.floor(quota + 1e-9).astype(int)
    left = {k: len(members[k]) - counts[i].sum() for i, k in enumerate(keys)}
    deficit = np.array(_counts(len(ids), fractions)) - counts.sum(axis=0)
    pairs = [(i, j) for i in range(len(keys)) for j in range(len(fractions))]
    tiebreak = rng.random(len(pairs))
    pairs = [pairs[n] for n in sorted(range(len(pairs)),
                                      key=lambda n: (-(quota[pairs[n]] - counts[pairs[n]]), tiebreak[n]))]
    for i, j in pairs:  # largest remainders first (every pair is listed, so all is placed)
        if left[keys[i]] > 0 and deficit[j] > 0:
            counts[i, j] += 1
            left[keys[i]] -= 1
            deficit[j] -= 1
    out = {}
    for i, k in enumerate(keys):
        start = 0
        for split, count in zip(SPLITS, counts[i]):
            out.update({m: split for m in members[k][start:start + count]})
            start += count
    return out


def read_grades(path) -> dict[str, int]:
    """``{slide_id: grade}`` from a CSV with ``slide_id`` and ``grade`` columns."""
    path = Path(path)
    problems, grades = [], {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            for column in ("slide_id", "grade"):
                if column not in header:
                    problems.append((str(path), None, column, "missing column"))
            if not problems:
                for number, row in enumerate(reader, start=1):
                    value = (row.get("grade") or "").strip()
                    if not value:
                        continue
                    if value not in {str(g) for g in GRADES}:
                        problems.append((str(path), number, "grade", f"grade {value!r} is not one of 1, 2, 3"))
                        continue
                    grades[(row.get("slide_id") or "").strip()] = int(value)
    except OSError as exc:
        problems.append((str(path), None, None, f"cannot read: {exc.strerror or exc}"))
    if problems:
        raise ManifestError(path, problems)
    return grades


@dataclass
class BuildReport:
    """What :func:`build_manifest` found and wrote."""

    manifest: Path
    pairing: Pairing
    splits: dict[str, str]
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (file, warning)
    fallback_mpp: list[str] = field(default_factory=list)  # slide ids given the --mpp fallback


def build_manifest(slides_dir, out, *, annotations_dir=None, classes=None, split="70/15/15", seed: int = 0,
                   grades=None, mpp: float | None = None, annotation_downsample: float = 4.0) -> BuildReport:
    """Pair, check and write a manifest at ``out`` (see the module doc).  ``classes``: a
    class table CSV (copied beside the manifest as its sidecar); ``grades``: a CSV of
    ``slide_id, grade``; ``mpp``: microns per pixel for slides whose metadata has none
    (a fallback only: slides with a scale keep theirs)."""
    from h2g.io.annotation import load_annotation
    from h2g.io.slide import Slide

    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out}: a manifest is a .csv file")
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"--out {out}: not a file in an existing folder")
    fractions = parse_split(split)
    table = load_class_table(classes) if classes is not None else None
    grade_of = read_grades(grades) if grades is not None else {}
    pairing = pair_files(slides_dir, annotations_dir)
    problems = [(str(s), None, "annotation_path", f"several annotations match: {', '.join(a.name for a in found)}")
                for s, found in pairing.ambiguous]
    if not pairing.pairs and not problems:
        raise ConfigError(f"{slides_dir}: no slide has an annotation with the same stem "
                          f"({', '.join(ANNOTATION_SUFFIXES)}) in {annotations_dir or slides_dir}")
    ids = {}
    for slide, annotation in pairing.pairs:
        if slide.stem in ids:
            problems.append((str(slide), None, "slide_id", f"slide id {slide.stem!r} repeats ({ids[slide.stem]})"))
        ids[slide.stem] = slide
    splits = assign_splits(list(ids), fractions, seed, grade_of)
    report = BuildReport(out, pairing, splits)
    rows = []
    for number, (slide_path, annotation_path) in enumerate(pairing.pairs, start=1):
        slide_id = slide_path.stem
        row_mpp = None
        try:
            with Slide(slide_path, mpp=None) as slide:
                if not slide.has_scale:
                    if mpp is None:
                        raise H2GError("no microns-per-pixel or objective power in the metadata: give --mpp")
                    row_mpp = mpp
                    report.fallback_mpp.append(slide_id)
            with Slide(slide_path, mpp=row_mpp) as slide:
                annotation = load_annotation(annotation_path, slide, downsample=annotation_downsample,
                                             classes=table, required=splits.get(slide_id) == "test")
                report.warnings.extend((str(annotation_path), w) for w in annotation.warnings)
                if annotation.empty:
                    report.warnings.append((str(annotation_path), "no annotated polygon (an unannotated slide)"))
        except AnnotationError as exc:
            problems.append((str(out), number, "annotation_path", str(exc)))
            continue
        except H2GError as exc:
            problems.append((str(out), number, "slide_path", f"{slide_path}: {exc}" if str(slide_path) not in str(exc)
                             else str(exc)))
            continue
        rows.append((slide_id, _relative(slide_path, out.parent), _relative(annotation_path, out.parent),
                     grade_of.get(slide_id, ""), splits[slide_id], "" if row_mpp is None else f"{row_mpp:g}"))
    if problems:
        raise ManifestError(out, problems)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    from h2g.core.atomic import write_text

    write_text(out, text.getvalue())
    if classes is not None and Path(classes).resolve() != sidecar_path(out).resolve():
        shutil.copyfile(classes, sidecar_path(out))
    load_manifest(out)  # what experiments/run.py --manifest checks first
    return report


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(folder).resolve())
    except ValueError:  # another drive
        return str(Path(path).resolve())
