"""RAZN (Dong et al., ``../shared/paper/razn.txt``): Reinforced Auto-Zoom Net - a policy
network decides per region whether to zoom in (read the region at twice the resolution
and segment its four patches with a fine network) or segment it at the coarse scale -
with the paper's Table 1 baselines Scale 1, Scale 2, MS and Attention.

- :mod:`~h2g.systems.razn.designs`: the five designs;
- :mod:`~h2g.systems.razn.training`: Algorithm 1 (and the baselines' loop), exact resume;
- :mod:`~h2g.systems.razn.pipeline`: sampler, training stage, conditional zoom inference
  (:mod:`h2g.inference.zoom`, the code deployment runs), Table 1.

Runs by default on the embedded cohort's multi-class manifest.
"""
from h2g.systems.razn import config
from h2g.systems.razn.designs import DESIGNS
from h2g.systems.registry import System

SYSTEM = System(
    name="razn",
    label="RAZN",
    source="razn.txt",
    designs=tuple(DESIGNS.values()),
    runner="h2g.systems.razn.pipeline:run_designs",
    default_manifest="data_manifest_multiclass.csv",
    sections=config.SECTIONS,
    presets=config.PRESETS,
    claims="h2g.systems.razn.claims:CLAIMS",
    segmenters=("h2g.systems.razn.segmenter:ZoomSegmenter", "h2g.inference.segmenter:SlidingSegmenter"),
)
