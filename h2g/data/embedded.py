"""The embedded cohort on demand: a manifest of one of the package's presets gets its
missing files generated (the H&E slides and label maps of :mod:`h2g.data.cohort`, or the
IHC slides of :mod:`h2g.data.multistain`, the layer over the same layouts).

It sits above both generators, so that neither imports the other's caller.
"""
from __future__ import annotations

from pathlib import Path

from h2g.core.errors import ManifestError
from h2g.data.cohort import PRESETS, _write_text, make_cohort, manifest_texts
from h2g.data.multistain import ensure_multistain
from h2g.io.classes import sidecar_path
from h2g.io.manifest import DEFAULT_MANIFEST, load_manifest


def ensure_cohort(manifest_path=DEFAULT_MANIFEST, seed: int = 0) -> Path:
    """Return ``manifest_path`` once every file it names exists.

    A manifest that is exactly one of a preset's (:func:`~h2g.data.cohort.manifest_texts`:
    binary, multi-class, BACH-like, or the GeoJSON ones) gets its missing files generated
    into its folder from ``seed``, and one with a class table its table when that is
    missing; any other manifest with missing files raises the
    :class:`~h2g.core.errors.ManifestError` of :func:`load_manifest`."""
    manifest_path = Path(manifest_path)
    try:
        manifest = load_manifest(manifest_path, check_files=False)
    except ManifestError:
        load_manifest(manifest_path)  # every problem of the manifest, missing files included
        raise
    text = manifest_path.read_text()
    sidecar = sidecar_path(manifest_path)
    preset = next((name for name in PRESETS for known, _ in manifest_texts(name).values() if text == known), None)
    tables = [classes for name in PRESETS for known, classes in manifest_texts(name).values()
              if text == known and classes is not None]
    if tables and not sidecar.is_file():
        _write_text(sidecar, tables[0])
    files = [p for r in manifest for p in (r.slide_path, r.annotation_path) if p is not None]
    if all(p.is_file() for p in files):
        return manifest_path
    if preset is not None:
        make_cohort(manifest_path.parent, preset, seed, progress=True, only_missing=True)
        return manifest_path
    if ensure_multistain(manifest_path, seed) is not None:
        return manifest_path
    load_manifest(manifest_path)  # raises a ManifestError naming every missing file
    return manifest_path
