"""What every system's pipeline shares: one manifest with its class table and data key,
its slides' annotations read once, the stages' cache, the one sampler factory (with one
seed policy), a test slide's scores, and the tail of a design's run (its models with
their metadata, ``config.json`` and, last, ``metrics.json``).

A system's ``Pipeline`` subclasses :class:`Pipeline` (dataclass fields ``manifest_path,
out, config, resume, strategy``), calls ``super().__post_init__()`` first, names itself
in :attr:`Pipeline.system_label`, implements :meth:`Pipeline.run` for one design and, when
several designs of the system run together, :meth:`Pipeline.after_designs` for their
combined tables.  Its runner is :meth:`Pipeline.run_designs`.

Seed policy (every system): a sampler that draws training batches is seeded with the
run's seed, one that draws validation batches with the seed + :data:`VALIDATION_SEED`, so
the two streams never coincide and a design's validation batches do not depend on its
training.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Mapping

from h2g.core.atomic import replace_atomically, write_json
from h2g.core.config import Config
from h2g.core.errors import ConfigError
from h2g.core.numerics import numerics_host
from h2g.core.stages import Stage, data_key
from h2g.evaluation import collapse, metrics, tables
from h2g.io.classes import IGNORE
from h2g.io.manifest import Manifest, SlideRecord, load_manifest

log = logging.getLogger("h2g")
#: Added to the run's seed for the samplers of validation batches.
VALIDATION_SEED = 7919


def _model_key(path) -> tuple:
    """A model file's key in :meth:`Pipeline.keras_backend`'s cache: the resolved path and
    its modification time (None while the file does not exist)."""
    path = Path(path)
    return path.resolve(), path.stat().st_mtime_ns if path.is_file() else None


@dataclass
class Pipeline:
    """A system's stages over one manifest, cached under ``out/_cache``."""

    manifest_path: Path
    out: Path
    config: Config
    resume: bool = False
    strategy: object = None  # a tf.distribute strategy for the training stages (h2g.training.distribute)
    cache: Path | None = None  # the folder of the stages' _cache/ (default: out; several seeds' runs share one)
    manifest: Manifest = field(init=False)

    system_label: ClassVar[str] = "this system"

    def __post_init__(self):
        self.manifest_path = Path(self.manifest_path)
        self.out = Path(self.out)
        self.cache = Path(self.cache) if self.cache is not None else self.out
        self.manifest = load_manifest(self.manifest_path)
        self.classes = self.manifest.classes
        self.data = data_key(self.manifest)
        self.rows: list[dict] = []  # per-slide test rows of every design run so far
        self.scores: dict = {}  # design label -> pooled metrics.ClassScores (label-map systems)
        self._samplers: dict = {}
        self._annotations: dict = {}
        self._backends: dict[tuple, object] = {}  # (path, mtime) -> KerasBackend: each model file loaded once

    # ------------------------------------------------------------------ models
    def keras_backend(self, path: Path):
        """A Keras backend of the model file ``path``, loaded once per pipeline (designs that
        share a stage's model, and the stages that read it after training, share it; 1-3 s
        a load).  Keyed by the file's modification time too, so a rewritten file is reloaded."""
        from h2g.inference.backends import KerasBackend

        key = _model_key(path)
        if key not in self._backends:
            self._backends[key] = KerasBackend(path)
        return self._backends[key]

    def save_stage_model(self, path: Path, model) -> None:
        """Save a stage's ``model`` to ``path`` (atomically) and serve it from memory to
        whatever reads ``path`` through :meth:`keras_backend` next: the weights the file
        holds, without loading it back.  Not under a strategy: a distributed model's predict
        gathers every worker's batches, so it is read back from the file."""
        from h2g.inference.backends import KerasBackend

        replace_atomically(path, model.save)
        if self.strategy is None:
            self._backends[_model_key(path)] = KerasBackend(model)

    # ------------------------------------------------------------------ runs
    @classmethod
    def run_designs(cls, designs: list, manifest_path: Path, out: Path, config: Config, resume: bool = False,
                    strategy=None, cache: Path | None = None) -> tuple[dict[str, dict], list[dict]]:
        """Run each design over one pipeline (shared stages run once); returns the designs'
        metrics and every per-slide test row (the registry writes the combined tables).
        ``cache``: the stages' cache root (default ``out``)."""
        pipe = cls(manifest_path, out, config, resume=resume, strategy=strategy, cache=cache)
        results = {d.name: pipe.run(d) for d in designs}
        if len(designs) > 1:
            pipe.after_designs(designs, results)
        return results, pipe.rows

    def run(self, design) -> dict:
        """Train (or reuse), evaluate and save ``design``; writes ``OUT/<design>/``."""
        raise NotImplementedError

    def after_designs(self, designs: list, results: dict) -> None:
        """Several of this system's designs ran: their combined tables (default: the
        per-class tables of the label-map systems, when they have scores)."""
        if self.scores:
            tables.write_class_tables(self.out, self.scores, stem=f"{designs[0].system}_class_tables")

    # ------------------------------------------------------------------ slides
    def records(self, split: str) -> list[SlideRecord]:
        """The manifest's slides of ``split``."""
        return self.manifest.split(split)

    def annotation(self, record: SlideRecord):
        """``record``'s annotation (:class:`h2g.io.annotation.Annotation`: a mask, label
        map or polygon file) in the manifest's class table, read once per run; a test
        slide's may not be empty (an :class:`~h2g.core.errors.AnnotationError`), a
        training slide's empty one is unannotated, with a warning."""
        from h2g.io.annotation import load_annotation
        from h2g.io.slide import open_slide

        key = (record.slide_id, str(record.annotation_path))
        if key not in self._annotations:
            slide = open_slide(record.slide_path, mpp=record.mpp)
            self._annotations[key] = load_annotation(
                record.annotation_path, slide, downsample=self.config.patches.annotation_downsample,
                classes=self.classes, required=record.split == "test")
        return self._annotations[key]

    def _annotated(self, split: str) -> list[SlideRecord]:
        """The slides of ``split`` (:meth:`records`) that have an annotation; a
        :class:`ConfigError` when none has."""
        records = [r for r in self.records(split) if r.annotation_path is not None]
        if not records:
            raise ConfigError(f"{self.manifest_path}: no {split} slide has an annotation; {self.system_label} needs "
                              f"annotated {split} slides")
        return records

    def tissue(self, slide):
        """The slide's tissue mask with the config's detection settings."""
        from h2g.tiling.tissue import detect_tissue

        c = self.config.patches
        return detect_tissue(slide, magnification=c.tissue_magnification, saturation_threshold=c.saturation_threshold)

    # ------------------------------------------------------------------ stages
    def stage(self, name: str, sections: tuple[str, ...], *, seeded: bool = True, upstream=None, **params) -> Stage:
        """A cached stage of this pipeline's manifest (:class:`h2g.core.stages.Stage`)."""
        return Stage(self.cache, name, config=self.config, sections=sections, seeded=seeded, data=self.data,
                     upstream=upstream or {}, params=params)

    def training_stage(self, name: str, sections: tuple[str, ...], *, upstream=None, **params) -> Stage:
        """A stage that trains a network: its key also names the distribution strategy
        (nothing for one device, so single-device keys are those of earlier versions)."""
        from h2g.training import distribute

        return self.stage(name, sections, upstream=upstream, **params, **distribute.describe(self.strategy))

    # ------------------------------------------------------------------ sampling
    def sampler(self, key: str, records: list[SlideRecord], *, training: bool, magnification: float,
                patch_size: int, tissue_threshold: float, min_labelled: float | None = None,
                class_weights: Callable | None = None, progress: bool = True):
        """The hierarchical sampler over ``records`` (built once per ``key``): patch grids at
        ``magnification`` / ``patch_size`` with the config's tissue detection, tumour
        threshold and annotation downsample, the manifest's classes, ``sampler.stages``,
        seeded by the module's seed policy (``training``: the run's seed; else the seed +
        :data:`VALIDATION_SEED`).  ``class_weights(sources) -> weights`` (optional) sets
        the class stage's weights from the grids built."""
        if key not in self._samplers:
            from h2g.data.sampler import HierarchicalSampler, build_sources

            c = self.config
            extra = {} if min_labelled is None else {"min_labelled": min_labelled}
            sources = build_sources(
                records, magnification=magnification, patch_size=patch_size, tissue_threshold=tissue_threshold,
                tumour_threshold=c.patches.tumour_threshold, tissue_magnification=c.patches.tissue_magnification,
                saturation_threshold=c.patches.saturation_threshold,
                annotation_downsample=c.patches.annotation_downsample, classes=self.classes, progress=progress,
                **extra)
            seed = c.seed if training else c.seed + VALIDATION_SEED
            weights = class_weights(sources) if class_weights is not None else None
            self._samplers[key] = HierarchicalSampler(sources, stages=c.sampler.stages, seed=seed,
                                                      class_weights=weights)
        return self._samplers[key]

    def annotated_pixels(self, records) -> "np.ndarray":  # noqa: F821
        """Annotated pixels per class over ``records``' label maps (ignored pixels left out)."""
        import numpy as np

        counts = np.zeros(self.classes.n_classes, np.int64)
        for record in records:
            labels = self.annotation(record).labels
            counts += np.bincount(labels[labels != IGNORE].ravel(), minlength=len(counts))[: len(counts)]
        return counts

    # ------------------------------------------------------------------ evaluation
    def slide_scores(self, label: str, record: SlideRecord, raster):
        """One test slide's probability ``raster`` against its label map
        (:func:`h2g.evaluation.metrics.raster_labels`): its Table 1 row (design ``label``,
        slide, grade, mean IoU and the binary tumour recall / precision / Dice when the
        class table has a tumour class), its :class:`~h2g.evaluation.metrics.ClassScores`
        (to pool over the test set) and the predicted and true label maps."""
        pred, truth = metrics.raster_labels(raster, self.annotation(record), self.classes.names)
        scores = metrics.class_metrics(pred, truth, self.classes, ignore=IGNORE)
        row = {"design": label, "slide_id": record.slide_id, "grade": record.grade, "mean_iou": scores.mean_iou}
        tumour = self.classes.tumour_index
        if tumour is not None:
            row.update(metrics.tumour_scores(scores.confusion, tumour))
        return row, scores, pred, truth

    def test_records(self, design) -> tuple[list[SlideRecord], list[str]]:
        """The test slides that have an annotation, and the ids of those that have none
        (named in a warning); none annotated is a :class:`ConfigError`."""
        records = self.records("test")
        scored = [r for r in records if r.annotation_path is not None]
        unevaluated = [r.slide_id for r in records if r.annotation_path is None]
        if unevaluated:
            log.warning("%s: %d test slide(s) without an annotation are not evaluated: %s",
                        design.name, len(unevaluated), ", ".join(unevaluated))
        if not scored:
            raise ConfigError(f"{self.manifest_path}: no test slide has an annotation; nothing to evaluate")
        return scored, unevaluated

    def score_test_slides(self, design, raster_of: Callable[[SlideRecord], object]):
        """Every annotated test slide's ``raster_of(record)`` scored by
        :meth:`slide_scores`: ``(pooled ClassScores, Table 1 rows, unevaluated slide ids,
        examples)``, the examples being the first ``eval.figure_slides`` ``(slide id,
        pred, truth)``."""
        from tqdm.auto import tqdm

        records, unevaluated = self.test_records(design)
        pooled, rows, examples = None, [], []
        for record in tqdm(records, desc=f"{design.name} test slides", unit="slide"):
            row, scores, pred, truth = self.slide_scores(design.label, record, raster_of(record))
            pooled = scores if pooled is None else pooled + scores
            rows.append(row)
            if len(examples) < self.config.eval.figure_slides:
                examples.append((record.slide_id, pred, truth))
        return pooled, rows, unevaluated, examples

    @staticmethod
    def class_entries(pooled) -> dict:
        """``{class: {iou, dice, recall, precision, present}}`` of pooled class scores."""
        return {name: {"iou": float(pooled.iou[i]), "dice": float(pooled.dice[i]),
                       "recall": float(pooled.recall[i]), "precision": float(pooled.precision[i]),
                       "present": bool(pooled.present[i])}
                for i, name in enumerate(pooled.names)}

    # ------------------------------------------------------------------ a design's results
    def result(self, design, *, n_test_slides: int, resolution, unevaluated: list[str], **fields) -> dict:
        """A design's ``metrics.json`` content: who it is, the preset, seed and config, and
        the system's ``fields``."""
        c = self.config
        return {"design": design.name, "system": design.system, "label": design.label, "preset": c.preset,
                "seed": c.seed, "n_test_slides": n_test_slides, **fields, "resolution": resolution,
                "unevaluated_slides": unevaluated, "config": c.to_dict()}

    def class_result(self, folder: Path, design, pooled, rows: list[dict], unevaluated: list[str],
                     resolution: str, examples: list | None = None, **fields) -> dict:
        """The result of a label-map design (mean IoU, per class scores, mean IoU by slide
        and the ``fields``), its class tables, its Table 1 rows (with a tumour class) and
        its example figure; ``self.scores`` keeps its pooled scores for the combined tables.
        The collapse check of the pooled test predictions (:mod:`h2g.evaluation.collapse`)
        goes into the result and the rows (so every table flags it), with a warning."""
        from h2g.evaluation import figures

        folder.mkdir(parents=True, exist_ok=True)
        self.scores[design.label] = pooled
        tables.write_class_tables(folder, {design.label: pooled})
        result = self.result(design, n_test_slides=len(rows), resolution=resolution, unevaluated=unevaluated,
                             **{"mean_iou": pooled.mean_iou, "classes": self.class_entries(pooled),
                                "mean_iou_by_slide": {r["slide_id"]: r["mean_iou"] for r in rows}, **fields})
        collapse.mark(result, collapse.from_confusion(pooled.confusion, self.classes.names), rows, design.label)
        if self.classes.tumour_index is not None:
            summary = tables.metrics_summary(rows, design.label)
            result.update({k: v for k, v in summary.items() if k != "design"})
            result["dice_by_slide"] = {r["slide_id"]: r["dice"] for r in rows}
            tables.write_tables(folder, rows, [design.label], resolution=resolution)
            self.rows.extend(rows)
        if examples:
            figures.label_map_grid(folder / "examples.png", examples, self.classes)
        return result

    def save_models(self, folder: Path, models: Mapping[str, tuple[Path, object]]) -> dict[str, str]:
        """Copy each ``{name: (model file, metadata)}`` to ``folder/models/<name>.keras``
        with its metadata sidecar (what export reads); ``{name: path}``."""
        from h2g.inference.metadata import write_sidecar

        models_dir = folder / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        saved = {}
        for name, (source, meta) in models.items():
            target = models_dir / f"{name}.keras"
            replace_atomically(target, lambda tmp, src=source: shutil.copyfile(src, tmp))
            write_sidecar(target, meta)
            saved[name] = str(target)
        return saved

    def write_result(self, folder: Path, design, result: dict) -> dict:
        """``config.json`` (design, system, manifest, the config and the machine's part of the
        numbers, :func:`~h2g.core.numerics.numerics_host`) and, last,
        ``metrics.json`` (``result``) into ``folder``; returns ``result``."""
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", {"design": design.name, "system": design.system,
                                            "manifest": str(self.manifest_path), **self.config.to_dict(),
                                            "machine": numerics_host()})
        write_json(folder / "metrics.json", result)
        return result
