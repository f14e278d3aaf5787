"""RAZN's stages over one manifest (Dong et al., Sections 2-3), cached under ``out/_cache``.

- **Samples**: the hierarchical sampler draws ``size`` px regions at ``magnification``
  from the grid of each training slide (regions with more than ``min_labelled``
  annotated pixels, labelled by their majority class); each sample is the region ``x0``
  and its zoom ``x1`` (twice the pixels at twice the magnification, same centre), and
  the target is ``x1``'s label map (255 = unannotated, ignored).  No augmentation (the
  paper mentions none).
- **Training** (:mod:`h2g.systems.razn.training`): RAZN by Algorithm 1, the baselines by
  the same loop on their unit model; same data, steps, Adam and step decay for all.
- **Inference**: regions tile the tissue of each test slide (stride = the region).
  RAZN: :func:`h2g.inference.zoom.zoom_segmentation` (the policy decides per region; the
  code deployment runs); the baselines: their unit model by
  :func:`h2g.inference.sliding.sliding_segmentation` over the same regions.  Every design
  predicts on the fine grid (twice ``magnification``).
- **Evaluation**: per-class IoU pooled over the test slides on the label maps' grid, mean
  IoU, weighted IoU (frequency-weighted; and the paper's inverse-frequency wording) and
  the relative inference time: wall seconds per region (policy + the branch taken for
  RAZN), one region at a time (each network a traced ``tf.function``; best of 5), over
  ``timing_regions`` test regions, divided by the mean time of Scale 1's unit (the
  dilated FCN on ``x0``, enlarged) on the same regions, timed interleaved with the
  design's in the same process; mean and sd over regions.  The relative cost in FLOPs is reported
  beside it.  Each row also carries the binary tumour recall / precision / Dice per
  slide, so RAZN's designs join Table 1 of every system.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from h2g.core.atomic import replace_atomically, write_text
from h2g.core.errors import ConfigError
from h2g.core.stages import Stage
from h2g.data.views import View
from h2g.evaluation import collapse, metrics
from h2g.inference.zoom import ZOOM_RATE, zoom_views
from h2g.io.classes import colour_rgb
from h2g.io.slide import open_slide
from h2g.systems import base
from h2g.systems.razn.designs import DESIGNS, Design

log = logging.getLogger("h2g")
RAZN_MODELS = ("policy", "coarse", "fine")


def network_metadata(role: str, c, design: str = "razn", classes=(), **extras):
    """What deployment needs to know of RAZN's ``policy``, ``coarse`` or ``fine`` network
    trained with the ``razn`` config ``c`` (region size and magnification, zoom rate and
    threshold: :func:`h2g.systems.razn.segmenter.geometry` reads them back); ``extras``
    are added (e.g. ``untrained`` for tools/model_summary.py's stand-ins)."""
    from h2g.inference.metadata import ModelMetadata

    x0, x1 = zoom_views(c.size, c.magnification)
    extras = {"zoom_rate": ZOOM_RATE, "size": c.size, "magnification": c.magnification,
              "threshold": c.zoom_threshold, "alpha": c.alpha, **extras}
    if role == "policy":
        return ModelMetadata(system="razn", design=design, role="policy", views=(x0,), output="class_probs",
                             extras=extras)
    if role == "coarse":
        return ModelMetadata(system="razn", design=design, role="coarse", views=(x0,), classes=classes,
                             output="pixel_probs", extras=extras)
    if role == "fine":
        return ModelMetadata(system="razn", design=design, role="fine", views=(View("x1_patch", x1.magnification,
                                                                                    c.size),),
                             classes=classes, output="pixel_probs", extras=extras)
    raise ConfigError(f"RAZN's networks are {', '.join(RAZN_MODELS)}, not {role!r}")


@dataclass
class Pipeline(base.Pipeline):
    """RAZN's stages over one manifest."""

    system_label: ClassVar[str] = "RAZN"

    def __post_init__(self):
        super().__post_init__()
        c = self.config.razn
        if c.size % 8 or c.size < 8 or not c.magnification > 0:
            raise ConfigError(f"razn.size must be a positive multiple of 8 and razn.magnification positive, "
                              f"got {c.size} and {c.magnification}")
        if not 0.5 <= c.alpha <= 1.0:
            raise ConfigError(f"razn.alpha must be in [0.5, 1], got {c.alpha}")
        if self.strategy is not None:
            raise ConfigError("RAZN's custom training loop runs on one device; --strategy is not supported")

    # ------------------------------------------------------------------ data
    @property
    def zoom_views(self) -> tuple[View, View]:
        c = self.config.razn
        return zoom_views(c.size, c.magnification)

    def views(self, design: Design) -> tuple[View, ...]:
        both = {v.name: v for v in self.zoom_views}
        return tuple(both[n] for n in design.views)

    def train_sampler(self):
        c = self.config.razn
        return self.sampler("train", self._annotated("train"), training=True, magnification=c.magnification,
                            patch_size=c.size, tissue_threshold=c.tissue_threshold, min_labelled=c.min_labelled)

    def batches(self, start: int):
        """Training batches ``({"x0", "x1"}, labels of x1)`` from global batch ``start``."""
        from h2g.data.dataset import sample_dataset

        c = self.config
        sampler = self.train_sampler()
        sampled = {s.slide_id for s in sampler.sources}
        annotations = {r.slide_id: self.annotation(r) for r in self._annotated("train") if r.slide_id in sampled}
        return sample_dataset(sampler, self.zoom_views, target="pixels", target_view="x1",
                              batch_size=c.razn.batch_size, training=True, start_batch=start,
                              readers=c.sampler.readers, n_classes=self.classes.n_classes, annotations=annotations)

    # ------------------------------------------------------------------ models
    def build(self, design: Design) -> dict:
        """The design's networks, freshly initialised from the seed."""
        import keras

        from h2g.models import razn

        c = self.config
        n = self.classes.n_classes
        keras.utils.set_random_seed(c.seed)
        if design.unit is None:
            return razn.build_razn_networks(n, c.razn.size, c.razn.width, seed=c.seed)
        fcn = razn.build_resnet18_fcn(n, c.razn.size, c.razn.width)
        return {"unit": razn.unit_model(design.unit, fcn, attention_width=c.razn.attention_width)}

    def model_stage(self, design: Design) -> Stage:
        """Train ``design``; its models (``policy/coarse/fine.keras`` or ``unit.keras``)."""
        import tensorflow as tf

        from h2g.systems.razn.training import RaznTrainer, UnitTrainer

        c = self.config
        stage = self.stage("razn", ("razn", "patches", "sampler"), design=design.name, classes=list(self.classes.names))
        if stage.done:
            return stage
        resumed = stage.prepare(self.resume)
        log.info("training %s -> %s", design.label, stage.dir)
        tf.config.experimental.enable_op_determinism()
        nets = self.build(design)
        schedule = dict(lr=c.razn.learning_rate, decay_steps=c.razn.decay_steps, decay_rate=c.razn.decay_rate,
                        seed=c.seed)
        if design.unit is None:
            trainer = RaznTrainer(nets["policy"], nets["coarse"], nets["fine"], alpha=c.razn.alpha,
                                  reward_floor=c.razn.reward_floor, coarse_regions=c.razn.coarse_regions,
                                  fine_regions=c.razn.fine_regions, reward_mode=c.razn.reward_mode, **schedule)
        else:
            trainer = UnitTrainer(nets["unit"], outputs=design.losses, **schedule)
        history = trainer.fit(self.batches, steps=c.razn.steps, run_dir=stage.dir / "training",
                              checkpoint_every=c.razn.checkpoint_every, resume=resumed)
        for name, model in nets.items():
            replace_atomically(stage.dir / f"{name}.keras", model.save)
        stage.finish({"steps": c.razn.steps, "last": {k: v[-1] for k, v in history.items()}})
        return stage

    def metadata(self, design: Design, role: str):
        classes = self.classes.metadata_classes()
        if role in RAZN_MODELS:
            return network_metadata(role, self.config.razn, design.name, classes)
        from h2g.inference.metadata import ModelMetadata

        c = self.config.razn
        target = "x1" if "x1" in design.views else "x0"
        stride = dict(x0=c.size, x1=ZOOM_RATE * c.size)[target]
        return ModelMetadata(system="razn", design=design.name, role="segmentation", views=self.views(design),
                             classes=classes, output="pixel_probs", extras={"target": target, "stride": stride})

    def segmenter(self, design: Design, stage: Stage):
        """The design's networks as deployment runs them: RAZN's conditional zoom
        (:class:`h2g.systems.razn.segmenter.ZoomSegmenter`), a baseline's unit by sliding
        window over the same regions (:class:`h2g.inference.segmenter.SlidingSegmenter`)."""
        from h2g.inference.backends import KerasBackend

        if design.unit is None:
            return self.segmenter_of(design, {n: KerasBackend(stage.dir / f"{n}.keras") for n in RAZN_MODELS})
        return self.segmenter_of(design, {"segmentation": KerasBackend(stage.dir / "unit.keras")})

    def segmenter_of(self, design: Design, backends: dict):
        """:meth:`segmenter` on given backends (RAZN's ``policy`` / ``coarse`` / ``fine``,
        or a baseline's ``segmentation``), e.g. models loaded from a run folder."""
        from h2g.inference.segmenter import SlidingSegmenter, WindowOptions
        from h2g.systems.razn.segmenter import ZoomOptions, ZoomSegmenter

        c = self.config
        detection = dict(tissue_magnification=c.patches.tissue_magnification,
                         saturation_threshold=c.patches.saturation_threshold)
        if design.unit is None:
            return ZoomSegmenter(backends, ZoomOptions(threshold=c.razn.zoom_threshold,
                                                       batch_size=c.razn.inference_batch, **detection),
                                 metadata={n: self.metadata(design, n) for n in RAZN_MODELS})
        meta = self.metadata(design, "segmentation")
        options = WindowOptions(stride=meta.extras["stride"], batch_size=c.razn.inference_batch,
                                readers=c.sampler.readers, **detection)
        return SlidingSegmenter(backends, options, metadata={"segmentation": meta})

    def timing_regions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x0 (N, S, S, 3), x1 (N, 2S, 2S, 3))`` of ``timing_regions`` regions evenly
        spread over the test slides' tissue regions."""
        from h2g.inference.sliding import read_window_batch
        from h2g.tiling.tissue import detect_tissue
        from h2g.tiling.windows import window_grid

        c = self.config
        v0, v1 = self.zoom_views
        found = []
        for record in self.manifest.split("test"):
            with open_slide(record.slide_path, mpp=record.mpp) as slide:
                tissue = detect_tissue(slide, magnification=c.patches.tissue_magnification,
                                       saturation_threshold=c.patches.saturation_threshold)
                grid = window_grid(slide, magnification=v1.magnification, size=v1.size, stride=v1.size,
                                   tissue=tissue)
                found += [(record, centre) for centre in grid.centres]
        if not found:
            raise ConfigError(f"{self.manifest_path}: no tissue region in the test slides to time")
        picks = np.unique(np.linspace(0, len(found) - 1, c.razn.timing_regions).round().astype(int))
        x0, x1 = [], []
        for i in picks:
            record, centre = found[i]
            with open_slide(record.slide_path, mpp=record.mpp) as slide:
                views = read_window_batch(slide, centre[None], [v0, v1])
            x0.append(views["x0"][0])
            x1.append(views["x1"][0])
        return np.stack(x0), np.stack(x1)

    def relative_time(self, design: Design, backends: dict) -> dict:
        """Per-region wall time relative to Scale 1's mean on the same regions (module doc)."""
        import keras

        from h2g.inference.zoom import enlarge, segment_regions, time_interleaved
        from h2g.models import razn

        c = self.config
        x0, x1 = self.timing_regions()
        extra = {}
        backends = {k: _GraphBackend(b.model) for k, b in backends.items()}
        if design.unit is None:  # Scale 1's unit is RAZN's coarse network, enlarged
            policy, coarse, fine = (backends[r] for r in RAZN_MODELS)
            reference = lambda i: enlarge(coarse.predict(x0[i:i + 1]))  # noqa: E731
            run = lambda i: segment_regions(policy, coarse, fine, x0[i:i + 1],  # noqa: E731
                                            lambda idx: x1[i:i + 1][idx], c.razn.zoom_threshold)
            zoomed = np.asarray(policy.predict(x0))[:, 0] > c.razn.zoom_threshold
            extra["timing_zoom_fraction"] = float(zoomed.mean())
        else:
            keras.utils.set_random_seed(c.seed)
            scale1 = _GraphBackend(razn.unit_model("scale1", razn.build_resnet18_fcn(
                self.classes.n_classes, c.razn.size, c.razn.width)))
            reference = lambda i: scale1.predict(x0[i:i + 1])  # noqa: E731
            unit = backends["segmentation"]
            feed = {"x0": x0, "x1": x1}
            if len(design.views) == 1:
                run = lambda i: unit.predict(feed[design.views[0]][i:i + 1])  # noqa: E731
            else:
                run = lambda i: unit.predict({k: v[i:i + 1] for k, v in feed.items()})  # noqa: E731
        ref, seconds = time_interleaved([reference, run], len(x0))
        rel = seconds / ref.mean()
        if design.unit is None:
            extra["seconds_zoomed"] = float(seconds[zoomed].mean()) if zoomed.any() else None
            extra["seconds_not_zoomed"] = float(seconds[~zoomed].mean()) if (~zoomed).any() else None
        return {"mean": float(rel.mean()), "sd": float(rel.std(ddof=1)) if len(rel) > 1 else 0.0,
                "regions": int(len(rel)), "seconds_mean": float(seconds.mean()),
                "scale1_seconds_mean": float(ref.mean()), **extra}

    def relative_flops(self, design: Design, zoom_fraction: float | None = None) -> float:
        """FLOPs per region relative to Scale 1's (RAZN: at the test set's zoom fraction)."""
        from h2g.models import razn

        c = self.config
        n = self.classes.n_classes
        fcn = razn.flops(razn.build_resnet18_fcn(n, c.razn.size, c.razn.width))
        if design.unit is None:
            policy = razn.flops(razn.build_policy(c.razn.size, c.razn.width))
            z = zoom_fraction or 0.0
            return (policy + fcn * (z * ZOOM_RATE ** 2 + (1 - z))) / fcn
        if design.unit == "attention":
            unit = razn.unit_model("attention", razn.build_resnet18_fcn(n, c.razn.size, c.razn.width),
                                   attention_width=c.razn.attention_width)
            head = razn.flops(unit) - fcn  # the attention head's convolutions
            return (fcn * (1 + ZOOM_RATE ** 2) + head) / fcn
        return {"scale1": 1.0, "scale2": float(ZOOM_RATE ** 2), "ms": float(1 + ZOOM_RATE ** 2)}[design.unit]

    # ------------------------------------------------------------------ a design
    def run(self, design: Design) -> dict:
        """Train (or reuse), evaluate and time ``design``; writes ``OUT/<design>/``."""
        c = self.config
        folder = self.out / design.name
        stage = self.model_stage(design)
        segmenter = self.segmenter(design, stage)
        zoom_maps, counts = [], {"zoomed": 0, "regions": 0}

        def raster_of(record):  # the raster, keeping the zoom decisions
            with open_slide(record.slide_path, mpp=record.mpp) as slide:
                seg = segmenter.segment(slide)
            if seg.zoom is not None:
                counts["zoomed"] += int(seg.zoom.zoomed.sum())
                counts["regions"] += len(seg.zoom.zoomed)
                if len(zoom_maps) < c.eval.figure_slides:
                    zoom_maps.append((record.slide_id, seg.raster.label_map(fill=-1),
                                      seg.zoom.zoom_map(seg.raster.shape)))
            return seg.raster

        pooled, rows, unevaluated, examples = self.score_test_slides(design, raster_of)
        zoomed, regions = counts["zoomed"], counts["regions"]
        zoom_fraction = zoomed / regions if design.unit is None and regions else None
        timing = self.relative_time(design, segmenter.backends)
        resolution = f"the label maps' grid (downsample {c.patches.annotation_downsample:g})"
        result = self.class_result(
            folder, design, pooled, rows, unevaluated, resolution, examples,
            weighted_iou=metrics.weighted_iou(pooled, "frequency"),
            inverse_weighted_iou=metrics.weighted_iou(pooled, "inverse"), relative_time=timing,
            relative_flops=self.relative_flops(design, zoom_fraction), zoom_fraction=zoom_fraction)
        if design.unit is None:
            models = {n: (stage.dir / f"{n}.keras", self.metadata(design, n)) for n in RAZN_MODELS}
        else:
            models = {"segmenter": (stage.dir / "unit.keras", self.metadata(design, "segmentation"))}
        result["models"] = self.save_models(folder, models)
        if zoom_maps:
            zoom_figure(folder / "zoom.png", zoom_maps, self.classes)
        write_text(folder / "table1.md", table1_markdown([result]))
        return self.write_result(folder, design, result)

    def after_designs(self, designs, results):
        order = [d.name for d in DESIGNS.values() if d.name in results]
        write_text(Path(self.out) / "razn_table1.md", table1_markdown([results[n] for n in order]))
        super().after_designs(designs, results)


