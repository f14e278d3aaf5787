"""The one registry of systems and their designs, configuration sections and segmenters.

A system (H2G-Net, DMMN, m-UNet, RAZN, or a new one) is a subpackage of
:mod:`h2g.systems` whose ``__init__`` defines ``SYSTEM = System(...)``: its name, the
paper it reproduces, its designs (objects with ``name``, ``label``, ``system`` and
``deep_learning``), its runner (``"module:function"`` with the signature ``run(designs,
manifest_path, out, config, resume, strategy=None) -> (metrics by design name, per-slide
test rows)``), the configuration sections it owns (``sections``: name -> dataclass, the
paper's values as defaults; ``presets``: preset name -> a function giving its sections'
values), the segmenters that deploy its models (``segmenters``: ``"module:Class"`` of
:class:`h2g.inference.segmenter.Segmenter` subclasses) and optionally the manifest it
runs on by default.  A new system plugs in by adding its package to
:data:`SYSTEM_PACKAGES` (or with :func:`register`, e.g. from a test): ``experiments/run.py``
then lists its designs, :func:`load_config` adds its sections to every preset, and
:func:`load_segmenter` deploys models whose metadata names it.

:func:`run` runs designs of any systems over one manifest and output folder and, for more
than one design, writes the combined tables (every system's rows carry the binary tumour
recall / precision / Dice, so all designs sit in one table).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from h2g.core.errors import ConfigError, ExportError
from h2g.core.measure import Timed
from h2g.core.numerics import numerics_host

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
    sections: Mapping[str, type] = field(default_factory=dict)  # config sections it owns
    presets: Mapping[str, Callable[[], dict]] = field(default_factory=dict)  # preset -> its sections' values
    segmenters: tuple[str, ...] = ()  # "module:Class" of the segmenters that deploy its models
    claims: str | None = None  # "module:NAME" of its paper's claims (h2g.evaluation.claims.Claim)

    @property
    def manifest(self) -> Path:
        """The manifest this system runs on when none is given."""
        from h2g.io.manifest import DEFAULT_MANIFEST

        return REPO / self.default_manifest if self.default_manifest else DEFAULT_MANIFEST

    def run(self, designs: Sequence, manifest_path: Path, out: Path, config, resume: bool = False,
            strategy=None, cache: Path | None = None):
        """Run ``designs`` of this system; ``strategy`` (a ``tf.distribute`` strategy or
        None) is given to the system's training stages; ``cache``: the stages' cache root
        (default ``out``)."""
        return _load(self.runner)(list(designs), manifest_path, out, config, resume, strategy=strategy, cache=cache)

    def paper_claims(self) -> tuple:
        """The claims of the system's paper (empty when it lists none)."""
        return tuple(_load(self.claims)) if self.claims else ()


_EXTRA: dict[str, System] = {}  # systems registered at run time (register)


def register(system: System) -> System:
    """Add ``system`` to the registry at run time (a plug-in, or a test's toy system);
    :func:`unregister` removes it."""
    if system.name in systems() and systems()[system.name] is not system:
        raise ConfigError(f"a system named {system.name!r} is already registered")
    _EXTRA[system.name] = system
    _clear()
    return system


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)
    _clear()


def _clear() -> None:
    systems.cache_clear()
    designs.cache_clear()


@lru_cache(maxsize=None)
def systems() -> dict[str, System]:
    """Every registered system by name, in registry order (the packages of
    :data:`SYSTEM_PACKAGES`, then those added with :func:`register`)."""
    found = {}
    for package in SYSTEM_PACKAGES:
        system = importlib.import_module(package).SYSTEM
        found[system.name] = system
    found.update(_EXTRA)
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
        strategy=None, cache: Path | None = None) -> dict[str, dict]:
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
            got, got_rows = system.run(mine, manifest, out, config, resume, strategy=strategy, cache=cache)
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


