"""A finished H2G-Net run as a predictor of real slides: the run folder checked
(:func:`load_run`), its models and settings (:class:`RunInfo`), and :class:`RunPredictor`,
the run's deployed segmenter as :mod:`h2g.evaluation.real` predicts BCSS regions with
(``tools/eval_real.py``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from h2g.core.errors import ConfigError
from h2g.evaluation.real import Prediction
from h2g.systems.h2g.designs import DESIGNS, Kind

#: the files a finished run of a patch-classifier + refinement design holds
RUN_FILES = ("config.json", "metrics.json", "models/patch_classifier.keras", "models/refiner.keras")


@dataclass(frozen=True)
class RunInfo:
    """A finished run of a patch-classifier + refinement design, and the settings of its
    ``config.json`` that inference needs."""

    folder: Path
    design: str
    config: dict

    @property
    def patch_model(self) -> Path:
        return self.folder / "models" / "patch_classifier.keras"

    @property
    def refiner(self) -> Path:
        return self.folder / "models" / "refiner.keras"

    def setting(self, section: str, name: str):
        try:
            return self.config[section][name]
        except (KeyError, TypeError):
            raise ConfigError(f"{self.folder / 'config.json'}: no {section}.{name}") from None

    @property
    def threshold(self) -> float:
        return float(self.setting("eval", "threshold"))

    @property
    def size(self) -> int:
        return int(self.setting("refine", "size"))


def load_run(run_dir) -> RunInfo:
    """Check that ``run_dir`` is a finished run (``config.json`` and ``metrics.json``) of a
    design that refines a patch heatmap (``mob_pw_unet`` and its siblings: kind "refined"
    with a patch classifier) and holds both its models; :class:`ConfigError` naming the
    missing file or the wrong design otherwise."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ConfigError(f"run folder {folder} not found")
    for name in RUN_FILES[:2]:
        if not (folder / name).is_file():
            what = "the run is not finished" if name == "metrics.json" else "not a run folder"
            raise ConfigError(f"{folder / name} is missing: {what} (runs are made by experiments/run.py)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'config.json'}: cannot read it ({exc})") from None
    name = config.get("design") if isinstance(config, dict) else None
    design = DESIGNS.get(name)
    if design is None or design.kind != Kind.REFINED or not design.needs_heatmaps:
        refined = ", ".join(d for d, v in DESIGNS.items() if v.kind == Kind.REFINED and v.needs_heatmaps)
        raise ConfigError(f"{folder / 'config.json'}: design {name!r} is not a patch-classifier + refinement "
                          f"design (one of {refined})")
    for name in RUN_FILES[2:]:
        if not (folder / name).is_file():
            raise ConfigError(f"{folder / name} is missing: the run's model was not saved")
    run = RunInfo(folder, design.name, config)
    for section, key in (("patches", "magnification"), ("patches", "patch_size"), ("patches", "tissue_threshold"),
                         ("patches", "tissue_magnification"), ("patches", "saturation_threshold"),
                         ("heatmap", "batch_size"), ("heatmap", "readers"), ("refine", "size"),
                         ("eval", "threshold")):
        run.setting(section, key)
    return run


class RunPredictor:
    """A run's patch classifier and refinement network (Keras, through
    :class:`h2g.inference.backends.KerasBackend`) as H2G-Net's deployed segmenter
    (:class:`h2g.systems.h2g.segmenter.H2GSegmenter`), with the settings of the run's
    ``config.json`` - what the training pipeline does for cohort slides:

    - tissue: :func:`h2g.tiling.tissue.detect_tissue` at ``patches.tissue_magnification``
      and ``patches.saturation_threshold`` (``Pipeline._tissue``);
    - heatmap: :func:`h2g.inference.heatmap.slide_heatmap` with ``patches.magnification``,
      ``patches.patch_size``, ``patches.tissue_threshold``, ``heatmap.batch_size`` /
      ``readers`` (``Pipeline.heatmap_stage``);
    - refinement: :func:`h2g.inference.lowres.refinement_inputs` at ``refine.size`` and
      :func:`h2g.inference.lowres.refine` (``Pipeline.samples`` and the design's predictor).

    A slide without tissue patches gets an all-zero probability."""

    def __init__(self, run: RunInfo):
        from h2g.inference.backends import KerasBackend
        from h2g.systems.h2g.segmenter import H2GSegmenter, options_from_config

        self.run = run
        backends = {"patch_classifier": KerasBackend(run.patch_model), "refinement": KerasBackend(run.refiner)}
        self.segmenter = H2GSegmenter(backends, options_from_config(run.config), metadata=dict.fromkeys(backends))

    def __call__(self, slide) -> Prediction:
        seg = self.segmenter.segment(slide)
        info = {"grid_shape": list(seg.heatmap.grid_shape), "step": seg.heatmap.step, "tissue": seg.tissue,
                "timings": seg.timings}
        return Prediction(prob=seg.prob, image=seg.image, heat=seg.heat[..., 0], patches=seg.count, info=info)
