"""h2g: H2G-Net breast-cancer segmentation of H&E whole-slide images.

Importing the package is cheap and TensorFlow-free; the modules that need TensorFlow
(models, clustering, losses, training, refinement) import it themselves.
"""
__version__ = "0.1.0"

from h2g.core.errors import (
    AnnotationError,
    ConfigError,
    ExportError,
    H2GError,
    ManifestError,
    ModelError,
    SamplerError,
    SlideError,
)
