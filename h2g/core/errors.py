"""The package's error hierarchy.

Every error a user can cause (a bad file, a bad manifest, a bad option) is an
``H2GError`` whose message names the file and the problem.  Command-line tools turn
these into exit code 2 and a single line on stderr (see :func:`h2g.core.cli.run_cli`);
anything else is a bug and may show a traceback.
"""
from __future__ import annotations


class H2GError(Exception):
    """Base class of all errors the package raises on bad input."""


class SlideError(H2GError):
    """A whole-slide image cannot be used: missing, not a slide, corrupt, unsupported,
    no magnification information, a region outside the slide, and so on."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class AnnotationError(SlideError):
    """A tumour annotation mask cannot be used with its slide."""


class ManifestError(H2GError):
    """A manifest has one or more bad rows.  ``problems`` lists every one of them as
    ``(file, row, column, problem)`` (row is the 1-based data row, ``None`` for the
    header or the whole file)."""

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        lines = [f"{self.path}: {len(self.problems)} problem(s)"]
        for file, row, column, problem in self.problems:
            where = f"row {row}" if row is not None else "header"
            lines.append(f"  {file}: {where}, column {column!r}: {problem}")
        super().__init__("\n".join(lines))


class ConfigError(H2GError):
    """An option, preset or design name is invalid."""


class SamplerError(H2GError):
    """The hierarchical sampler cannot be built over the given data."""


class ModelError(H2GError):
    """A model cannot be built, loaded or converted (e.g. missing weights file)."""


class ExportError(H2GError):
    """Conversion or deployment failed (missing engine, wrong input names, parity)."""
