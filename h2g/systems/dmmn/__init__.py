"""DMMN (Ho et al., ``../shared/paper/dmmn.txt``): multi-class segmentation from
co-centred 256 px views at 20x, 10x and 5x, trained on partial annotations with a
class-weighted cross-entropy; the paper's four architectures DSMN-S2, DMMN-MS, DMMN-M2S
and DMMN-M3.

- :mod:`~h2g.systems.dmmn.designs`: the four designs;
- :mod:`~h2g.systems.dmmn.pipeline`: sampler, training, sliding-window inference and
  per-class evaluation.

Its default manifest is the embedded cohort's multi-class one
(``data_manifest_multiclass.csv``: the same slides as H2G-Net's, with label maps).
"""
from h2g.systems.dmmn import config
from h2g.systems.dmmn.designs import DESIGNS
from h2g.systems.registry import System

SYSTEM = System(
    name="dmmn",
    label="DMMN",
    source="dmmn.txt",
    designs=tuple(DESIGNS.values()),
    runner="h2g.systems.dmmn.pipeline:run_designs",
    default_manifest="data_manifest_multiclass.csv",
    sections=config.SECTIONS,
    presets=config.PRESETS,
    claims="h2g.systems.dmmn.claims:CLAIMS",
    segmenters=("h2g.inference.segmenter:SlidingSegmenter",),
)
