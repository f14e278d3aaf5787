"""Class tables: what the pixel values of a manifest's annotation masks mean.

A :class:`ClassTable` lists the classes of a cohort in index order; each class has a
name, the pixel value(s) that mark it in the annotation images and a display colour.
An optional ``ignore`` set of pixel values marks unannotated pixels (partial
annotation): they become :data:`IGNORE` (255) in label maps and count for nothing in
patch labels, losses and metrics.

:data:`BINARY`, the default, is H2G-Net's table: class 0 ``non-tumour``, class 1
``tumour``.  Masks read with it follow the historical rule of
:func:`h2g.io.annotation.load_annotation` (channel 0; 0/1 masks: 1 is tumour, other
masks: a value > 127 is tumour), so binary tumour masks behave exactly as before.

Sidecar file
------------
A manifest ``cohort/manifest.csv`` carries its class table in
``cohort/manifest.classes.csv`` (see :func:`sidecar_path`), a CSV with the columns

- ``name``: the class name (unique, case-insensitively);
- ``value``: the pixel value(s) of the class in the masks, integers 0..65535, several
  separated by ``;`` (e.g. ``1;255``);
- ``colour`` (optional): ``#rrggbb``; empty cells get a default palette colour;
- ``aliases`` (optional): other names of the class in polygon annotations (QuPath
  classifications, ASAP groups, Aperio layers), separated by ``;``: e.g.
  ``Tumor;_0;_1;Invasive``.

One row per class, in index order (the first row is class 0).  A row whose name is
``ignore`` is not a class: its values are the unannotated pixel values.  Every problem
(file, row, column, problem) is raised together in one
:class:`~h2g.core.errors.ManifestError`.

The tumour class (:attr:`ClassTable.tumour_index`) is the class named ``tumour``,
``tumor``, ``invasive``, ``invasive tumour``/``tumor``, ``carcinoma``, ``invasive
carcinoma`` or ``cancer`` (case, ``_`` and ``-`` do not matter); H2G-Net's binary tumour
mask of a multi-class annotation is that class.

Names in polygon annotations are matched by :meth:`ClassTable.lookup`: a class's name or
one of its aliases, ignoring case, spaces, ``-`` and ``_`` (:func:`name_key`); the
tumour class also answers to every tumour name above.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h2g.core.errors import ConfigError, ManifestError

IGNORE = 255  # label-map value of unannotated (ignored) pixels
MAX_CLASSES = 127  # patch labels are int8 (-1 = unlabelled)
MAX_VALUE = 65535  # pixel values are at most 16-bit
IGNORE_NAME = "ignore"
TUMOUR_NAMES = frozenset({
    "tumour", "tumor", "invasive", "invasive tumour", "invasive tumor", "carcinoma",
    "invasive carcinoma", "cancer",
})
# Names that label patch-grid counts (h2g.tiling.grid), so no class may use them.
RESERVED_NAMES = frozenset({"discarded", "background"})
SIDECAR_SUFFIX = ".classes.csv"
PALETTE = ("#c8c8c8", "#c80000", "#0064c8", "#00a050", "#e6a000", "#8c3cb4", "#00b4b4",
           "#b45a28", "#ff78b4", "#646464")
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class ClassEntry:
    """One class: its ``index`` (the label), ``name``, pixel ``values`` in the masks and
    display ``colour`` (``#rrggbb``)."""

    index: int
    name: str
    values: tuple[int, ...]
    colour: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassTable:
    """The classes of a cohort, in index order, and the ``ignore`` pixel values.

    Build one with :meth:`of`, :func:`load_class_table` or :meth:`from_dict`; the
    constructor checks the entries (:class:`ConfigError` listing every problem)."""

    entries: tuple[ClassEntry, ...]
    ignore: tuple[int, ...] = ()
    #: the CSV file the table was read from, for messages (not part of equality)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "ignore", tuple(int(v) for v in self.ignore))
        problems = _table_problems(self.entries, self.ignore)
        if problems:
            raise ConfigError("bad class table: " + "; ".join(problems))

    @classmethod
    def of(cls, classes: Sequence[tuple], ignore: Iterable[int] = (), source=None) -> ClassTable:
        """A table from ``(name, value(s)[, colour[, aliases]])`` tuples in index order."""
        entries = []
        for index, item in enumerate(classes):
            name, values = item[0], item[1]
            colour = item[2] if len(item) > 2 and item[2] else PALETTE[index % len(PALETTE)]
            aliases = tuple(str(a) for a in item[3]) if len(item) > 3 and item[3] else ()
            values = (values,) if isinstance(values, int) else tuple(values)
            entries.append(ClassEntry(index, str(name), tuple(int(v) for v in values), colour, aliases))
        return cls(tuple(entries), tuple(ignore), None if source is None else str(source))

    # -------------------------------------------------------------- views
    @property
    def n_classes(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(e.colour for e in self.entries)

    def metadata_classes(self) -> list[dict]:
        """The classes as a deployed model's metadata lists them: ``{"name", "colour": [r, g, b]}``
        in index order."""
        return [{"name": e.name, "colour": colour_rgb(e.colour)} for e in self.entries]

    @property
    def tumour_index(self) -> int | None:
        """Index of the tumour class (see the module doc), ``None`` if there is none."""
        return tumour_index_of(self.names)

    @property
    def is_binary(self) -> bool:
        """Two classes, the second the tumour class, and no ignore value: the patch grid
        labels such annotations by H2G-Net's tumour-fraction rule."""
        return self.n_classes == 2 and self.tumour_index == 1 and not self.ignore

    def index_of(self, name: str) -> int:
        """The index of the class called ``name`` (case-insensitive)."""
        for entry in self.entries:
            if entry.name.lower() == str(name).lower():
                return entry.index
        raise ConfigError(f"unknown class {name!r}; the class table has {', '.join(self.names)}")

    def lookup(self, name: str) -> int | None:
        """The index of the class that ``name`` (a polygon annotation's class) names: a
        class name or alias, ignoring case, spaces, ``-`` and ``_``; the tumour class also
        answers to every tumour name (:data:`TUMOUR_NAMES`).  ``None`` when none does."""
        key = name_key(name)
        for entry in self.entries:
            if key == name_key(entry.name) or key in {name_key(a) for a in entry.aliases}:
                return entry.index
        tumour = self.tumour_index
        if tumour is not None and key in TUMOUR_KEYS:
            return tumour
        return None

    def describe(self) -> str:
        """The table's names (and aliases), for messages: ``tumour (Tumor, _0), stroma``."""
        return ", ".join(e.name + (f" ({', '.join(e.aliases)})" if e.aliases else "") for e in self.entries)

    def value_map(self) -> dict[int, int]:
        """Pixel value -> label (class index, or :data:`IGNORE` for ignore values)."""
        out = {v: IGNORE for v in self.ignore}
        for entry in self.entries:
            out.update({v: entry.index for v in entry.values})
        return out

    # -------------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for export metadata); :meth:`from_dict` reads it back."""
        return {
            "classes": [{"index": e.index, "name": e.name, "values": list(e.values), "colour": e.colour,
                         **({"aliases": list(e.aliases)} if e.aliases else {})} for e in self.entries],
            "ignore": list(self.ignore),
            "ignore_label": IGNORE,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassTable:
        """The table of a :meth:`to_dict` mapping; :class:`ConfigError` when malformed."""
        try:
            items = sorted(data["classes"], key=lambda c: int(c["index"]))
            entries = tuple(ClassEntry(int(c["index"]), str(c["name"]),
                                       tuple(int(v) for v in c["values"]), str(c["colour"]),
                                       tuple(str(a) for a in c.get("aliases", ())))
                            for c in items)
            ignore = tuple(int(v) for v in data.get("ignore", ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad class table mapping: {exc!r}") from None
        return cls(entries, ignore)


def colour_rgb(colour: str) -> list[int]:
    """``[r, g, b]`` (0..255) of a ``#rrggbb`` class colour."""
    colour = colour.lstrip("#")
    return [int(colour[i:i + 2], 16) for i in (0, 2, 4)]


def tumour_index_of(names: Iterable[str]) -> int | None:
    """Index of the first of ``names`` that names the tumour class (:data:`TUMOUR_NAMES`,
    case, ``_`` and ``-`` ignored), ``None`` if none does."""
    for index, name in enumerate(names):
        if _normal_name(str(name)) in TUMOUR_NAMES:
            return index
    return None


def _normal_name(name: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower()))


def name_key(name: str) -> str:
    """What class names are matched by: lower case, without spaces, ``-`` and ``_``."""
    return re.sub(r"[\s_\-]+", "", str(name).strip().lower())


TUMOUR_KEYS = frozenset(name_key(n) for n in TUMOUR_NAMES)


def _table_problems(entries: Sequence[ClassEntry], ignore: Sequence[int]) -> list[str]:
    problems = []
    if len(entries) < 2:
        problems.append(f"needs at least 2 classes, got {len(entries)}")
    if len(entries) > MAX_CLASSES:
        problems.append(f"at most {MAX_CLASSES} classes, got {len(entries)}")
    seen_names: dict[str, str] = {}
    owner: dict[int, str] = {v: IGNORE_NAME for v in ignore}
    for position, entry in enumerate(entries):
        if entry.index != position:
            problems.append(f"class {entry.name!r} has index {entry.index}, expected {position}")
        key = entry.name.strip().lower()
        if not key:
            problems.append(f"class {position} has an empty name")
        elif key in RESERVED_NAMES or key == IGNORE_NAME:
            problems.append(f"class name {entry.name!r} is reserved")
        elif key in seen_names:
            problems.append(f"duplicate class name {entry.name!r}")
        seen_names[key] = entry.name
        if not entry.values:
            problems.append(f"class {entry.name!r} has no pixel value")
        for value in entry.values:
            if not 0 <= value <= MAX_VALUE:
                problems.append(f"class {entry.name!r}: pixel value {value} outside 0..{MAX_VALUE}")
            elif value in owner:
                problems.append(f"pixel value {value} is used by both {owner[value]!r} and {entry.name!r}")
            owner.setdefault(value, entry.name)
        if not _COLOUR.match(entry.colour):
            problems.append(f"class {entry.name!r}: colour {entry.colour!r} is not #rrggbb")
    problems += [text for _, text in _alias_problems([(e.name, e.aliases) for e in entries])]
    for value in ignore:
        if not 0 <= value <= MAX_VALUE:
            problems.append(f"ignore value {value} outside 0..{MAX_VALUE}")
    tumours = [e.name for e in entries if _normal_name(e.name) in TUMOUR_NAMES]
    if len(tumours) > 1:
        problems.append(f"several classes are named like tumour ({', '.join(tumours)}); keep one")
    return problems


def _alias_problems(named: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, str]]:
    """``(class name, problem)`` for aliases that are empty or name two classes (names and
    aliases compared by :func:`name_key`)."""
    problems, owner = [], {}
    for name, _ in named:
        owner.setdefault(name_key(name), name)
    for name, aliases in named:
        for alias in aliases:
            key = name_key(alias)
            if not key:
                problems.append((name, f"class {name!r}: an empty alias"))
            elif owner.setdefault(key, name) != name:
                problems.append((name, f"class {name!r}: alias {alias!r} already names class {owner[key]!r}"))
    return problems


# H2G-Net's binary tumour masks (read by the historical rule, see the module doc).
BINARY = ClassTable((ClassEntry(0, "non-tumour", (0,), PALETTE[0]),
                     ClassEntry(1, "tumour", (1, 255), PALETTE[1])))


# ------------------------------------------------------------------ sidecar files
def sidecar_path(manifest_path) -> Path:
    """Where the class table of ``manifest_path`` lives: ``<stem>.classes.csv`` beside it."""
    path = Path(manifest_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def load_class_table(path) -> ClassTable:
    """Read and validate the class table CSV at ``path`` (see the module doc)."""
    path = Path(path)
    problems: list[tuple[str, int | None, str | None, str]] = []

    def problem(row, column, text):
        problems.append((str(path), row, column, text))

    if not path.is_file():
        raise ManifestError(path, [(str(path), None, None, "class table file not found")])
    classes: list[tuple[int, str, tuple[int, ...], str, tuple[str, ...]]] = []  # (row, name, values, colour, aliases)
    ignore: list[int] = []
    ignore_row = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in reader.fieldnames or []]
            if not header:
                problem(None, None, "empty file: no header row")
            for column in ("name", "value"):
                if header and column not in header:
                    problem(None, column, "missing column")
            if header:
                reader.fieldnames = header
                for number, row in enumerate(reader, start=1):
                    if None in row:
                        problem(number, None, f"{len(row[None])} field(s) beyond the header")
                    values = {k: (v or "").strip() for k, v in row.items() if k is not None}
                    name = values.get("name", "")
                    pixels = _parse_values(values.get("value", ""), number, problem)
                    colour = values.get("colour", "")
                    aliases = tuple(a.strip() for a in values.get("aliases", "").split(";") if a.strip())
                    if colour and not _COLOUR.match(colour):
                        problem(number, "colour", f"colour {colour!r} is not #rrggbb")
                    if name.lower() == IGNORE_NAME:
                        if ignore_row is not None:
                            problem(number, "name", f"a second ignore row (first on row {ignore_row})")
                        ignore_row = number
                        ignore.extend(pixels)
                    elif not name:
                        problem(number, "name", "empty class name")
                    else:
                        classes.append((number, name, pixels, colour, aliases))
    except (UnicodeDecodeError, csv.Error) as exc:
        problem(None, None, f"not a readable CSV file: {exc}")
    _check_rows(classes, ignore, ignore_row, problem)
    if problems:
        raise ManifestError(path, problems)
    return ClassTable.of([(name, pixels, colour, aliases) for _, name, pixels, colour, aliases in classes],
                         ignore, source=path)


def _parse_values(text: str, row: int, problem) -> tuple[int, ...]:
    if not text:
        problem(row, "value", "empty pixel value")
        return ()
    out = []
    for part in text.split(";"):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            problem(row, "value", f"pixel value {part!r} is not an integer")
            continue
        if not 0 <= value <= MAX_VALUE:
            problem(row, "value", f"pixel value {value} outside 0..{MAX_VALUE}")
            continue
        out.append(value)
    return tuple(out)


def _check_rows(classes, ignore, ignore_row, problem) -> None:
    """Table-wide problems with the row and column they come from."""
    if len(classes) < 2:
        problem(None, None, f"needs at least 2 classes, got {len(classes)}")
    if len(classes) > MAX_CLASSES:
        problem(None, None, f"at most {MAX_CLASSES} classes, got {len(classes)}")
    first_name: dict[str, int] = {}
    first_value: dict[int, tuple[str, int | None]] = {v: (IGNORE_NAME, ignore_row) for v in ignore}
    tumours = []
    for row, name, pixels, _, _ in classes:
        key = name.lower()
        if key in RESERVED_NAMES:
            problem(row, "name", f"class name {name!r} is reserved (patch-grid counts use it)")
        elif key in first_name:
            problem(row, "name", f"duplicate class name {name!r} (first on row {first_name[key]})")
        else:
            first_name[key] = row
        for value in pixels:
            if value in first_value:
                other, other_row = first_value[value]
                problem(row, "value", f"pixel value {value} is already {other!r} (row {other_row})")
            else:
                first_value[value] = (name, row)
        if _normal_name(name) in TUMOUR_NAMES:
            tumours.append((row, name))
    for row, name in tumours[1:]:
        problem(row, "name", f"a second tumour-like class {name!r} (first: {tumours[0][1]!r})")
    rows = {name: row for row, name, *_ in classes}
    for name, text in _alias_problems([(name, aliases) for _, name, _, _, aliases in classes]):
        problem(rows.get(name), "aliases", text)