class _GraphBackend:
    """A Keras model called through one traced ``tf.function`` (graph mode): for timing,
    where an eager call's Python overhead would hide the networks' cost."""

    def __init__(self, model):
        import tensorflow as tf

        self.model, self.source = model, model.name
        self._call = tf.function(lambda feed: model(feed, training=False), reduce_retracing=True)

    def predict(self, feed):
        return np.asarray(self._call(feed))


def zoom_figure(path: Path, rows: list, classes) -> Path:
    """PNG, one row per slide: RAZN's predicted label map (class colours) and where its
    policy zoomed (red: zoomed, blue: coarse, white: no region)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    colours = np.array([colour_rgb(c) for c in classes.colours], float) / 255
    fig = Figure(figsize=(6, 3 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (slide_id, labels, zoom), (left, right) in zip(rows, axes):
        image = np.ones(labels.shape + (3,))
        image[labels >= 0] = colours[labels[labels >= 0]]
        left.imshow(image)
        right.imshow(np.ma.masked_invalid(zoom), cmap=ListedColormap(["#3060c0", "#d03030"]), vmin=0, vmax=1)
        left.set_ylabel(slide_id)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("prediction")
    axes[0, 1].set_title("zoomed (red) / coarse (blue)")
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def table1_markdown(results: list[dict]) -> str:
    """The paper's Table 1 from designs' metrics: per-class IoU, mIoU, weighted IoU,
    relative inference time (mean ± sd over regions) and relative FLOPs."""
    names = list(results[0]["classes"])
    head = ["Design", *names, "mIoU", "Weighted IoU (freq.)", "Weighted IoU (inv. freq.)",
            "Relative inference time", "Relative FLOPs", "Zoomed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ious = [f"{r['classes'][n]['iou']:.3f}" if r["classes"][n]["present"] else "n/a" for n in names]
        t = r["relative_time"]
        zoom = f"{100 * r['zoom_fraction']:.0f} %" if r.get("zoom_fraction") is not None else "-"
        label = collapse.flagged_label(r["label"], {"collapsed": r.get("collapsed"), **r.get("collapse", {})})
        lines.append("| " + " | ".join([label, *ious, f"{r['mean_iou']:.3f}", f"{r['weighted_iou']:.3f}",
                                        f"{r['inverse_weighted_iou']:.3f}", f"{t['mean']:.2f} ± {t['sd']:.2f}",
                                        f"{r['relative_flops']:.2f}", zoom]) + " |")
    return "\n".join(lines) + "\n"


run_designs = Pipeline.run_designs
