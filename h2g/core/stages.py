"""Cached stages: a stage's output folder is keyed by what the stage declares it reads.

A stage (cluster model, patch classifier, heatmaps, a refinement net, a pseudo-label
round, ...) declares its inputs when it is made:

- ``config``: the config sections it reads (``Config`` field names, e.g. ``"patches"``),
  hashed by value, plus the seed when ``seeded``;
- ``data``: the data key (the manifest's bytes and each slide's and mask's size and
  modification time, :func:`data_key`);
- ``upstream``: the outputs it consumes, each either another :class:`Stage` (its key is
  chained in, so a round of pseudo-labels keyed on the previous round's key changes when
  any earlier round does) or a file (its bytes are hashed);
- ``params``: anything else that changes its result (a design's architecture name, ...).

Its key is the hash of exactly these, so a stage reruns when, and only when, something
it reads changes, and ``--design all`` trains a shared stage once.  The folder is
``ROOT/_cache/<name>-<key>/``; ``done.json`` (written atomically, last) marks it
complete and records the declared inputs.  A folder without it is an interrupted stage:
resumed with ``resume=True`` (training stages continue from their last checkpoint),
started afresh otherwise.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from h2g.core.atomic import write_json
from h2g.core.errors import ConfigError

DONE = "done.json"


def stable_hash(*parts: Any, length: int = 12) -> str:
    """A short, stable hash of JSON-serialisable parts (cache keys of stage outputs)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_hash(path: Path, length: int = 12) -> str:
    """Hash of a file's bytes (identifies a trained model or a manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def data_key(manifest) -> str:
    """Identifies a manifest's data: the manifest file's bytes and each slide's and
    annotation's size and modification time (a slide rewritten in place invalidates
    every stage that read it)."""
    files = []
    for record in manifest:
        for path in (record.slide_path, record.annotation_path):
            if path is not None:
                stat = Path(path).stat()
                files.append((str(path), stat.st_size, stat.st_mtime_ns))
    return stable_hash(file_hash(manifest.path), files)


@dataclass
class Stage:
    """A cached stage folder keyed by its declared inputs (see the module doc)."""

    root: Path
    name: str
    config: Any = None  # a Config (dataclass with .to_dict()) or None
    sections: Sequence[str] = ()
    seeded: bool = True
    data: str | None = None
    upstream: Mapping[str, "Stage | Path | None"] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.inputs = self._declared()
        self.key = stable_hash(self.name, self.inputs)

    def _declared(self) -> dict:
        inputs: dict[str, Any] = {}
        if self.sections or self.seeded:
            if self.config is None:
                raise ConfigError(f"stage {self.name!r} declares config sections but was given no config")
            tree = self.config.to_dict()
            missing = [s for s in self.sections if s not in tree]
            if missing:
                raise ConfigError(f"stage {self.name!r}: unknown config section(s) {missing}")
            inputs["config"] = {s: tree[s] for s in self.sections}
            if self.seeded:
                inputs["seed"] = tree["seed"]
        if self.data is not None:
            inputs["data"] = self.data
        upstream = {}
        for role, item in self.upstream.items():
            if item is None:
                upstream[role] = None
            elif isinstance(item, Stage):
                upstream[role] = f"{item.name}-{item.key}"
            else:
                upstream[role] = file_hash(Path(item))
        if upstream:
            inputs["upstream"] = upstream
        if self.params:
            inputs["params"] = dict(self.params)
        return json.loads(json.dumps(inputs, sort_keys=True, default=str))

    @property
    def dir(self) -> Path:
        return self.root / "_cache" / f"{self.name}-{self.key}"

    @property
    def done(self) -> bool:
        return (self.dir / DONE).is_file()

    def prepare(self, resume: bool) -> bool:
        """Make the folder; returns whether an interrupted run is resumed (its folder
        exists and ``resume`` is true).  Without ``resume`` a leftover folder is cleared."""
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        existed = self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        return existed and resume

    def finish(self, info: Mapping[str, Any] | None = None) -> None:
        """Mark the stage complete: ``done.json`` with ``info`` and the declared inputs."""
        write_json(self.dir / DONE, {**(info or {}), "stage": self.name, "key": self.key, "inputs": self.inputs})

    def info(self) -> dict:
        return json.loads((self.dir / DONE).read_text())
