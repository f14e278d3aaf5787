"""The one registry of designs across systems.

A system (H2G-Net, and DMMN, m-UNet, RAZN as they are added) is a subpackage of
:mod:`h2g.systems` whose ``__init__`` defines ``SYSTEM = System(...)``: its name, the
paper it reproduces, its designs (objects with ``name``, ``label``, ``system`` and
``deep_learning``) and its runner, ``"module:function"`` with the signature
``run(designs, manifest_path, out, config, resume, strategy=None) -> (metrics by design
name, per-slide test rows)``, and optionally the manifest it runs on by default.  A new system plugs in by adding its package to
:data:`SYSTEM_PACKAGES`; ``experiments/run.py`` then lists its designs, ``--design all``
runs them and ``--system NAME`` runs that system's designs.

:func:`run` runs designs of any systems over one manifest and output folder and, for more
than one design, writes the combined tables (every system's rows carry the binary tumour
recall / precision / Dice, so all designs sit in one table).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from h2g.core.errors import ConfigError

SYSTEM_PACKAGES = ("h2g.systems.h2g", "h2g.systems.dmmn", "h2g.systems.munet", "h2g.systems.razn")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class System:
    name: str  # command-line name (--system)
    label: str  # the paper's name of the system
    source: str  # the paper, in ../shared/paper/
    designs: tuple  # in the paper's order
    runner: str  # "module:function"
    default_manifest: str | None = None  # the embedded cohort's manifest it runs on (repo-relative)

    @property
    def manifest(self) -> Path:
        """The manifest this system runs on when none is given."""
        from h2g.io.manifest import DEFAULT_MANIFEST

        return REPO / self.default_manifest if self.default_manifest else DEFAULT_MANIFEST

    def run(self, designs: Sequence, manifest_path: Path, out: Path, config, resume: bool = False,
            strategy=None):
        """Run ``designs`` of this system; ``strategy`` (a ``tf.distribute`` strategy or
        None) is given to the system's training stages."""
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(list(designs), manifest_path, out, config, resume,
                                                                  strategy=strategy)


@lru_cache(maxsize=None)
def systems() -> dict[str, System]:
    """Every registered system by name, in registry order."""
    found = {}
    for package in SYSTEM_PACKAGES:
        system = importlib.import_module(package).SYSTEM
        found[system.name] = system
    return found


@lru_cache(maxsize=None)
def designs() -> dict[str, Any]:
    """Every design of every system by name (names are unique across systems)."""
    found: dict[str, Any] = {}
    for system in systems().values():
        for design in system.designs:
            if design.name in found:
                raise ConfigError(f"design name {design.name!r} is registered by two systems")
            found[design.name] = design
    return found


def get_design(name: str):
    try:
        return designs()[name]
    except KeyError:
        raise ConfigError(f"unknown design {name!r}; choose from {', '.join(designs())} or 'all'") from None


def resolve(names: str | Sequence[str] = (), system: str | None = None) -> list:
    """Design names (or ``"all"``) and/or a system name -> designs, in registry order
    (systems in :data:`SYSTEM_PACKAGES` order, each system's designs in its paper's)."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if system is not None and system not in systems():
        raise ConfigError(f"unknown system {system!r}; choose from {', '.join(systems())}")
    if not names and system is None:
        raise ConfigError("name designs (or 'all') or a system")
    wanted = set()
    if "all" in names:
        wanted |= set(designs())
    else:
        wanted |= {get_design(n).name for n in names}
    if system is not None:
        in_system = {d.name for d in systems()[system].designs}
        wanted = (wanted & in_system) if names and "all" not in names else in_system
        if not wanted:
            raise ConfigError(f"none of {', '.join(names)} is a design of system {system!r}")
    return [d for d in designs().values() if d.name in wanted]


def run(chosen: Sequence, manifest_path: Path | None, out: Path, config, resume: bool = False,
        strategy=None) -> dict[str, dict]:
    """Run designs (of one or several systems); returns metrics by design name.  With
    more than one design, ``out`` also gets the combined tables and Dice box plot.
    ``manifest_path`` None: each system on its own default (:attr:`System.manifest`:
    the embedded cohort's binary or multi-class manifest, the same slides).
    ``strategy``: a ``tf.distribute`` strategy for every training stage."""
    from h2g.evaluation import figures, tables

    results: dict[str, dict] = {}
    rows: list[dict] = []
    for system in systems().values():
        mine = [d for d in chosen if d.system == system.name]
        if mine:
            manifest = system.manifest if manifest_path is None else manifest_path
            got, got_rows = system.run(mine, manifest, out, config, resume, strategy=strategy)
            results.update(got)
            rows.extend(got_rows)
    if len(chosen) > 1:
        sides = {str(r["resolution"]) for r in results.values()}
        first = next(iter(results.values()))["resolution"]
        if len(sides) > 1:
            resolution = "each design's own resolution (metrics.json)"
        else:
            resolution = first[0] if isinstance(first, (list, tuple)) else str(first)
        tables.write_tables(Path(out), rows, [d.label for d in chosen], resolution=resolution,
                            tukey_designs=[d.label for d in chosen if d.deep_learning])
        figures.dice_boxplot(Path(out) / "dice_boxplot.png", rows)
        sweeps = {r["label"]: r["threshold_sweep"] for r in results.values() if "threshold_sweep" in r}
        if sweeps:
            tables.write_threshold_table(Path(out), sweeps)
    return results
