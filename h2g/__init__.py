"""h2g: tumour segmentation of breast-cancer whole-slide images.

Shared stages (``h2g.core``, ``io``, ``tiling``, ``data``, ``models``, ``training``,
``inference``, ``evaluation``, ``export``) and one subpackage per reproduced system under
``h2g.systems`` (H2G-Net: ``h2g.systems.h2g``); ``docs/DESIGN.md`` is the map.

Importing the package is cheap and TensorFlow-free; the modules that need TensorFlow
(models, training, data.dataset, export.conversion, the systems' pipelines) import it
themselves.
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
