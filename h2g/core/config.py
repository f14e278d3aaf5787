"""Configuration: the :class:`Config` container, the sections every system reads
(``patches``, ``sampler``, ``eval``) and ``--set`` overrides.

Each system owns its sections (H2G-Net's ``classifier``, ``cluster``, ``heatmap``,
``refine``; ``dmmn``; ``munet``; ``razn``), declared in its package's ``config.py`` with
the paper's values as defaults and its ``smoke`` preset; adding a system adds no line
here.  :func:`h2g.systems.registry.load_config` assembles a preset (``paper``: the
papers' hyperparameters; ``smoke``: the whole pipeline in minutes on a 2-core CPU) from
the core sections and every registered system's.  ``config.to_dict()`` is what a run
writes to ``config.json`` and what stage cache keys are hashed from.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, get_args, get_origin

from h2g.core.errors import ConfigError


@dataclass(frozen=True)
class PatchConfig:
    """Tissue detection and patch grids (paper Section 2.2)."""

    magnification: float = 10.0  # the paper's "x100"
    patch_size: int = 256
    tissue_threshold: float = 0.25  # keep a patch with > 25 % tissue
    tumour_threshold: float = 0.25  # > 25 % tumour -> tumour; 0 % -> non-tumour
    tissue_magnification: float = 1.25
    saturation_threshold: int = 20
    annotation_downsample: float = 4.0


@dataclass(frozen=True)
class SamplerConfig:
    """Hierarchical sampler (Section 2.3): uniform at each stage."""

    stages: tuple[str, ...] = ("grade", "slide", "class", "patch")
    readers: int = 8  # parallel patch readers (the paper used eight workers)


@dataclass(frozen=True)
class EvalConfig:
    threshold: float = 0.5
    figure_slides: int = 4


#: The sections every system reads, by name.
CORE_SECTIONS = {"patches": PatchConfig, "sampler": SamplerConfig, "eval": EvalConfig}
#: The presets: ``paper`` (every section's defaults: the papers' values) and ``smoke``.
PRESET_NAMES = ("paper", "smoke")


def core_sections(preset: str) -> dict:
    """The core sections of ``preset`` (:class:`ConfigError` for an unknown name)."""
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESET_NAMES)}")
    sections = {name: cls() for name, cls in CORE_SECTIONS.items()}
    if preset == "smoke":
        sections["sampler"] = SamplerConfig(readers=2)
    return sections


class Config:
    """A run's configuration: ``preset``, ``seed`` and named sections (frozen dataclasses),
    read as attributes (``config.patches``, ``config.refine``).  The core sections are
    :data:`CORE_SECTIONS`; each system adds its own (:class:`h2g.systems.registry.System`
    ``sections``), and :func:`h2g.systems.registry.load_config` assembles a preset from
    all of them.  Immutable: :meth:`replace` and :meth:`override` return new configs."""

    __slots__ = ("preset", "seed", "_sections")

    def __init__(self, preset: str = "paper", seed: int = 0, sections: Mapping[str, Any] | None = None):
        sections = dict(sections if sections is not None else {n: c() for n, c in CORE_SECTIONS.items()})
        for name, value in sections.items():
            if not dataclasses.is_dataclass(value) or isinstance(value, type):
                raise ConfigError(f"config section {name!r} must be a dataclass instance, got {value!r}")
            if name in ("preset", "seed"):
                raise ConfigError(f"{name!r} cannot be a section name")
        object.__setattr__(self, "preset", str(preset))
        object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "_sections", sections)

    def __getattr__(self, name: str):
        sections = object.__getattribute__(self, "_sections")
        try:
            return sections[name]
        except KeyError:
            raise AttributeError(f"the config has no section {name!r} (sections: {', '.join(sections)})") from None

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        return f"Config(preset={self.preset!r}, seed={self.seed}, sections={list(self._sections)})"

    def __reduce__(self):
        return (Config, (self.preset, self.seed, self._sections))

    @property
    def sections(self) -> dict[str, Any]:
        """The sections by name (a copy)."""
        return dict(self._sections)

    def to_dict(self) -> dict[str, Any]:
        tree = {"preset": self.preset, "seed": self.seed}
        tree.update({name: dataclasses.asdict(value) for name, value in self._sections.items()})
        return json.loads(json.dumps(tree))

    def replace(self, **changes) -> "Config":
        """A copy with ``preset``, ``seed`` and / or sections replaced (a section name
        the config does not have is a :class:`ConfigError`)."""
        preset, seed = changes.pop("preset", self.preset), changes.pop("seed", self.seed)
        unknown = sorted(set(changes) - set(self._sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections: {', '.join(self._sections)}")
        return Config(preset, seed, {**self._sections, **changes})

    def override(self, assignments: Sequence[str]) -> "Config":
        """A copy with ``section.field=value`` assignments applied (``seed=3`` for a
        top-level field), as given on the command line by ``--set``.  Values are parsed
        as the field's type: numbers, ``true``/``false``, ``none``, and comma-separated
        tuples; :class:`ConfigError` names an unknown key or a value of the wrong type."""
        config = self
        for text in assignments:
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"--set {text!r}: expected section.field=value")
            path = key.split(".")
            if path == ["seed"]:
                config = config.replace(seed=_parse(raw.strip(), int, key))
                continue
            if path[0] not in config._sections:
                raise ConfigError(f"--set {key}: unknown {'field' if len(path) == 1 else 'section'} {path[0]!r}; "
                                  f"choose from seed, {', '.join(config._sections)}")
            if len(path) == 1:
                raise ConfigError(f"--set {key}: {path[0]!r} is a section; set one of its fields ({key}.FIELD=VALUE)")
            config = config.replace(**{path[0]: _assign(config._sections[path[0]], path[1:], raw.strip(), key)})
        return config


def _assign(node, path: list[str], raw: str, key: str):
    names = {f.name: f for f in dataclasses.fields(node)}
    if path[0] not in names:
        raise ConfigError(f"--set {key}: unknown {'field' if len(path) == 1 else 'section'} {path[0]!r}; "
                          f"choose from {', '.join(n for n in names if n != 'preset')}")
    value = getattr(node, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"--set {key}: {path[0]!r} is a value, not a section")
        return dataclasses.replace(node, **{path[0]: _assign(value, path[1:], raw, key)})
    if dataclasses.is_dataclass(value):
        raise ConfigError(f"--set {key}: {path[0]!r} is a section; set one of its fields ({key}.FIELD=VALUE)")
    hint = typing.get_type_hints(type(node))[path[0]]
    return dataclasses.replace(node, **{path[0]: _parse(raw, hint, key)})


def _parse(raw: str, hint, key: str):
    """``raw`` as a value of type ``hint`` (int, float, bool, str, None-able, tuple)."""
    args = get_args(hint)
    if get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if raw.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(raw, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"--set {key}: cannot parse {raw!r}")
    if get_origin(hint) is tuple:
        item = args[0] if args else str
        return tuple(_parse(part.strip(), item, key) for part in raw.split(",") if part.strip())
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
    except ValueError:
        raise ConfigError(f"--set {key}: {raw!r} is not a valid {hint.__name__}") from None
    raise ConfigError(f"--set {key}: fields of type {hint} cannot be set from the command line")
