"""m-UNet (``../shared/paper/multiclass-multistain-unet.txt``): multi-level, multi-class,
multi-stain segmentation by two EfficientNet U-Nets on a high- and a low-resolution view
joined by a pixel-aligned merge, trained first as a base U-Net-B0 on partial labels,
then in rounds of m-UNet-B4 on its own pseudo-labels with growing augmentation.

- :mod:`~h2g.systems.munet.designs`: ``unet_b0`` and ``munet_b4``;
- :mod:`~h2g.systems.munet.pipeline`: stages (base, pseudo-labels and master rounds),
  sliding-window inference, per-class / per-stain / per-scanner evaluation.

Its default manifest is the embedded cohort's multi-stain one
(``data_manifest_multistain.csv``: IHC renderings of the cohort's layouts for training,
the H&E test slides as the unseen stain; :mod:`h2g.data.multistain`).
"""
from h2g.systems.munet import config
from h2g.systems.munet.designs import DESIGNS
from h2g.systems.registry import System

SYSTEM = System(
    name="munet",
    label="m-UNet",
    source="multiclass-multistain-unet.txt",
    designs=tuple(DESIGNS.values()),
    runner="h2g.systems.munet.pipeline:run_designs",
    default_manifest="data_manifest_multistain.csv",
    sections=config.SECTIONS,
    presets=config.PRESETS,
    claims="h2g.systems.munet.claims:CLAIMS",
    segmenters=("h2g.inference.segmenter:SlidingSegmenter",),
)
