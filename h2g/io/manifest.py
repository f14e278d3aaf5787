"""The slide manifest: one CSV row per slide.

Columns: ``slide_id, slide_path, annotation_path, split`` and, optionally, ``grade``
(histological grade 1..3; the column may be absent or a cell empty: ``grade=None``) and
``mpp`` (microns per level-0 pixel, for slides whose metadata lacks it).  Paths are
relative to the manifest's folder (absolute paths are kept as they are);
``annotation_path`` and ``mpp`` may be left empty.  Any other column (``stain``,
``scanner``, ...) is kept, as text, in :attr:`SlideRecord.attributes`, so the
hierarchical sampler can balance on it; an empty cell leaves that attribute out.

The classes of the annotation masks come from the class table beside the manifest,
``<manifest stem>.classes.csv`` (see :mod:`h2g.io.classes`); without one they are the
binary tumour masks of H2G-Net (:data:`h2g.io.classes.BINARY`).

:func:`load_manifest` checks every row and raises one :class:`~h2g.core.errors.ManifestError`
listing every problem it found, each as ``(file, row, column, problem)``.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from h2g.core.errors import ConfigError, ManifestError
from h2g.io.classes import BINARY, ClassTable, load_class_table, sidecar_path

REQUIRED_COLUMNS = ("slide_id", "slide_path", "annotation_path", "split")
OPTIONAL_COLUMNS = ("grade", "mpp")
SPLITS = ("train", "val", "test")
GRADES = (1, 2, 3)

DEFAULT_MANIFEST: Path = Path(__file__).resolve().parents[2] / "data_manifest.csv"


@dataclass(frozen=True)
class SlideRecord:
    """One slide of a manifest, with its paths resolved against the manifest's folder;
    ``attributes`` holds the manifest's extra columns (name -> text)."""

    slide_id: str
    slide_path: Path
    annotation_path: Path | None
    grade: int | None
    split: str
    mpp: float | None = None
    attributes: Mapping[str, str] = field(default_factory=dict, hash=False)


class Manifest:
    """The validated rows of a manifest file, in file order, and the ``classes`` of its
    annotation masks."""

    def __init__(self, path, records: list[SlideRecord], classes: ClassTable = BINARY):
        self.path = Path(path)
        self.records = list(records)
        self.classes = classes

    def split(self, name: str) -> list[SlideRecord]:
        """The records of split ``name`` (one of ``train``, ``val``, ``test``)."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def __iter__(self) -> Iterator[SlideRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, {len(self.records)} slides)"


def _resolve(folder: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else folder / path


class _RowChecker:
    """Collects the problems of one manifest file while turning rows into records."""

    def __init__(self, path: Path, check_files: bool):
        self.path = path
        self.folder = path.parent
        self.check_files = check_files
        self.problems: list[tuple[str, int | None, str | None, str]] = []
        self.first_row_of: dict[str, int] = {}

    def problem(self, row: int | None, column: str | None, text: str) -> None:
        self.problems.append((str(self.path), row, column, text))

    def check_header(self, header: list[str]) -> None:
        if not header:
            self.problem(None, None, "empty file: no header row")
        for column in REQUIRED_COLUMNS:
            if header and column not in header:
                self.problem(None, column, "missing column")

    def record(self, row_number: int, row: dict) -> SlideRecord | None:
        """The record of ``row``, or ``None`` after noting its problems (columns the
        header lacks are skipped: they are reported once, as missing)."""
        before = len(self.problems)
        if None in row:  # more fields than the header names
            self.problem(row_number, None, f"{len(row[None])} field(s) beyond the header")
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        complete = all(c in values for c in REQUIRED_COLUMNS)
        slide_id = self._slide_id(row_number, values["slide_id"]) if "slide_id" in values else ""
        slide_path = annotation = None
        if "slide_path" in values:
            slide_path = self._path(row_number, "slide_path", values["slide_path"], required=True)
        if "annotation_path" in values:
            annotation = self._path(row_number, "annotation_path", values["annotation_path"],
                                    required=False)
        grade = self._grade(row_number, values.get("grade", ""))
        split = self._split(row_number, values["split"]) if "split" in values else ""
        mpp = self._mpp(row_number, values.get("mpp", ""))
        known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
        attributes = {k: v for k, v in values.items() if k and k not in known and v}
        if len(self.problems) > before or not complete:
            return None
        return SlideRecord(slide_id, slide_path, annotation, grade, split, mpp, attributes)

    def _slide_id(self, row: int, value: str) -> str:
        if not value:
            self.problem(row, "slide_id", "empty slide_id")
        elif value in self.first_row_of:
            self.problem(row, "slide_id",
                         f"duplicate slide_id {value!r} (first on row {self.first_row_of[value]})")
        else:
            self.first_row_of[value] = row
        return value

    def _path(self, row: int, column: str, value: str, required: bool) -> Path | None:
        if not value:
            if required:
                self.problem(row, column, f"empty {column}")
            return None
        path = _resolve(self.folder, value)
        if self.check_files and not path.is_file():
            self.problem(row, column, f"file not found: {path}")
        return path

    def _grade(self, row: int, value: str) -> int | None:
        if not value:
            return None
        try:
            grade = int(value)
        except ValueError:
            grade = None
        if grade not in GRADES:
            self.problem(row, "grade", f"grade {value!r} is not one of 1, 2, 3 (or empty)")
            return None
        return grade

    def _split(self, row: int, value: str) -> str:
        if value not in SPLITS:
            self.problem(row, "split", f"split {value!r} is not one of {', '.join(SPLITS)}")
        return value

    def _mpp(self, row: int, value: str) -> float | None:
        if not value:
            return None
        try:
            mpp = float(value)
        except ValueError:
            mpp = math.nan
        if not (math.isfinite(mpp) and mpp > 0):
            self.problem(row, "mpp", f"mpp {value!r} is not a positive number of microns")
            return None
        return mpp


def load_manifest(path, check_files: bool = True, classes=None) -> Manifest:
    """Read and validate the manifest at ``path``.

    Every row is checked (missing column, empty or duplicate ``slide_id``, grade not in
    1..3, split not in train/val/test, bad ``mpp`` and, unless ``check_files`` is false,
    slide or annotation files that do not exist); all problems are raised together in
    one :class:`~h2g.core.errors.ManifestError`.  ``classes`` (a
    :class:`~h2g.io.classes.ClassTable` or the path of a class table CSV) overrides the
    sidecar ``<stem>.classes.csv``; with neither, the classes are binary."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [(str(path), None, None, "manifest file not found")])
    checker = _RowChecker(path, check_files)
    records: list[SlideRecord] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            checker.check_header(header)
            if header:
                reader.fieldnames = header
                rows = 0
                for rows, row in enumerate(reader, start=1):
                    record = checker.record(rows, row)
                    if record is not None:
                        records.append(record)
                if rows == 0:
                    checker.problem(None, None, "no slides: the manifest has no data rows")
    except (UnicodeDecodeError, csv.Error) as exc:
        checker.problem(None, None, f"not a readable CSV file: {exc}")
    table = BINARY
    try:
        table = _class_table(path, classes)
    except ManifestError as exc:  # reported with the manifest's own problems
        checker.problems.extend(exc.problems)
    if checker.problems:
        raise ManifestError(path, checker.problems)
    return Manifest(path, records, table)


def _class_table(manifest_path: Path, classes) -> ClassTable:
    if isinstance(classes, ClassTable):
        return classes
    if classes is not None:
        return load_class_table(classes)
    sidecar = sidecar_path(manifest_path)
    return load_class_table(sidecar) if sidecar.is_file() else BINARY
