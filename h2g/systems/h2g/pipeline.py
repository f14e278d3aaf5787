"""H2G-Net's stages and how its designs chain them.

cluster model (V) -> patch classifier (III-IX) -> heatmaps of every slide -> refinement
net (II, VI-IX) -> test predictions -> metrics.  Each stage is a
:class:`h2g.core.stages.Stage` that declares what it reads (config sections, the data key,
upstream stages, the architecture), so ``--design all`` trains Mob-PW once and reuses
its heatmaps for the four refinement designs, and changing e.g. ``refine.epochs``
retrains only the refiners.  How a design turns its test samples into tumour
probabilities is its kind's entry in :data:`PREDICTORS`.

Each design's results go to ``OUT/<design>/``: ``metrics.json`` and ``config.json``
(written together, last), ``per_slide.csv``, tables, figures and copies of the models it
used.  Besides the paper's figures at threshold 0.5, ``metrics.json`` and
``thresholds.md`` hold the Dice at thresholds 0.1-0.9 and the pixel AUC of the
probability maps (:func:`h2g.evaluation.tables.threshold_sweep`).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from h2g.core.atomic import replace_atomically, save_npz, write_json
from h2g.core.config import Config
from h2g.core.errors import ConfigError
from h2g.core.stages import Stage, data_key
from h2g.evaluation import figures, metrics, tables
from h2g.export.metadata import (
    h2g_patch_metadata,
    h2g_refinement_metadata,
    write_sidecar,
)
from h2g.io.manifest import Manifest, SlideRecord, load_manifest
from h2g.io.overlay import write_heatmap_overlay
from h2g.io.slide import open_slide
from h2g.systems.h2g.designs import Design
from h2g.tiling.tissue import detect_tissue, otsu_tissue

log = logging.getLogger("h2g")

# The paper trains AGU-Net, DAGU-Net and DoubleU-Net with deep supervision (all outputs
# at full resolution, equal weights); inference keeps only the final "segmentation" output.
DEEP_SUPERVISED = ("agunet", "dagunet", "doubleunet")


@dataclass
class Pipeline:
    """The stages of H2G-Net's designs over one manifest, cached under ``out/_cache``."""

    manifest_path: Path
    out: Path
    config: Config
    resume: bool = False
    strategy: object = None  # a tf.distribute strategy for the training stages (h2g.training.distribute)
    manifest: Manifest = field(init=False)

    def __post_init__(self):
        self.manifest_path = Path(self.manifest_path)
        self.out = Path(self.out)
        self.manifest = load_manifest(self.manifest_path)
        self.data = data_key(self.manifest)
        self.rows: list[dict] = []  # per-slide test metrics of every design run so far
        self._samplers: dict[str, object] = {}
        self._samples: dict[tuple, list] = {}

    # ------------------------------------------------------------------ helpers
    def records(self, split: str) -> list[SlideRecord]:
        return self.manifest.split(split)

    def _slide(self, record: SlideRecord):
        return open_slide(record.slide_path, mpp=record.mpp)

    def _stage(self, name: str, sections: tuple[str, ...], *, seeded: bool = True, upstream=None, **params) -> Stage:
        return Stage(self.out, name, config=self.config, sections=sections, seeded=seeded, data=self.data,
                     upstream=upstream or {}, params=params)

    def _tissue(self, slide):
        c = self.config.patches
        return detect_tissue(slide, magnification=c.tissue_magnification, saturation_threshold=c.saturation_threshold)

    def sampler(self, split: str):
        if split not in self._samplers:
            from h2g.data.sampler import HierarchicalSampler, build_sources

            c = self.config
            sources = build_sources(
                self.records(split),
                magnification=c.patches.magnification,
                patch_size=c.patches.patch_size,
                tissue_threshold=c.patches.tissue_threshold,
                tumour_threshold=c.patches.tumour_threshold,
                tissue_magnification=c.patches.tissue_magnification,
                saturation_threshold=c.patches.saturation_threshold,
                annotation_downsample=c.patches.annotation_downsample,
                classes=self.manifest.classes,
            )
            seed = c.seed if split == "train" else c.seed + 7919
            self._samplers[split] = HierarchicalSampler(sources, stages=c.sampler.stages, seed=seed)
        return self._samplers[split]

    def _training_stage(self, name: str, sections: tuple[str, ...], *, upstream=None, **params) -> Stage:
        """A stage that trains a network: its key also names the distribution strategy
        (nothing for one device, so single-device keys are those of earlier versions)."""
        from h2g.training import distribute

        return self._stage(name, sections, upstream=upstream, **params, **distribute.describe(self.strategy))

    def _patch_data(self, split: str, batch_size: int, *, training: bool, n_batches=None, augment=None, start_batch=0,
                    shard=None):
        from h2g.data.dataset import patch_dataset

        c = self.config
        return patch_dataset(
            self.sampler(split),
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
        from h2g.training import clustering

        c = self.config
        stage = self._stage("cluster", ("cluster", "patches", "sampler"))
        if stage.done:
            return stage
        stage.prepare(resume=False)
        log.info("fitting the k-means cluster model -> %s", stage.dir)
        ds = self._patch_data("train", c.cluster.batch_size, training=False, n_batches=c.cluster.n_batches)
        batches = (x.numpy() for x, _ in tqdm(ds, total=c.cluster.n_batches, desc="cluster features"))
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
        stage = self._training_stage("classifier", ("classifier", "patches", "sampler"), upstream={"cluster": cluster},
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
        best = keras.models.load_model(result.best_model_path)
        if design.cluster_guided:
            best = losses.unwrap_classifier(best)
        replace_atomically(stage.dir / "classifier.keras", best.save)
        val = training.evaluate_classifier(best, self._patch_data("val", c.classifier.batch_size, training=False, n_batches=c.classifier.val_batches))
        stage.finish({"validation": val})
        return stage

    def heatmap_stage(self, classifier: Stage) -> Stage:
        """Whole-slide heatmaps of every slide of the manifest (one ``.npz`` per slide,
        written atomically, so an interrupted stage resumes at the next slide)."""
        import keras

        from h2g.inference.backends import make_backend
        from h2g.inference.heatmap import slide_heatmap

        c = self.config
        stage = self._stage("heatmaps", ("patches",), seeded=False, upstream={"classifier": classifier},
                            stride=c.heatmap.stride)
        if stage.done:
            return stage
        stage.prepare(resume=True)
        backend = make_backend(keras.models.load_model(classifier.dir / "classifier.keras"), engine="keras")
        for record in tqdm(list(self.manifest), desc="heatmaps", unit="slide"):
            target = stage.dir / f"{record.slide_id}.npz"
            if target.is_file():
                continue
            slide = self._slide(record)
            heat = slide_heatmap(
                slide, backend, tissue=self._tissue(slide), tissue_threshold=c.patches.tissue_threshold,
                magnification=c.patches.magnification, patch_size=c.patches.patch_size,
                stride=c.heatmap.stride, batch_size=c.heatmap.batch_size, readers=c.heatmap.readers, progress=False,
            )
            write_heatmap_overlay(stage.dir / f"{record.slide_id}.png", slide, heat.probs)
            save_npz(target, probs=heat.probs, step=heat.step)
        stage.finish({"classifier": str(classifier.dir), "slides": len(self.manifest.records)})
        return stage

    def samples(self, split: str, heatmaps: Stage | None) -> list:
        """Refinement-resolution samples (image, heatmap, mask) of one split.  Training
        and validation slides without an annotation are left out with a warning (a
        split left with none is a :class:`ConfigError`); test slides without one keep
        ``mask=None`` and are reported as unevaluated."""
        from h2g.inference.heatmap import Heatmap
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
            if heatmaps is not None:
                data = np.load(heatmaps.dir / f"{record.slide_id}.npz")
                heat = Heatmap(probs=data["probs"], step=int(data["step"]))
            else:
                heat = None
            image, heatmap = refinement_inputs(slide, heat, size=c.refine.size)
            mask = (target_mask(record.annotation_path, slide, c.refine.size, c.patches.annotation_downsample)
                    if record.annotation_path else None)
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
        stage = self._training_stage("refiner", ("refine", "patches"), upstream={"heatmaps": heatmaps},
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
        replace_atomically(stage.dir / "refiner.keras", models.inference_model(model).save)
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
        probs = PREDICTORS[design.kind](samples, used.get("refiner"))
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
        result = {
            **summary,
            "threshold_sweep": sweep,
            "design": design.name,
            "system": design.system,
            "label": design.label,
            "preset": c.preset,
            "seed": c.seed,
            "resolution": [c.refine.size, c.refine.size],
            "threshold": c.eval.threshold,
            "unevaluated_slides": unevaluated,
            "models": {k: str(v) for k, v in used.items()},
            "config": c.to_dict(),
        }
        folder.mkdir(parents=True, exist_ok=True)
        tables.write_tables(folder, rows, [design.label], resolution=c.refine.size)
        tables.write_threshold_table(folder, {design.label: sweep})
        models_dir = folder / "models"
        for role, path in used.items():
            models_dir.mkdir(exist_ok=True)
            replace_atomically(models_dir / f"{role}.keras", lambda tmp, src=path: shutil.copyfile(src, tmp))
            write_sidecar(models_dir / f"{role}.keras", self._metadata(design, role))
        figure_rows = [
            (s.slide_id, s.image, s.mask, s.heatmap[..., 0] if design.needs_heatmaps else None, metrics.binarise(p, c.eval.threshold))
            for s, p in pairs[: c.eval.figure_slides]
        ]
        figures.figure_grid(folder / "examples.png", figure_rows)
        write_json(folder / "config.json", {"design": design.name, "system": design.system,
                                            "manifest": str(self.manifest_path), **c.to_dict()})
        write_json(folder / "metrics.json", result)
        self.rows.extend(rows)
        return result


# ---------------------------------------------------------------------- predictors
def _predict_otsu(samples, _refiner) -> list[np.ndarray]:
    """(I): Otsu's tissue mask of the low-resolution image (tissue, not tumour)."""
    return [otsu_tissue((s.image * 255).round().astype(np.uint8)).astype(np.float32) for s in samples]


def _predict_patchwise(samples, _refiner) -> list[np.ndarray]:
    """(III-V): the heatmap itself, at the refinement resolution."""
    return [s.heatmap[..., 0] for s in samples]


def _predict_refined(samples, refiner: Path) -> list[np.ndarray]:
    """(II, VI-IX): the refinement / low-resolution network, through the same backend
    and :func:`h2g.inference.lowres.refine` as deployment."""
    from h2g.inference.backends import KerasBackend
    from h2g.inference.lowres import refine

    backend = KerasBackend(refiner)
    with_heatmap = "heatmap" in backend.input_names
    return [refine(backend, s.image, s.heatmap if with_heatmap else None) for s in samples]


PREDICTORS = {"otsu": _predict_otsu, "patchwise": _predict_patchwise, "lowres": _predict_refined,
              "refined": _predict_refined}


def run_designs(designs: list[Design], manifest_path: Path, out: Path, config: Config,
                resume: bool = False, strategy=None) -> tuple[dict[str, dict], list[dict]]:
    """Run each design over one pipeline (shared stages run once); returns the designs'
    metrics and every per-slide test row (the registry writes the combined tables).
    ``strategy``: a ``tf.distribute`` strategy for the training stages."""
    pipe = Pipeline(manifest_path, out, config, resume=resume, strategy=strategy)
    results = {d.name: pipe.run(d) for d in designs}
    return results, pipe.rows
