"""DMMN's stages over one manifest (Ho et al., Section II), cached under ``out/_cache``.

- **Samples** (Section II-B): the hierarchical sampler draws 256 px target patches at
  20x from the grid of each training slide (patches with more than ``min_labelled``
  annotated pixels, labelled by their majority class, so the class stage balances
  classes); each sample is three co-centred views - ``x20`` (the target patch), ``x10``
  (the centre 512 px of the 1024 px input region, downsampled x2) and ``x5`` (the whole
  region, x4) - and the target is the label map of ``x20`` (255 = unannotated).
- **Training** (Section II-E): weighted cross-entropy, ``w_c = 1 - N_c / sum_k N_k`` with
  ``N_c`` the annotated pixels of class ``c`` in the training patches as the class-balanced
  sampler draws them (the paper's balanced set of patches), unannotated pixels weight 0;
  SGD (lr 5e-5, momentum 0.99, weight decay 1e-4) in the ``paper`` preset; the epoch with the best validation mean IoU is kept.  Augmentation: flips,
  rotations, elastic deformation, hue / saturation and brightness / contrast
  (:func:`h2g.data.augment.multiview_augmenter`).
- **Inference** (Section II-F): sliding window over the slide at 20x with stride 256, the
  three views of each window read around its centre (reflection beyond the slide),
  each window's 256 px prediction stitched into a class-probability raster
  (:func:`h2g.inference.sliding.sliding_segmentation`, the same code as deployment).
  Windows are placed over detected tissue (the paper skips Otsu on TNBC; its margins
  experiment uses it): pixels no window covered count as ``glass`` (or ``background``)
  when the class table has such a class, else they are not scored.
- **Evaluation**: per class IoU, Dice, recall, precision and mean IoU over the test
  slides' (full) label maps at the label maps' resolution, plus H2G-Net's binary tumour
  recall / precision / Dice per slide, so DMMN rows sit in the H2G-Net tables.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from h2g.core.errors import ConfigError
from h2g.core.stages import Stage
from h2g.data.views import View
from h2g.evaluation import metrics
from h2g.io.classes import IGNORE
from h2g.io.slide import open_slide
from h2g.systems import base
from h2g.systems.dmmn.designs import Design

log = logging.getLogger("h2g")

VIEW_NAMES = ("x20", "x10", "x5")
#: Target patches whose label pixels give the class weights (:meth:`Pipeline.class_weights`).
WEIGHT_DRAWS = 1024
BACKGROUND_NAMES = metrics.BACKGROUND_NAMES  # the class of pixels no window covered, when the table has one


@dataclass
class Pipeline(base.Pipeline):
    """DMMN's stages over one manifest."""

    system_label: ClassVar[str] = "DMMN"

    def __post_init__(self):
        super().__post_init__()
        mags = self.config.dmmn.magnifications
        if len(mags) != 3 or not mags[0] > mags[1] > mags[2] > 0:
            raise ConfigError(f"dmmn.magnifications must be three decreasing magnifications, got {mags}")

    # ------------------------------------------------------------------ data
    def views(self, design: Design) -> tuple[View, ...]:
        c = self.config.dmmn
        every = {name: View(name, float(m), c.size) for name, m in zip(VIEW_NAMES, c.magnifications)}
        return tuple(every[name] for name in design.views)

    def split_sampler(self, split: str):
        c = self.config.dmmn
        return self.sampler(split, self._annotated(split), training=split == "train", magnification=c.magnifications[0],
                            patch_size=c.size, tissue_threshold=c.tissue_threshold, min_labelled=c.min_labelled)

    def _data(self, design: Design, split: str, *, training: bool, start_batch: int = 0, n_batches=None,
              shard=None):
        from h2g.data.augment import multiview_augmenter
        from h2g.data.dataset import sample_dataset

        c = self.config
        sampler = self.split_sampler(split)
        sampled = {source.slide_id for source in sampler.sources}
        annotations = {r.slide_id: self.annotation(r) for r in self._annotated(split) if r.slide_id in sampled}
        return sample_dataset(
            sampler, self.views(design), target="pixels", target_view="x20",
            batch_size=c.dmmn.batch_size, training=training,
            augment=multiview_augmenter() if training and c.dmmn.augment else None,
            start_batch=start_batch, n_batches=n_batches, readers=c.sampler.readers,
            n_classes=self.classes.n_classes, annotations=annotations, shard=shard)

    def class_weights(self) -> np.ndarray:
        """``w_c = 1 - N_c / sum_k N_k`` over the annotated pixels of the training patches
        as the sampler draws them (the paper's "training set" is its class-balanced set of
        patches): the first :data:`WEIGHT_DRAWS` target patches of the training stream.
        Counted over the whole label maps instead, the weights balanced a second time what
        the sampler's class stage had already balanced; with two classes ``1 - N_c / N`` is
        the full inverse frequency (a binary mask is mostly non-tumour glass and stroma:
        weights 0.15 / 0.85), and DSMN-S2 on a binary manifest called everything tumour."""
        from h2g.data.readers import sampled_label_counts
        from h2g.training.losses import class_weights_from_counts

        c = self.config
        sampler = self.split_sampler("train")
        annotations = {r.slide_id: self.annotation(r) for r in self._annotated("train")}
        target = View("x20", float(c.dmmn.magnifications[0]), c.dmmn.size)
        counts = sampled_label_counts(sampler, target, annotations, n_classes=self.classes.n_classes,
                                      batch_size=c.dmmn.batch_size,
                                      n_batches=-(-WEIGHT_DRAWS // c.dmmn.batch_size))
        if counts.sum() == 0:
            raise ConfigError(f"{self.manifest_path}: the training patches have no annotated pixel")
        return class_weights_from_counts(counts)

    # ------------------------------------------------------------------ stages
    def model_stage(self, design: Design) -> Stage:
        """Train ``design``'s network; ``model.keras`` (best validation mIoU)."""
        import keras

        from h2g import models
        from h2g.training import distribute, losses
        from h2g.training import fit as training

        c = self.config
        stage = self.training_stage("dmmn", ("dmmn", "patches", "sampler"), architecture=design.architecture,
                                    classes=list(self.classes.names), class_weights="sampled")
        if stage.done:
            return stage
        resumed = stage.prepare(self.resume)
        log.info("training %s -> %s", design.label, stage.dir)
        weights = self.class_weights()
        keras.utils.set_random_seed(c.seed)
        with distribute.scope(self.strategy):
            model = models.build(design.architecture, n_classes=self.classes.n_classes, input_size=c.dmmn.size,
                                 width=c.dmmn.width)
        n = self.classes.n_classes
        metric = keras.metrics.MeanIoU(num_classes=n, sparse_y_true=True, sparse_y_pred=False,
                                       ignore_class=IGNORE, name="miou")
        monitor, mode = ("val_miou", "max") if self.strategy is None else ("val_loss", "min")
        result = training.fit(
            model,
            lambda start, shard=None: self._data(design, "train", training=True, start_batch=start, shard=shard),
            self._data(design, "val", training=False, n_batches=c.dmmn.val_batches),
            loss=losses.WeightedCrossEntropy(weights.tolist(), ignore=IGNORE),
            metrics=[metric] if self.strategy is None else None,
            run_dir=stage.dir, epochs=c.dmmn.epochs, steps_per_epoch=c.dmmn.train_batches,
            learning_rate=c.dmmn.learning_rate, accumulation_steps=c.dmmn.accumulation_steps,
            optimizer=c.dmmn.optimizer, momentum=c.dmmn.momentum, weight_decay=c.dmmn.weight_decay,
            monitor=monitor, mode=mode, patience=c.dmmn.patience, resume=resumed, seed=c.seed,
            strategy=self.strategy,
        )
        self.save_stage_model(stage.dir / "model.keras", models.inference_model(model))
        stage.finish({"best_epoch": result.best_epoch, "best_value": result.best_value, "monitor": monitor,
                      "class_weights": weights.tolist()})
        return stage

    def metadata(self, design: Design):
        from h2g.inference.metadata import ModelMetadata

        return ModelMetadata(system="dmmn", design=design.name, role="segmentation", views=self.views(design),
                             classes=self.classes.metadata_classes(), output="pixel_probs",
                             extras={"target": "x20", "stride": self.config.dmmn.stride})

    # ------------------------------------------------------------------ inference / evaluation
    def segmenter(self, design: Design, model_path: Path):
        """The design's model as deployment runs it (:class:`h2g.inference.segmenter.SlidingSegmenter`)
        with the run's stride and tissue detection."""
        from h2g.inference.segmenter import SlidingSegmenter, WindowOptions

        c = self.config
        options = WindowOptions(stride=c.dmmn.stride, batch_size=c.dmmn.inference_batch, readers=c.sampler.readers,
                                tissue_magnification=c.patches.tissue_magnification,
                                saturation_threshold=c.patches.saturation_threshold)
        return SlidingSegmenter({"segmentation": self.keras_backend(model_path)}, options,
                                metadata={"segmentation": self.metadata(design)})

    def run(self, design: Design) -> dict:
        """Train (or reuse) and evaluate ``design``; writes ``OUT/<design>/``: metrics.json
        and config.json (together, at the end), class tables, binary tables, the model."""
        c = self.config
        folder = self.out / design.name
        model_path = self.model_stage(design).dir / "model.keras"
        segmenter = self.segmenter(design, model_path)

        def raster_of(record):
            with open_slide(record.slide_path, mpp=record.mpp) as slide:
                return segmenter.segment(slide).raster

        pooled, rows, unevaluated, examples = self.score_test_slides(design, raster_of)
        resolution = f"the label maps' grid (downsample {c.patches.annotation_downsample:g})"
        result = self.class_result(folder, design, pooled, rows, unevaluated, resolution, examples)
        result["models"] = self.save_models(folder, {"segmenter": (model_path, self.metadata(design))})
        return self.write_result(folder, design, result)


run_designs = Pipeline.run_designs