def run_seeds(chosen: Sequence, manifest_path: Path | None, out: Path, config, seeds: Sequence[int],
              resume: bool = False, strategy=None) -> tuple[dict[int, dict[str, dict]], list[dict]]:
    """:func:`run` once per seed into ``out/seed<S>/`` (every seed's stages in one cache,
    ``out/_cache``, so a stage the seed does not enter runs once), then over the seeds:
    ``out/seeds.md`` (the machine and each seed's wall time, then each design's metrics,
    mean ± sd over seeds) and the claims of the
    chosen designs' papers between the chosen designs (``out/claims.md`` / ``claims.json``:
    :mod:`h2g.evaluation.claims`).  Both are written again after every seed, over the
    seeds finished so far and saying so, so that a run stopped part way (hours, on a small
    CPU) still leaves what it measured; the same command then resumes from the cache.
    Returns each seed's metrics by design, and the claims."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"--seeds needs distinct seeds, got {list(seeds)}")
    out = Path(out)
    results, walls = {}, {}
    found: list[dict] = []
    for seed in seeds:
        with Timed() as timed:
            results[seed] = run(chosen, manifest_path, out / f"seed{seed}", config.replace(seed=seed),
                                resume=resume, strategy=strategy, cache=out)  # the stages in out/_cache
        walls[seed] = timed.wall
        found = summarise_seeds(chosen, out, list(results), walls, planned=seeds)
    return results, found


def summarise_seeds(chosen: Sequence, out: Path, done: Sequence[int], walls: Mapping[int, float],
                    planned: Sequence[int]) -> list[dict]:
    """``out/seeds.md``, ``claims.md`` and ``claims.json`` over the finished seeds
    ``done`` of the ``planned`` ones (see :func:`run_seeds`); returns the claims."""
    from h2g.core.atomic import write_json, write_text
    from h2g.evaluation import claims as evaluation

    loaded = evaluation.load_seeds({s: out / f"seed{s}" for s in done})
    labels = {d.name: d.label for d in chosen}
    tables, claims_md, found = [], [], []
    for system in systems().values():
        mine = [d for d in chosen if d.system == system.name]
        if not mine:
            continue
        wanted = {d.name for d in mine}
        claims = [c for c in system.paper_claims()
                  if c.better.partition("/")[0] in wanted and c.worse.partition("/")[0] in wanted]
        checked = evaluation.evaluate(claims, loaded)
        found += [{"system": system.name, **c} for c in checked]
        tables += [f"## {system.label}", "", evaluation.seeds_markdown(loaded, [d.name for d in mine], labels)]
        claims_md += [f"## {system.label}", "", evaluation.claims_markdown(checked, labels)]
    host = numerics_host()
    timing = (f"Run on {host['cpu'] or 'an unknown CPU'} ({host['cpus']} cores), wall time of this invocation: "
              + ", ".join(f"seed {s} {walls[s] / 60:.1f} min" for s in done)
              + " (a stage no seed enters runs once, in the first seed's time).")
    missing = [s for s in planned if s not in done]
    partial = ([f"**Partial: {len(done)} of {len(planned)} seeds finished** (seed {', '.join(map(str, missing))} "
                "not yet run; the same command resumes, reusing every finished stage).", ""] if missing else [])
    write_text(out / "seeds.md", "\n".join([timing, "", *partial, *tables]))
    write_text(out / "claims.md", "\n".join([*partial, *claims_md]))
    write_json(out / "claims.json", found)
    return found


# --------------------------------------------------------------------------------------
# Configuration: the core sections and every system's
# --------------------------------------------------------------------------------------
def load_config(preset: str = "smoke", seed: int = 0):
    """The named preset with the given seed: the core sections
    (:func:`h2g.core.config.core_sections`) and every registered system's sections at
    that preset's values (their dataclass defaults, the papers', where a system's preset
    does not set them); :class:`ConfigError` for an unknown preset."""
    from h2g.core.config import Config, core_sections

    sections = core_sections(preset)
    for system in systems().values():
        values = system.presets[preset]() if preset in system.presets else {}
        unknown = sorted(set(values) - set(system.sections))
        if unknown:
            raise ConfigError(f"system {system.name}: preset {preset!r} sets sections it does not own: {unknown}")
        for name, cls in system.sections.items():
            if name in sections:
                raise ConfigError(f"config section {name!r} is owned by two systems (or by core and {system.name})")
            sections[name] = values.get(name, cls())
    return Config(preset, seed, sections)


# --------------------------------------------------------------------------------------
# Deployment: the segmenter of a set of models, by the system in their metadata
# --------------------------------------------------------------------------------------
def _load(target: str):
    """The object ``"module:name"`` names (``name`` may be dotted: ``Class.method``)."""
    module, _, name = target.partition(":")
    found = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


def segmenters_of(system: str) -> list[type]:
    """The segmenter classes of a registered system, in its order."""
    return [_load(target) for target in systems()[system].segmenters]


def segmenter_class(metas: Mapping[str, Any], system: str | None = None, described: str = ""):
    """The segmenter class for models whose metadata (by role) is ``metas``: the first of
    the segmenters of their ``system`` (or the given one) that accepts their roles;
    :class:`ExportError` naming the models otherwise."""
    if system is None:
        names = {m.system for m in metas.values() if m is not None}
        if len(names) != 1:
            raise ExportError(f"{described or 'the models'}: the models belong to "
                              f"{', '.join(sorted(names)) or 'no system'}; give the models of one system")
        system = names.pop()
    if system not in systems():
        raise ExportError(f"{described or 'the models'}: system {system!r} is not registered (known: "
                          f"{', '.join(systems())}); is h2g too old for these models?")
    for cls in segmenters_of(system):
        if cls.accepts(metas):
            return cls
    raise ExportError(f"cannot tell what to run from the models {described or list(metas)}: no segmenter of "
                      f"{systems()[system].label} takes the roles {', '.join(sorted(metas))}")


def load_segmenter(models: Sequence | Mapping, engine=None, options: Mapping | None = None,
                   system: str | None = None):
    """The deployed segmenter of exported model files: ``models`` a list (each model's role
    and system come from its metadata) or ``{role: path}`` (``system`` then defaults to
    ``h2g`` for models without metadata, as older H2G-Net exports are); ``engine`` an
    :class:`h2g.inference.segmenter.EngineOptions`; ``options`` the tool's settings by
    name (None = not given), turned into the segmenter's typed options
    (:meth:`SegmentOptions.given`: one that does not apply is a :class:`ConfigError`)."""
    from pathlib import Path

    from h2g.inference.metadata import model_metadata

    if isinstance(models, Mapping):
        paths = {role: Path(p) for role, p in models.items()}
        metas = {role: model_metadata(p) for role, p in paths.items()}
        if system is None and all(m is None for m in metas.values()):
            system = "h2g"
    else:
        files = [Path(m) for m in models]
        if not files:
            raise ConfigError("no model given")
        metas_by_file = {f: model_metadata(f) for f in files}
        missing = [str(f) for f, m in metas_by_file.items() if m is None]
        if missing:
            raise ExportError(f"{', '.join(missing)}: no h2g metadata in the model file (exported by an older "
                              "version?); give H2G-Net's models with --patch-model and --refine-model")
        roles = [m.role for m in metas_by_file.values()]
        if len(set(roles)) != len(roles):
            raise ExportError(f"{', '.join(map(str, files))}: two models with the same role "
                              f"({', '.join(sorted(roles))})")
        paths = {m.role: f for f, m in metas_by_file.items()}
        metas = {m.role: m for m in metas_by_file.values()}
    described = ", ".join(f"{Path(p).name} ({(metas[r].system + ' ') if metas[r] else ''}{r})"
                          for r, p in paths.items())
    cls = segmenter_class(metas, system, described)
    typed = cls.Options.given(cls.label, **dict(options or {}))
    return cls.from_files(paths, engine, typed)
