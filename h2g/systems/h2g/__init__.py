"""H2G-Net (Pedersen et al. 2022, ``../shared/paper/h2g-net.txt``): a MobileNetV2 patch
heatmap at 10x refined by a U-Net on a 1024x1024 low-resolution view, and the paper's
nine-design ablation.

- :mod:`~h2g.systems.h2g.designs`: the nine designs (what stages each needs);
- :mod:`~h2g.systems.h2g.pipeline`: the stages and how the designs chain them;
- :mod:`~h2g.systems.h2g.refinement`: the refinement stage's samples and tf.data feed.
"""
from h2g.systems.h2g import config
from h2g.systems.h2g.designs import DESIGNS
from h2g.systems.registry import System

SYSTEM = System(
    name="h2g",
    label="H2G-Net",
    source="h2g-net.txt",
    designs=tuple(DESIGNS.values()),
    runner="h2g.systems.h2g.pipeline:run_designs",
    sections=config.SECTIONS,
    presets=config.PRESETS,
    claims="h2g.systems.h2g.claims:CLAIMS",
    segmenters=("h2g.systems.h2g.segmenter:H2GSegmenter",),
)
