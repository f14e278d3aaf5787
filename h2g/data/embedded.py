"""The embedded cohort on demand: a manifest of one of the package's presets gets its
missing files generated (the H&E slides and label maps of :mod:`h2g.data.cohort`, or the
IHC slides of :mod:`h2g.data.multistain`, the layer over the same layouts).

It sits above both generators, so that neither imports the other's caller.
"""
from __future__ import annotations

from pathlib import Path

from h2g.data.cohort import PRESETS, _write_text, classes_text, make_cohort, manifest_text
from h2g.data.multistain import ensure_multistain
from h2g.io.classes import sidecar_path
from h2g.io.manifest import DEFAULT_MANIFEST, load_manifest


def ensure_cohort(manifest_path=DEFAULT_MANIFEST, seed: int = 0) -> Path:
    """Return ``manifest_path`` once every file it names exists.

    A manifest that is exactly a preset's (:func:`manifest_text`, binary or
    multi-class) gets its missing files generated into its folder from ``seed``, and a
    multi-class one its class table (:func:`classes_text`) when that is missing; any
    other manifest with missing files raises the
    :class:`~h2g.core.errors.ManifestError` of :func:`load_manifest`."""
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path, check_files=False)
    text = manifest_path.read_text()
    sidecar = sidecar_path(manifest_path)
    multiclass = any(text == manifest_text(name, multiclass=True) for name in PRESETS)
    bach = any(text == manifest_text(name, bach=True) for name in PRESETS)
    if (multiclass or bach) and not sidecar.is_file():
        _write_text(sidecar, classes_text(bach=bach))
    files = [p for r in manifest for p in (r.slide_path, r.annotation_path) if p is not None]
    if all(p.is_file() for p in files):
        return manifest_path
    for name in PRESETS:
        if text in (manifest_text(name), manifest_text(name, multiclass=True), manifest_text(name, bach=True)):
            make_cohort(manifest_path.parent, name, seed, progress=True, only_missing=True)
            return manifest_path
    if ensure_multistain(manifest_path, seed) is not None:
        return manifest_path
    load_manifest(manifest_path)  # raises a ManifestError naming every missing file
    return manifest_path
