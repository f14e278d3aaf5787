"""What the pipelines of the label-map systems (DMMN, m-UNet, RAZN) share: one manifest
with its class table and data key, its slides' label maps read once, the annotated
slides of a split, a test slide's scores, and the per-slide rows and pooled class scores
a run collects.

A system's ``Pipeline`` subclasses :class:`LabelledPipeline` (same dataclass fields:
``manifest_path, out, config, resume, strategy``), calls ``super().__post_init__()``
first, and names itself in :attr:`system_label` for its error messages.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from h2g.core.atomic import write_json
from h2g.core.config import Config
from h2g.core.errors import ConfigError
from h2g.evaluation import metrics, tables
from h2g.io.classes import IGNORE
from h2g.core.stages import data_key
from h2g.io.manifest import Manifest, SlideRecord, load_manifest

log = logging.getLogger("h2g")


@dataclass
class LabelledPipeline:
    """A system's stages over one manifest whose slides have label maps."""

    manifest_path: Path
    out: Path
    config: Config
    resume: bool = False
    strategy: object = None
    manifest: Manifest = field(init=False)

    system_label: ClassVar[str] = "this system"

    def __post_init__(self):
        self.manifest_path = Path(self.manifest_path)
        self.out = Path(self.out)
        self.manifest = load_manifest(self.manifest_path)
        self.classes = self.manifest.classes
        self.data = data_key(self.manifest)
        self.rows: list[dict] = []  # per-slide test rows of every design run so far
        self.scores: dict = {}  # design label -> pooled metrics.ClassScores
        self._samplers: dict = {}
        self._annotations: dict = {}

    def records(self, split: str) -> list[SlideRecord]:
        """The manifest's slides of ``split``."""
        return self.manifest.split(split)

    def annotation(self, record: SlideRecord):
        """``record``'s label map (:class:`h2g.io.annotation.Annotation`) in the manifest's
        class table, read once per run."""
        from h2g.io.annotation import load_annotation
        from h2g.io.slide import open_slide

        key = (record.slide_id, str(record.annotation_path))
        if key not in self._annotations:
            slide = open_slide(record.slide_path, mpp=record.mpp)
            self._annotations[key] = load_annotation(
                record.annotation_path, slide, downsample=self.config.patches.annotation_downsample,
                classes=self.classes)
        return self._annotations[key]

    def _annotated(self, split: str) -> list[SlideRecord]:
        """The slides of ``split`` (:meth:`records`) that have a label map; a
        :class:`ConfigError` when none has."""
        records = [r for r in self.records(split) if r.annotation_path is not None]
        if not records:
            raise ConfigError(f"{self.manifest_path}: no {split} slide has an annotation; {self.system_label} needs "
                              f"annotated {split} slides")
        return records

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

    def score_test_slides(self, design, raster_of: Callable[[SlideRecord], object]):
        """Every annotated test slide's ``raster_of(record)`` scored by
        :meth:`slide_scores`: ``(pooled ClassScores, Table 1 rows, unevaluated slide ids,
        examples)``, the examples being the first ``eval.figure_slides`` ``(slide id,
        pred, truth)``.
        Test slides without a label map are named in a warning; none annotated is a
        :class:`ConfigError`."""
        from tqdm.auto import tqdm

        pooled, rows, unevaluated, examples = None, [], [], []
        for record in tqdm(self.records("test"), desc=f"{design.name} test slides", unit="slide"):
            if record.annotation_path is None:
                unevaluated.append(record.slide_id)
                continue
            row, scores, pred, truth = self.slide_scores(design.label, record, raster_of(record))
            pooled = scores if pooled is None else pooled + scores
            rows.append(row)
            if len(examples) < self.config.eval.figure_slides:
                examples.append((record.slide_id, pred, truth))
        if unevaluated:
            log.warning("%s: %d test slide(s) without an annotation are not evaluated: %s",
                        design.name, len(unevaluated), ", ".join(unevaluated))
        if not rows:
            raise ConfigError(f"{self.manifest_path}: no test slide has an annotation; nothing to evaluate")
        return pooled, rows, unevaluated, examples

    @staticmethod
    def class_entries(pooled) -> dict:
        """``{class: {iou, dice, recall, precision, present}}`` of pooled class scores."""
        return {name: {"iou": float(pooled.iou[i]), "dice": float(pooled.dice[i]),
                       "recall": float(pooled.recall[i]), "precision": float(pooled.precision[i]),
                       "present": bool(pooled.present[i])}
                for i, name in enumerate(pooled.names)}

    def join_table1(self, folder: Path, design, rows: list[dict], result: dict, resolution: str) -> None:
        """With a tumour class: the binary tumour summary into ``result``, Tables 1-2 of
        ``rows`` into ``folder``, and ``rows`` kept for the combined tables."""
        if self.classes.tumour_index is None:
            return
        summary = tables.metrics_summary(rows, design.label)
        result.update({k: v for k, v in summary.items() if k not in ("design",)})
        tables.write_tables(folder, rows, [design.label], resolution=resolution)
        self.rows.extend(rows)

    def write_result(self, folder: Path, design, result: dict) -> dict:
        """``config.json`` (design, system, manifest and the config) and, last,
        ``metrics.json`` (``result``) into ``folder``; returns ``result``."""
        write_json(folder / "config.json", {"design": design.name, "system": design.system,
                                            "manifest": str(self.manifest_path), **self.config.to_dict()})
        write_json(folder / "metrics.json", result)
        return result
