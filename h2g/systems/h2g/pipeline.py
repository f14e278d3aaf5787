"""Runs designs end to end: every stage a design needs, with stage outputs cached under a
key hashed from their inputs so that ``--design all`` trains Mob-PW once and reuses its
heatmaps for the four refinement designs.

Stage outputs live in ``OUT/_cache/<stage>-<key>/`` with a ``done.json`` written last; a
folder without it is an interrupted stage, resumed with ``resume=True`` or started
afresh otherwise.  Each design's results go to ``OUT/<design>/``: ``config.json``,
``metrics.json``, ``per_slide.csv``, tables, figures and copies of the models it used.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from h2g.core.atomic import write_json
from h2g.core.config import Config, file_hash, stable_hash
from h2g.evaluation import figures, metrics, tables
from h2g.io.manifest import Manifest, SlideRecord, load_manifest
from h2g.io.slide import open_slide
from h2g.systems.h2g.designs import Design

log = logging.getLogger("h2g")

# The paper trains AGU-Net, DAGU-Net and DoubleU-Net with deep supervision (all outputs
# at full resolution, equal weights); inference keeps only the final "segmentation" output.
DEEP_SUPERVISED = ("agunet", "dagunet", "doubleunet")




@dataclass
class Stage:
    """A cached stage folder."""

    root: Path
    name: str
    key: str

    @property
    def dir(self) -> Path:
        return self.root / "_cache" / f"{self.name}-{self.key}"

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    def prepare(self, resume: bool) -> bool:
        """Make the folder; returns whether an interrupted run is resumed."""
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        existed = self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        return existed and resume

    def finish(self, info: dict) -> None:
        write_json(self.dir / "done.json", info)

    def info(self) -> dict:
        return json.loads((self.dir / "done.json").read_text())


@dataclass
class Pipeline:
    manifest_path: Path
    out: Path
    config: Config
    resume: bool = False
    manifest: Manifest = field(init=False)

    def __post_init__(self):
        self.manifest_path = Path(self.manifest_path)
        self.out = Path(self.out)
        self.manifest = load_manifest(self.manifest_path)
        self.manifest_key = self._data_key()
        self.rows: list[dict] = []  # per-slide test metrics of every design run so far
        self._samplers: dict[str, object] = {}
        self._samples: dict[tuple, list] = {}

    # ------------------------------------------------------------------ helpers
    def _data_key(self) -> str:
        """Identifies the data: the manifest's bytes and each slide's and mask's size and
        modification time (a slide rewritten in place invalidates every cached stage)."""
        files = []
        for record in self.manifest:
            for path in (record.slide_path, record.annotation_path):
                if path is not None:
                    stat = Path(path).stat()
                    files.append((str(path), stat.st_size, stat.st_mtime_ns))
        return stable_hash(file_hash(self.manifest_path), files)

    def records(self, split: str) -> list[SlideRecord]:
        return self.manifest.split(split)

    def _slide(self, record: SlideRecord):
        return open_slide(record.slide_path, mpp=record.mpp)

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
            )
            seed = c.seed if split == "train" else c.seed + 7919
            self._samplers[split] = HierarchicalSampler(sources, stages=c.sampler.stages, seed=seed)
        return self._samplers[split]

    def _patch_data(self, split: str, batch_size: int, *, training: bool, n_batches=None, augment=None, start_batch=0):
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
        )

    # ------------------------------------------------------------------ stages
    def cluster_model(self) -> Path:
        """Fit VGG16 features -> z-score -> PCA -> k-means on sampler batches (train)."""
        from h2g.training import clustering

        c = self.config
        stage = Stage(self.out, "cluster", stable_hash("cluster", self.manifest_key, c.cluster, c.patches, c.sampler, c.seed))
        if stage.done:
            return stage.dir / "cluster_model.keras"
        stage.prepare(resume=False)
        log.info("fitting the k-means cluster model -> %s", stage.dir)
        ds = self._patch_data("train", c.cluster.batch_size, training=False, n_batches=c.cluster.n_batches)
        batches = (x.numpy() for x, _ in tqdm(ds, total=c.cluster.n_batches, desc="cluster features"))
        extractor = clustering.vgg16_extractor(weights=c.cluster.weights, input_size=c.cluster.feature_size)
        stats = clustering.fit_clusterer(batches, extractor, n_clusters=c.cluster.n_clusters, variance=c.cluster.variance, seed=c.seed)
        stats.save(stage.dir / "cluster_stats.npz")
        model = clustering.build_cluster_model(stats, extractor)
        model.save(stage.dir / "cluster_model.keras")
        stage.finish({"n_components": int(stats.n_components), "n_clusters": c.cluster.n_clusters})
        return stage.dir / "cluster_model.keras"

    def classifier(self, design: Design) -> Path:
        """Train a patch classifier (designs III-IX) on the hierarchical sampler."""
        import keras

        from h2g import models
        from h2g.data.augment import ClassifierAugmentConfig, classifier_augmenter
        from h2g.training import fit as training
        from h2g.training import losses

        c = self.config
        cluster_path = self.cluster_model() if design.cluster_guided else None
        cluster_key = file_hash(cluster_path) if cluster_path else None
        key = stable_hash("classifier", design.classifier, design.cluster_guided, cluster_key,
                          self.manifest_key, c.classifier, c.patches, c.sampler, c.seed)
        stage = Stage(self.out, "classifier", key)
        if stage.done:
            return stage.dir / "classifier.keras"
        resumed = stage.prepare(self.resume)
        log.info("training %s patch classifier%s -> %s", design.classifier,
                 " with CWCE" if design.cluster_guided else "", stage.dir)
        keras.utils.set_random_seed(c.seed)
        kw = {"weights": c.classifier.weights}
        if design.classifier == "mobilenetv2":
            kw["alpha"] = c.classifier.alpha
        else:
            kw["width"] = c.classifier.inception_width
        classifier = models.build(design.classifier, **kw)
        if c.classifier.bn_momentum is not None:
            models.set_batchnorm_momentum(classifier, c.classifier.bn_momentum)
        augment = classifier_augmenter(ClassifierAugmentConfig()) if c.classifier.augment else None
        if design.cluster_guided:
            cluster_model = keras.models.load_model(cluster_path)
            model = losses.cluster_guided(classifier, cluster_model)
            loss = losses.CWCELoss(n_classes=2)
        else:
            model, loss = classifier, "categorical_crossentropy"
        result = training.fit(
            model,
            lambda start: self._patch_data("train", c.classifier.batch_size, training=True, augment=augment, start_batch=start),
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
        )
        best = keras.models.load_model(result.best_model_path)
        if design.cluster_guided:
            best = losses.unwrap_classifier(best)
        best.save(stage.dir / "classifier.keras")
        val = training.evaluate_classifier(best, self._patch_data("val", c.classifier.batch_size, training=False, n_batches=c.classifier.val_batches))
        stage.finish({"validation": val})
        return stage.dir / "classifier.keras"

    def heatmaps(self, classifier_path: Path) -> Path:
        """Whole-slide heatmaps of every slide of the manifest, cached by model hash."""
        import keras

        from h2g.inference.backends import make_backend
        from h2g.inference.heatmap import slide_heatmap

        c = self.config
        stage = Stage(self.out, "heatmaps", stable_hash("heatmaps", file_hash(classifier_path), self.manifest_key, c.patches))
        if stage.done:
            return stage.dir
        stage.prepare(resume=True)
        backend = make_backend(keras.models.load_model(classifier_path), engine="keras")
        for record in tqdm(list(self.manifest), desc="heatmaps"):
            target = stage.dir / f"{record.slide_id}.npz"
            if target.is_file():
                continue
            heat = slide_heatmap(
                self._slide(record), backend,
                magnification=c.patches.magnification, patch_size=c.patches.patch_size,
                batch_size=c.heatmap.batch_size, readers=c.heatmap.readers, progress=False,
            )
            np.savez_compressed(target, probs=heat.probs, step=heat.step)
            _save_overlay(stage.dir / f"{record.slide_id}.png", self._slide(record), heat.probs)
        stage.finish({"classifier": str(classifier_path), "slides": len(self.manifest.records)})
        return stage.dir

    def samples(self, split: str, heatmap_dir: Path | None) -> list:
        """Refinement-resolution samples (image, heatmap, mask) of one split."""
        from h2g.inference.heatmap import Heatmap
        from h2g.inference.lowres import refinement_inputs
        from h2g.systems.h2g.refinement import RefinementSample, target_mask

        key = (split, str(heatmap_dir))
        if key in self._samples:
            return self._samples[key]
        size = self.config.refine.size
        out = []
        for record in self.records(split):
            slide = self._slide(record)
            if heatmap_dir is not None:
                data = np.load(heatmap_dir / f"{record.slide_id}.npz")
                heat = Heatmap(probs=data["probs"], step=int(data["step"]))
            else:
                heat = None
            image, heatmap = refinement_inputs(slide, heat, size=size)
            mask = target_mask(record.annotation_path, slide, size, self.config.patches.annotation_downsample) if record.annotation_path else None
            out.append(RefinementSample(record.slide_id, record.grade, image, heatmap, mask))
        self._samples[key] = out
        return out

    def refiner(self, design: Design, heatmap_dir: Path | None) -> Path:
        """Train a refinement network (VI-IX) or the low-resolution U-Net (II)."""
        import keras

        from h2g import models
        from h2g.data.augment import RefinementAugmentConfig, refinement_augmenter
        from h2g.systems.h2g.refinement import refinement_dataset
        from h2g.training import fit as training
        from h2g.training import losses

        c = self.config
        heat_key = heatmap_dir.name if heatmap_dir else None
        stage = Stage(self.out, "refiner", stable_hash("refiner", design.refiner, heat_key, self.manifest_key, c.refine, c.seed))
        if stage.done:
            return stage.dir / "refiner.keras"
        resumed = stage.prepare(self.resume)
        log.info("training %s refinement -> %s", design.refiner, stage.dir)
        keras.utils.set_random_seed(c.seed)
        with_heatmap = heatmap_dir is not None
        train, val = self.samples("train", heatmap_dir), self.samples("val", heatmap_dir)
        kw = {"deep_supervision": True} if design.refiner in DEEP_SUPERVISED else {}
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
            lambda start: refinement_dataset(train, batch_size=c.refine.batch_size, seed=c.seed, with_heatmap=with_heatmap,
                                             augment=augment, start_batch=start, n_outputs=n_outputs),
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
        )
        models.inference_model(model).save(stage.dir / "refiner.keras")  # fit restored the best weights
        stage.finish({"best_epoch": result.best_epoch, "best_value": result.best_value})
        return stage.dir / "refiner.keras"

    # ------------------------------------------------------------------ designs
    def predictions(self, design: Design) -> tuple[list, dict]:
        """Test-slide tumour probability maps at the refinement resolution, and the
        models the design used."""
        import keras

        from h2g.systems.h2g.refinement import predict
        from h2g.tiling.tissue import otsu_tissue

        used: dict[str, Path] = {}
        heatmap_dir = None
        if design.needs_heatmaps:
            used["patch_classifier"] = self.classifier(design)
            heatmap_dir = self.heatmaps(used["patch_classifier"])
        samples = self.samples("test", heatmap_dir)
        if design.kind == "otsu":
            probs = [otsu_tissue((s.image * 255).round().astype(np.uint8)).astype(np.float32) for s in samples]
        elif design.kind == "patchwise":
            probs = [s.heatmap[..., 0] for s in samples]
        else:
            used["refiner"] = self.refiner(design, heatmap_dir)
            model = keras.models.load_model(used["refiner"])
            probs = predict(model, samples, with_heatmap=heatmap_dir is not None)
        return list(zip(samples, probs)), used

    def run(self, design: Design) -> dict:
        c = self.config
        folder = self.out / design.name
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", {"design": design.name, "manifest": str(self.manifest_path), **c.to_dict()})
        pairs, used = self.predictions(design)
        rows = []
        for sample, prob in pairs:
            if sample.mask is None:
                continue
            m = metrics.segmentation_metrics(metrics.binarise(prob, c.eval.threshold), sample.mask)
            rows.append({"design": design.label, "slide_id": sample.slide_id, "grade": sample.grade, **m})
        summary = tables.metrics_summary(rows, design.label)
        result = {
            **summary,
            "design": design.name,
            "label": design.label,
            "preset": c.preset,
            "seed": c.seed,
            "resolution": [c.refine.size, c.refine.size],
            "threshold": c.eval.threshold,
            "models": {k: str(v) for k, v in used.items()},
            "config": c.to_dict(),
        }
        write_json(folder / "metrics.json", result)
        tables.write_tables(folder, rows, [design.label], resolution=c.refine.size)
        models_dir = folder / "models"
        for role, path in used.items():
            models_dir.mkdir(exist_ok=True)
            shutil.copyfile(path, models_dir / f"{role}.keras")
        figure_rows = [
            (s.slide_id, s.image, s.mask, s.heatmap[..., 0] if design.needs_heatmaps else None, metrics.binarise(p, c.eval.threshold))
            for s, p in pairs[: c.eval.figure_slides]
        ]
        figures.figure_grid(folder / "examples.png", figure_rows)
        self.rows.extend(rows)
        return result


def _save_overlay(path: Path, slide, probs: np.ndarray) -> None:
    """PNG of the heatmap over the slide's thumbnail."""
    from matplotlib import cm
    from PIL import Image

    thumb = Image.fromarray(slide.read_level(slide.level_count - 1))
    heat = Image.fromarray((cm.inferno(probs)[..., :3] * 255).astype(np.uint8)).resize(thumb.size, Image.NEAREST)
    Image.blend(thumb.convert("RGB"), heat, 0.45).save(path)


def run_designs(designs: list[Design], manifest_path: Path, out: Path, config: Config, resume: bool = False) -> dict[str, dict]:
    """Run each design; with more than one, also write the combined tables."""
    pipe = Pipeline(manifest_path, out, config, resume=resume)
    results = {d.name: pipe.run(d) for d in designs}
    if len(designs) > 1:
        tables.write_tables(Path(out), pipe.rows, [d.label for d in designs], resolution=config.refine.size,
                                tukey_designs=[d.label for d in designs if d.deep_learning])
        figures.dice_boxplot(Path(out) / "dice_boxplot.png", pipe.rows)
    return results
