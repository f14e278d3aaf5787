"""H2G-Net's stages and how its designs chain them.

cluster model (V) -> patch classifier (III-IX) -> heatmaps of every slide -> refinement
net (II, VI-IX) -> test predictions -> metrics.  Each stage is a
:class:`h2g.core.stages.Stage` that declares what it reads (config sections, the data key,
upstream stages, the architecture), so ``--design all`` trains Mob-PW once and reuses
its heatmaps for the four refinement designs, and changing e.g. ``refine.epochs``
retrains only the refiners.  A design's test slides are predicted by H2G-Net's deployed
segmenter (:class:`h2g.systems.h2g.segmenter.H2GSegmenter`, over Keras backends) on the
cached heatmaps; Otsu's baseline by :func:`h2g.tiling.tissue.otsu_tissue`.

Each design's results go to ``OUT/<design>/``: ``metrics.json`` and ``config.json``
(written together, last), ``per_slide.csv``, tables, figures and copies of the models it
used.  Besides the paper's figures at threshold 0.5, ``metrics.json`` and
``thresholds.md`` hold the Dice at thresholds 0.1-0.9 and the pixel AUC of the
probability maps (:func:`h2g.evaluation.tables.threshold_sweep`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from h2g.core.atomic import replace_atomically, save_npz
from h2g.core.errors import ConfigError
from h2g.core.stages import Stage
from h2g.evaluation import collapse, figures, metrics, tables
from h2g.inference.metadata import h2g_patch_metadata, h2g_refinement_metadata
from h2g.io.overlay import write_heatmap_overlay
from h2g.io.slide import open_slide
from h2g.systems import base
from h2g.systems.h2g.designs import Design, Kind
from h2g.systems.h2g.segmenter import H2GSegmenter, options_from_config
from h2g.tiling.tissue import otsu_tissue

log = logging.getLogger("h2g")

# The paper trains AGU-Net, DAGU-Net and DoubleU-Net with deep supervision (all outputs
# at full resolution, equal weights); inference keeps only the final "segmentation" output.
DEEP_SUPERVISED = ("agunet", "dagunet", "doubleunet")


@dataclass
class Pipeline(base.Pipeline):
    """The stages of H2G-Net's designs over one manifest, cached under ``out/_cache``."""

    system_label: ClassVar[str] = "H2G-Net"

    def __post_init__(self):
        super().__post_init__()
        self._samples: dict[tuple, list] = {}

    def _slide(self, record):
        return open_slide(record.slide_path, mpp=record.mpp)

    def split_sampler(self, split: str):
        c = self.config.patches
        return self.sampler(split, self.records(split), training=split == "train", magnification=c.magnification,
                            patch_size=c.patch_size, tissue_threshold=c.tissue_threshold)

    def segmenter(self, classifier: Path | None = None, refiner: Path | None = None) -> H2GSegmenter:
        """H2G-Net's segmenter over Keras models of this run's stages, with its settings."""
        backends = {role: self.keras_backend(path) for role, path in (("patch_classifier", classifier),
                                                                       ("refinement", refiner)) if path is not None}
        return H2GSegmenter(backends, options_from_config(self.config.to_dict()), metadata=dict.fromkeys(backends))

    def _patch_data(self, split: str, batch_size: int, *, training: bool, n_batches=None, augment=None, start_batch=0,
                    shard=None):
        from h2g.data.dataset import patch_dataset

        c = self.config
        return patch_dataset(
            self.split_sampler(split),
            batch_size=batch_size,
            training=training,
            augment=augment,
            start_batch=start_batch,
            n_batches=n_batches,
            readers=c.sampler.readers,
            magnification=c.patches.magnification,
            patch_size=c.patches.patch_size,
            shard=shard,
        )

    # ------------------------------------------------------------------ stages
    def cluster_stage(self) -> Stage:
        """Fit VGG16 features -> z-score -> PCA -> k-means on sampler batches (train)."""
        import keras

        from h2g.training import clustering

        c = self.config
        stage = self.stage("cluster", ("cluster", "patches", "sampler"))
        if stage.done:
            return stage
        stage.prepare(resume=False)
        log.info("fitting the k-means cluster model -> %s", stage.dir)
        ds = self._patch_data("train", c.cluster.batch_size, training=False, n_batches=c.cluster.n_batches)
        batches = (x.numpy() for x, _ in tqdm(ds, total=c.cluster.n_batches, desc="cluster features"))
        # seeded: without ImageNet weights (the smoke preset) VGG16 is randomly initialised,
        # and unseeded its features, clusters and the CWCE classifier changed from run to run
        keras.utils.set_random_seed(c.seed)
        extractor = clustering.vgg16_extractor(weights=c.cluster.weights, input_size=c.cluster.feature_size)
        stats = clustering.fit_clusterer(batches, extractor, n_clusters=c.cluster.n_clusters, variance=c.cluster.variance, seed=c.seed)
        stats.save(stage.dir / "cluster_stats.npz")
        model = clustering.build_cluster_model(stats, extractor)
        replace_atomically(stage.dir / "cluster_model.keras", model.save)
        stage.finish({"n_components": int(stats.n_components), "n_clusters": c.cluster.n_clusters})
        return stage

    def classifier_stage(self, design: Design) -> Stage:
        """Train a patch classifier (designs III-IX) on the hierarchical sampler."""
        import keras

        from h2g import models
        from h2g.data.augment import ClassifierAugmentConfig, classifier_augmenter
        from h2g.training import distribute, losses
        from h2g.training import fit as training

        c = self.config
        cluster = self.cluster_stage() if design.cluster_guided else None
        stage = self.training_stage("classifier", ("classifier", "patches", "sampler"), upstream={"cluster": cluster},
                                    architecture=design.classifier, cluster_guided=design.cluster_guided)
        if stage.done:
            return stage
        resumed = stage.prepare(self.resume)
        log.info("training %s patch classifier%s -> %s", design.classifier,
                 " with CWCE" if design.cluster_guided else "", stage.dir)
        keras.utils.set_random_seed(c.seed)
        kw = {"weights": c.classifier.weights}
        if design.classifier == "mobilenetv2":
            kw["alpha"] = c.classifier.alpha
        else:
            kw["width"] = c.classifier.inception_width
        with distribute.scope(self.strategy):
            classifier = models.build(design.classifier, **kw)
            if c.classifier.bn_momentum is not None:
                models.set_batchnorm_momentum(classifier, c.classifier.bn_momentum)
            if design.cluster_guided:
                cluster_model = keras.models.load_model(cluster.dir / "cluster_model.keras")
                model = losses.cluster_guided(classifier, cluster_model)
                loss = losses.CWCELoss(n_classes=2)
            else:
                model, loss = classifier, "categorical_crossentropy"
        augment = classifier_augmenter(ClassifierAugmentConfig()) if c.classifier.augment else None
        result = training.fit(
            model,
            lambda start, shard=None: self._patch_data("train", c.classifier.batch_size, training=True, augment=augment,
                                                       start_batch=start, shard=shard),
            self._patch_data("val", c.classifier.batch_size, training=False, n_batches=c.classifier.val_batches),
            loss=loss,
            run_dir=stage.dir,
            epochs=c.classifier.epochs,
            steps_per_epoch=c.classifier.train_batches,
            learning_rate=c.classifier.learning_rate,
            accumulation_steps=c.classifier.accumulation_steps,
            patience=c.classifier.patience,
            resume=resumed,
            seed=c.seed,
            strategy=self.strategy,
        )
        # fit restored the best weights into the model; under a strategy its variables are
        # distributed (its predict would gather every worker's batches), so load a plain copy
        best = model if self.strategy is None else keras.models.load_model(result.best_model_path)
        best = losses.unwrap_classifier(best)
        self.save_stage_model(stage.dir / "classifier.keras", best)
        val = training.evaluate_classifier(best, self._patch_data("val", c.classifier.batch_size, training=False, n_batches=c.classifier.val_batches))
        stage.finish({"validation": val})
        return stage

    def heatmap_stage(self, classifier: Stage) -> Stage:
        """Whole-slide heatmaps of every slide of the manifest (one ``.npz`` per slide,
        written atomically, so an interrupted stage resumes at the next slide), made by
        the deployed segmenter's patch stage."""
        c = self.config
        stage = self.stage("heatmaps", ("patches",), seeded=False, upstream={"classifier": classifier},
                           stride=c.heatmap.stride)
        if stage.done:
            return stage
        stage.prepare(resume=True)
        segmenter = self.segmenter(classifier=classifier.dir / "classifier.keras")
        for record in tqdm(list(self.manifest), desc="heatmaps", unit="slide"):
            target = stage.dir / f"{record.slide_id}.npz"
            if target.is_file():
                continue
            slide = self._slide(record)
            heat = segmenter.heatmap(slide, tissue=self.tissue(slide))
            write_heatmap_overlay(stage.dir / f"{record.slide_id}.png", slide, heat.probs)
            save_npz(target, probs=heat.probs, step=heat.step, n_patches=heat.n_patches)
        stage.finish({"classifier": str(classifier.dir), "slides": len(self.manifest.records)})
        return stage

    def cached_heatmap(self, heatmaps: Stage, record):
        """``record``'s heatmap from the heatmap stage (its patch count from the file, or
        from its non-zero cells for a stage written before counts were kept)."""
        from h2g.inference.heatmap import Heatmap

        data = np.load(heatmaps.dir / f"{record.slide_id}.npz")
        probs = data["probs"]
        count = int(data["n_patches"]) if "n_patches" in data else int(np.count_nonzero(probs))
        return Heatmap(probs=probs, step=int(data["step"]), n_patches=count)

    def samples(self, split: str, heatmaps: Stage | None) -> list:
        """Refinement-resolution samples (image, heatmap, mask) of one split.  Training
        and validation slides without an annotation are left out with a warning (a
        split left with none is a :class:`ConfigError`); test slides without one keep
        ``mask=None`` and are reported as unevaluated."""
        from h2g.inference.lowres import refinement_inputs
        from h2g.systems.h2g.refinement import RefinementSample, target_mask

        key = (split, heatmaps.key if heatmaps else None)
        if key in self._samples:
            return self._samples[key]
        c = self.config
        records = self.records(split)
        unannotated = [r.slide_id for r in records if r.annotation_path is None]
        if unannotated and split != "test":
            log.warning("%s slide(s) without an annotation left out of refinement %s: %s",
                        len(unannotated), "training" if split == "train" else "validation", ", ".join(unannotated))
            records = [r for r in records if r.annotation_path is not None]
            if not records:
                raise ConfigError(f"{self.manifest_path}: no {split} slide has an annotation; refinement "
                                  f"networks need annotated {split} slides")
        out = []
        for record in records:
            slide = self._slide(record)
            heat = self.cached_heatmap(heatmaps, record) if heatmaps is not None else None
            image, heatmap = refinement_inputs(slide, heat, size=c.refine.size)
            mask = (target_mask(record.annotation_path, slide, c.refine.size, c.patches.annotation_downsample,
                                required=split == "test") if record.annotation_path else None)
            out.append(RefinementSample(record.slide_id, record.grade, image, heatmap, mask))
        self._samples[key] = out
        return out

    def refiner_stage(self, design: Design, heatmaps: Stage | None) -> Stage:
        """Train a refinement network (VI-IX) or the low-resolution U-Net (II)."""
        import keras

        from h2g import models
        from h2g.data.augment import RefinementAugmentConfig, refinement_augmenter
        from h2g.systems.h2g.refinement import refinement_dataset
        from h2g.training import distribute, losses
        from h2g.training import fit as training

        c = self.config
        stage = self.training_stage("refiner", ("refine", "patches"), upstream={"heatmaps": heatmaps},
                                    architecture=design.refiner)
        if stage.done:
            return stage
        resumed = stage.prepare(self.resume)
        log.info("training %s refinement -> %s", design.refiner, stage.dir)
        keras.utils.set_random_seed(c.seed)
        with_heatmap = heatmaps is not None
        train, val = self.samples("train", heatmaps), self.samples("val", heatmaps)
        kw = {"deep_supervision": True} if design.refiner in DEEP_SUPERVISED else {}
        with distribute.scope(self.strategy):
            model = models.build(design.refiner, input_size=c.refine.size, width=c.refine.width, **kw)
            if c.refine.bn_momentum is not None:
                models.set_batchnorm_momentum(model, c.refine.bn_momentum)
        augment = refinement_augmenter(RefinementAugmentConfig()) if c.refine.augment else None
        steps = c.refine.steps_per_epoch or max(1, int(np.ceil(len(train) / c.refine.batch_size)))
        loss = losses.dice_loss if c.refine.loss == "dice" else "categorical_crossentropy"
        n_outputs = len(model.outputs)
        if n_outputs > 1:  # deep supervision: every output is full resolution, same target
            loss = [loss] * n_outputs
        result = training.fit(
            model,
            lambda start, shard=None: refinement_dataset(
                train, batch_size=c.refine.batch_size, seed=c.seed, with_heatmap=with_heatmap, augment=augment,
                start_batch=start, n_outputs=n_outputs, shard=shard),
            refinement_dataset(val, batch_size=c.refine.batch_size, seed=c.seed, with_heatmap=with_heatmap,
                               training=False, n_outputs=n_outputs),
            loss=loss,
            run_dir=stage.dir,
            epochs=c.refine.epochs,
            steps_per_epoch=steps,
            learning_rate=c.refine.learning_rate,
            accumulation_steps=c.refine.accumulation_steps,
            patience=c.refine.patience,
            resume=resumed,
            seed=c.seed,
            strategy=self.strategy,
        )
        # fit restored the best weights
        self.save_stage_model(stage.dir / "refiner.keras", models.inference_model(model))
        stage.finish({"best_epoch": result.best_epoch, "best_value": result.best_value})
        return stage

    # ------------------------------------------------------------------ designs
    def predictions(self, design: Design) -> tuple[list, dict]:
        """Test-slide tumour probability maps at the refinement resolution, and the
        models the design used ({role: path})."""
        used: dict[str, Path] = {}
        heatmaps = None
        if design.needs_heatmaps:
            classifier = self.classifier_stage(design)
            used["patch_classifier"] = classifier.dir / "classifier.keras"
            heatmaps = self.heatmap_stage(classifier)
        samples = self.samples("test", heatmaps)
        if design.refiner is not None:
            used["refiner"] = self.refiner_stage(design, heatmaps).dir / "refiner.keras"
        if design.kind == Kind.OTSU:  # (I): Otsu's tissue mask of the low-resolution image (tissue, not tumour)
            probs = [otsu_tissue((s.image * 255).round().astype(np.uint8)).astype(np.float32) for s in samples]
        else:  # (II-IX): the deployed segmenter on the cached heatmaps
            segmenter = self.segmenter(used.get("patch_classifier"), used.get("refiner"))
            by_id = {r.slide_id: r for r in self.records("test")}
            probs = [segmenter.segment(self._slide(by_id[s.slide_id]), heatmap=self.cached_heatmap(
                heatmaps, by_id[s.slide_id]) if heatmaps is not None else None).prob for s in samples]
        return list(zip(samples, probs)), used

    def _metadata(self, design: Design, role: str):
        """What deployment needs to run a model of ``design`` (the sidecar
        ``<model>.meta.json``, embedded into the ONNX / OpenVINO files by export)."""
        c = self.config
        if role == "patch_classifier":
            return h2g_patch_metadata(c.patches.patch_size, c.patches.magnification, design=design.name,
                                      heatmap_stride=c.heatmap.stride)
        return h2g_refinement_metadata(c.refine.size, heatmap=design.needs_heatmaps, design=design.name,
                                       heatmap_stride=c.heatmap.stride)

    def run(self, design: Design) -> dict:
        """Run ``design``; writes ``OUT/<design>/``: metrics.json and config.json
        (together, at the end), tables, figures and the models it used."""
        c = self.config
        folder = self.out / design.name
        pairs, used = self.predictions(design)
        rows, unevaluated, swept, aucs = [], [], [], []
        for sample, prob in pairs:
            if sample.mask is None:
                unevaluated.append(sample.slide_id)
                continue
            m = metrics.segmentation_metrics(metrics.binarise(prob, c.eval.threshold), sample.mask)
            rows.append({"design": design.label, "slide_id": sample.slide_id, "grade": sample.grade, **m})
            swept.append(metrics.dice_by_threshold(prob, sample.mask, tables.SWEEP_THRESHOLDS))
            aucs.append(metrics.roc_auc(prob, sample.mask))
        if unevaluated:
            log.warning("%s: %d test slide(s) without an annotation are not evaluated: %s",
                        design.name, len(unevaluated), ", ".join(unevaluated))
        if not rows:
            raise ConfigError(f"{self.manifest_path}: no test slide has an annotation; nothing to evaluate")
        summary = tables.metrics_summary(rows, design.label)
        sweep = tables.threshold_sweep(swept, aucs)
        result = self.result(design, n_test_slides=summary["n_test_slides"], resolution=[c.refine.size] * 2,
                             unevaluated=unevaluated,
                             **{k: v for k, v in summary.items() if k not in ("design", "n_test_slides")},
                             dice_by_slide={r["slide_id"]: r["dice"] for r in rows}, threshold_sweep=sweep,
                             threshold=c.eval.threshold)
        collapse.mark(result, collapse.from_masks((metrics.binarise(p, c.eval.threshold), s.mask) for s, p in pairs
                                                  if s.mask is not None), rows, design.label)
        folder.mkdir(parents=True, exist_ok=True)
        tables.write_tables(folder, rows, [design.label], resolution=c.refine.size)
        tables.write_threshold_table(folder, {design.label: sweep})
        result["models"] = self.save_models(folder, {role: (path, self._metadata(design, role))
                                                     for role, path in used.items()})
        figure_rows = [
            (s.slide_id, s.image, s.mask, s.heatmap[..., 0] if design.needs_heatmaps else None,
             metrics.binarise(p, c.eval.threshold))
            for s, p in pairs[: c.eval.figure_slides]
        ]
        figures.figure_grid(folder / "examples.png", figure_rows)
        self.rows.extend(rows)
        return self.write_result(folder, design, result)


run_designs = Pipeline.run_designs
