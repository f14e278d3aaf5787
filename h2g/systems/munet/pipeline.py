"""m-UNet's stages over one manifest (multiclass-multistain-unet.txt), cached under ``out/_cache``.

- **Samples**: the hierarchical sampler draws ``size`` px patches at the high
  magnification from the training slides' patch grids (patches labelled by their
  majority annotated class), its class stage weighted ``class_balance`` (2:1:1
  tumour:normal:other, the paper's batches); each sample is two co-centred views,
  ``x_hi`` and ``x_lo`` (``magnifications``; the paper's levels 1 and 3), and the
  target is the label map of both (255 = unlabelled).  Training and validation use
  the slides of ``train_stains`` (IHC); the test split has every stain, H&E unseen.
- **Base** (``munet_base``, Table 8 row 1): U-Net with EfficientNet ``base_encoder``
  on ``x_hi`` and the partial labels, static class weights (``1 - N_c / N`` of the
  training labels, normalised), ``base_augment``, ``base_epochs`` at
  ``base_learning_rate``; the epoch with the best validation loss is kept.
- **Pseudo-labels** (``munet_pseudo<k>``): the previous model segments every training
  slide by sliding window (the code deployment runs); a pixel's label is its arg-max
  class where that probability is >= ``thresholds[k]``, unlabelled (255: no loss) below
  it or where no window fell; with ``keep_annotations`` (our choice: the paper does not
  say) the manual partial annotation wins where there is one, so a class the previous
  model is never confident about is not lost.  Written as PNG label maps in the class
  table's values.
- **Master rounds** (``munet_round<k>``): m-UNet with ``master_encoder`` on the
  pseudo-labels, loss weighted CE + weighted Dice on the final, high and low outputs
  (``branch_weights``), dynamic per-batch or static class weights
  (``dynamic_weights[k]``), ``augment[k]`` (:func:`h2g.data.augment.munet_augmenter`),
  ``epochs[k]`` at ``learning_rates[k]``; round 1 starts from scratch, later rounds
  from the previous round's weights.  Every stage is cached and resumable.
- **Evaluation** of each model on the test slides' full label maps (label-map grid):
  per class IoU / Dice / precision / recall, AUC (one vs rest, on sampled pixels),
  precision / recall / specificity across ``pr_thresholds``, the same per stain and per
  scanner (table + plot), and the binary tumour scores per slide so that the rows join
  Table 1.  ``munet_b4`` also records every round's scores (``metrics.json`` ``rounds``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from h2g.core.atomic import replace_atomically, write_text
from h2g.core.errors import ConfigError
from h2g.core.stages import Stage
from h2g.data.views import View
from h2g.evaluation import collapse, metrics
from h2g.io.classes import IGNORE
from h2g.io.manifest import SlideRecord
from h2g.io.slide import open_slide
from h2g.systems import base
from h2g.systems.munet.designs import Design

log = logging.getLogger("h2g")

HI, LO = "x_hi", "x_lo"
OUTPUTS = ("segmentation", "high", "low")


def munet_views(c, both: bool = True) -> tuple[View, ...]:
    """The ``munet`` config ``c``'s views: the high one, and with ``both`` the low one."""
    hi = View(HI, float(c.magnifications[0]), c.size)
    return (hi, View(LO, float(c.magnifications[1]), c.size)) if both else (hi,)


def segmentation_metadata(c, design: str = "", classes=(), both: bool = True, **extras):
    """What deployment needs to know of an m-UNet (``both`` views) or U-Net (the high view)
    trained with the ``munet`` config ``c``: its views, the target view and the stride of
    its windows; ``extras`` are added (e.g. ``untrained`` for tools/model_summary.py's
    stand-ins)."""
    from h2g.inference.metadata import ModelMetadata

    return ModelMetadata(system="munet", design=design, role="segmentation", views=munet_views(c, both),
                         classes=classes, output="pixel_probs", extras={"target": HI, "stride": c.stride, **extras})


@dataclass
class Pipeline(base.Pipeline):
    """m-UNet's stages over one manifest."""

    system_label: ClassVar[str] = "m-UNet"

    def __post_init__(self):
        super().__post_init__()
        self._evaluated: dict[str, dict] = {}
        self._segmenters: dict[tuple, object] = {}
        c = self.config.munet
        mags = c.magnifications
        if len(mags) != 2 or not mags[0] > mags[1] > 0:
            raise ConfigError(f"munet.magnifications must be two decreasing magnifications (high, low), got {mags}")
        ratio = mags[0] / mags[1]
        if abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(f"munet.magnifications {mags}: their ratio must be an integer, got {ratio:g}")
        self.ratio = int(round(ratio))
        n = len(c.thresholds)
        if not all(len(v) == n for v in (c.learning_rates, c.epochs, c.dynamic_weights, c.augment)):
            raise ConfigError("munet.thresholds, learning_rates, epochs, dynamic_weights and augment need one entry "
                              f"per round ({n})")
        from h2g.data.augment import parse_munet_augment

        for spec in (c.base_augment, *c.augment):
            parse_munet_augment(spec)  # a typo fails here, before any training
        if self.classes.tumour_index is None:
            raise ConfigError(f"{self.manifest_path}: m-UNet needs a tumour class in the class table")

    # ------------------------------------------------------------------ data
    def views(self, both: bool = True) -> tuple[View, ...]:
        return munet_views(self.config.munet, both)

    def records(self, split: str) -> list[SlideRecord]:
        records = self.manifest.split(split)
        if split in ("train", "val"):
            stains = set(self.config.munet.train_stains)
            records = [r for r in records if r.attributes.get("stain", "") in stains or "stain" not in r.attributes]
        return records

    def _annotated(self, split: str) -> list[SlideRecord]:
        records = [r for r in self.records(split) if r.annotation_path is not None]
        if not records:
            raise ConfigError(f"{self.manifest_path}: no {split} slide of the stains {self.config.munet.train_stains} "
                              "has an annotation; m-UNet needs annotated train / val slides")
        return records

    def class_balance(self) -> list[float]:
        """The sampler's class-stage weights in class order: ``class_balance[0]`` for
        tumour, the next entries for the other classes in table order (1 when missing)."""
        bal = list(self.config.munet.class_balance)
        tumour = self.classes.tumour_index
        rest = iter(bal[1:])
        return [float(bal[0]) if i == tumour else float(next(rest, 1.0)) for i in range(self.classes.n_classes)]

    def munet_sampler(self, key: str, records: list[SlideRecord], training: bool):
        c = self.config.munet

        def class_weights(sources):
            weights = self.class_balance()
            absent = [i for i in range(len(weights)) if not any(len(s.class_indices(i)) for s in sources)]
            if absent:  # e.g. no "other" patch among few validation slides, or in confident pseudo-labels
                log.warning("m-UNet sampler %s: no %s patches; the class stage draws the other classes", key,
                            ", ".join(self.classes.names[i] for i in absent))
                weights = [0.0 if i in absent else w for i, w in enumerate(weights)]
            return weights

        return self.sampler(key, records, training=training, magnification=c.magnifications[0], patch_size=c.size,
                            tissue_threshold=c.tissue_threshold, min_labelled=c.min_labelled,
                            class_weights=class_weights, progress=False)

    def _data(self, records, key: str, *, both: bool, training: bool, augment: str | None, start_batch=0,
              n_batches=None, shard=None):
        from h2g.data.augment import munet_augmenter
        from h2g.data.dataset import sample_dataset

        c = self.config
        sampler = self.munet_sampler(key, records, training)
        sampled = {s.slide_id for s in sampler.sources}
        annotations = {r.slide_id: self.annotation(r) for r in records if r.slide_id in sampled}
        views = self.views(both)
        ratios = {v.name: v.magnification / views[0].magnification for v in views}
        data = sample_dataset(
            sampler, views, target="pixels", target_view=tuple(v.name for v in views),
            batch_size=c.munet.batch_size, training=training,
            augment=munet_augmenter(augment, ratios) if training and augment else None,
            start_batch=start_batch, n_batches=n_batches, readers=c.sampler.readers,
            n_classes=self.classes.n_classes, annotations=annotations, shard=shard)
        if both:
            return data.map(lambda x, y: (x, {"segmentation": y[HI], "high": y[HI], "low": y[LO]}))
        return data.map(lambda x, y: (x[HI], y[HI]))

    def static_weights(self) -> np.ndarray:
        """``1 - N_c / N`` over the annotated pixels of the training label maps."""
        from h2g.training.losses import class_weights_from_counts

        return class_weights_from_counts(self.annotated_pixels(self._annotated("train")))

    # ------------------------------------------------------------------ stages
    def _train(self, stage: Stage, model, train_records, train_key: str, *, both: bool, augment: str,
               epochs: int, learning_rate: float, dynamic: bool, resumed: bool):
        from h2g.training import fit as training
        from h2g.training.losses import WeightedCEDice

        c = self.config
        weights = None if dynamic else self.static_weights().tolist()
        if both:
            loss = {name: WeightedCEDice(weights, ignore=IGNORE, scale=w, name=f"{name}_loss")
                    for name, w in zip(OUTPUTS, c.munet.branch_weights)}
        else:
            loss = WeightedCEDice(weights, ignore=IGNORE)
        val_records = self._annotated("val")
        result = training.fit(
            model,
            lambda start, shard=None: self._data(train_records, train_key, both=both, training=True, augment=augment,
                                                 start_batch=start, shard=shard),
            self._data(val_records, "val", both=both, training=False, augment=None, n_batches=c.munet.val_batches),
            loss=loss, run_dir=stage.dir, epochs=epochs, steps_per_epoch=c.munet.train_batches,
            learning_rate=learning_rate, monitor="val_loss", mode="min", resume=resumed, seed=c.seed,
            strategy=self.strategy, verbose=0)
        return result, weights

    def base_stage(self) -> Stage:
        """The base U-Net (``model.keras``) on the annotated training slides."""
        import keras

        from h2g import models
        from h2g.training import distribute

        c = self.config
        stage = self.training_stage("munet_base", ("munet", "patches", "sampler"), encoder=c.munet.base_encoder,
                                    classes=list(self.classes.names))
        if stage.done:
            return stage
        resumed = stage.prepare(self.resume)
        log.info("training U-Net-%s (base) -> %s", c.munet.base_encoder, stage.dir)
        keras.utils.set_random_seed(c.seed)
        with distribute.scope(self.strategy):
            model = models.build("unet_effnet", n_classes=self.classes.n_classes, input_size=c.munet.size,
                                 encoder=c.munet.base_encoder, weights=c.munet.weights,
                                 decoder_width=c.munet.decoder_width)
            if c.munet.bn_momentum is not None:
                models.set_batchnorm_momentum(model, c.munet.bn_momentum)
        result, weights = self._train(stage, model, self._annotated("train"), "train", both=False,
                                      augment=c.munet.base_augment, epochs=c.munet.base_epochs,
                                      learning_rate=c.munet.base_learning_rate, dynamic=False, resumed=resumed)
        self.save_stage_model(stage.dir / "model.keras", model)
        stage.finish({"best_epoch": result.best_epoch, "best_value": result.best_value, "class_weights": weights})
        return stage

    def pseudo_stage(self, k: int, previous: Stage, both: bool) -> Stage:
        """Pseudo-labels of every training slide from ``previous``'s model (round ``k``)."""
        c = self.config
        threshold = float(c.munet.thresholds[k])
        stage = self.stage(f"munet_pseudo{k + 1}", ("munet", "patches"), seeded=False, upstream={"model": previous},
                           threshold=threshold, views="both" if both else "high",
                           keep_annotations=c.munet.keep_annotations)
        if stage.done:
            return stage
        stage.prepare(self.resume)
        from PIL import Image

        table = self.classes
        if not table.ignore:
            raise ConfigError(f"{self.manifest_path}: pseudo-labels need an ignore value in the class table")
        values = np.array([e.values[0] for e in table.entries] + [table.ignore[0]], np.uint8)
        kept = []
        for record in tqdm(self.records("train"), desc=f"pseudo-labels round {k + 1}", unit="slide"):
            target = stage.dir / f"{record.slide_id}.png"
            if not target.is_file():
                raster = self.segment(previous.dir / "model.keras", record, both)
                labels = pseudo_labels(self.on_label_grid(raster, record), threshold)
                if c.munet.keep_annotations and record.annotation_path is not None:
                    truth = self.annotation(record).labels
                    labels = np.where(truth != IGNORE, truth, labels).astype(np.uint8)
                image = values[np.where(labels == IGNORE, len(values) - 1, labels)]
                replace_atomically(target, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
            kept.append(float(np.mean(np.asarray(Image.open(target)) != table.ignore[0])))
        if max(kept, default=0.0) == 0.0:
            raise ConfigError(f"pseudo-labels of round {k + 1}: the previous model ({previous.dir}) is confident "
                              f">= {threshold:g} on no pixel of the training slides; train it longer or lower "
                              "munet.thresholds")
        stage.finish({"threshold": threshold, "labelled_fraction": kept})
        return stage

    def pseudo_records(self, stage: Stage) -> list[SlideRecord]:
        return [dataclasses.replace(r, annotation_path=stage.dir / f"{r.slide_id}.png") for r in self.records("train")]

    def round_stage(self, k: int, previous: Stage) -> Stage:
        """Master round ``k`` (0-based): m-UNet on the pseudo-labels of ``previous``'s model."""
        import keras

        from h2g import models
        from h2g.training import distribute

        c = self.config.munet
        labels = self.pseudo_stage(k, previous, both=k > 0)
        stage = self.training_stage(f"munet_round{k + 1}", ("munet", "patches", "sampler"),
                                    upstream={"labels": labels, "previous": previous}, round=k + 1,
                                    encoder=c.master_encoder, classes=list(self.classes.names))
        if stage.done:
            return stage
        resumed = stage.prepare(self.resume)
        log.info("training m-UNet-%s round %d (threshold %g) -> %s", c.master_encoder, k + 1, c.thresholds[k],
                 stage.dir)
        keras.utils.set_random_seed(self.config.seed + k + 1)
        with distribute.scope(self.strategy):
            model = models.build("munet", n_classes=self.classes.n_classes, input_size=c.size,
                                 encoder=c.master_encoder, weights=c.weights, decoder_width=c.decoder_width,
                                 ratio=self.ratio, merge_filters=tuple(c.merge_filters),
                                 final_filters=c.final_filters)
            if c.bn_momentum is not None:
                models.set_batchnorm_momentum(model, c.bn_momentum)
            if k > 0:  # later rounds continue from the previous round (lr decreasing)
                model.load_weights(previous.dir / "full.weights.h5")
        result, weights = self._train(stage, model, self.pseudo_records(labels), f"round{k + 1}", both=True,
                                      augment=c.augment[k], epochs=int(c.epochs[k]),
                                      learning_rate=float(c.learning_rates[k]), dynamic=bool(c.dynamic_weights[k]),
                                      resumed=resumed)
        tmp = stage.dir / f".tmp{os.getpid()}.weights.h5"  # Keras wants the .weights.h5 suffix
        model.save_weights(tmp)
        os.replace(tmp, stage.dir / "full.weights.h5")
        self.save_stage_model(stage.dir / "model.keras", models.inference_model(model))
        stage.finish({"best_epoch": result.best_epoch, "best_value": result.best_value,
                      "class_weights": weights or "dynamic", "threshold": float(c.thresholds[k])})
        return stage

    # ------------------------------------------------------------------ inference / evaluation
    def segment(self, model_path: Path, record: SlideRecord, both: bool):
        """The class-probability raster of one slide by ``model_path``, as deployment runs
        it (:class:`h2g.inference.segmenter.SlidingSegmenter`, one per model)."""
        from h2g.inference.segmenter import SlidingSegmenter, WindowOptions

        c = self.config
        key = (str(model_path), both)
        if key not in self._segmenters:
            meta = segmentation_metadata(c.munet, both=both)
            options = WindowOptions(stride=c.munet.stride, batch_size=c.munet.inference_batch,
                                    readers=c.sampler.readers, tissue_magnification=c.patches.tissue_magnification,
                                    saturation_threshold=c.patches.saturation_threshold)
            self._segmenters[key] = SlidingSegmenter({"segmentation": self.keras_backend(model_path)}, options,
                                                     metadata={"segmentation": meta})
        with open_slide(record.slide_path, mpp=record.mpp) as slide:
            return self._segmenters[key].segment(slide).raster

    def on_label_grid(self, raster, record: SlideRecord):
        """The raster on the annotation grid (bilinear), cut to the label map's shape."""
        annotation = self.annotation(record)
        resized = raster.resized(annotation.downsample)
        rows, cols = annotation.labels.shape
        probs = np.zeros((rows, cols, resized.classes), np.float32)
        covered = np.zeros((rows, cols), bool)
        r, cc = min(rows, resized.shape[0]), min(cols, resized.shape[1])
        probs[:r, :cc] = resized.probs[:r, :cc]
        covered[:r, :cc] = resized.covered[:r, :cc]
        return probs, covered

    def fill_uncovered(self, probs: np.ndarray, covered: np.ndarray) -> np.ndarray:
        """Pixels no window covered (glass, no tissue) count as the first class
        (``normal`` / background in the multi-stain table)."""
        probs = probs.copy()
        probs[~covered] = 0.0
        probs[~covered, 0] = 1.0
        return probs

    def evaluate_model(self, label: str, model_path: Path, both: bool) -> dict:
        """Every test slide segmented by ``model_path`` and scored (see the module doc)."""
        if str(model_path) in self._evaluated:
            return self._evaluated[str(model_path)]
        c = self.config.munet
        n = self.classes.n_classes
        tumour = self.classes.tumour_index
        rng = np.random.default_rng(self.config.seed)
        pooled, rows, groups, examples = None, [], {}, []
        curves = np.zeros((n, len(c.pr_thresholds), 4), np.int64)
        auc_scores, auc_truth = [], []
        for record in tqdm(self.records("test"), desc=f"{label} test slides", unit="slide"):
            if record.annotation_path is None:
                continue
            probs, covered = self.on_label_grid(self.segment(model_path, record, both), record)
            probs = self.fill_uncovered(probs, covered)
            truth = self.annotation(record).labels
            pred = np.argmax(probs, axis=-1)
            scores = metrics.class_metrics(pred, truth, self.classes, ignore=IGNORE)
            pooled = scores if pooled is None else pooled + scores
            for attr in ("stain", "scanner"):
                key = (attr, record.attributes.get(attr, "?"))
                groups[key] = scores if key not in groups else groups[key] + scores
            labelled = truth != IGNORE
            p, t = probs[labelled], truth[labelled]
            for cls in range(n):
                curves[cls] += metrics.threshold_counts(p[:, cls], t == cls, c.pr_thresholds)
            pick = rng.choice(len(t), size=min(len(t), c.auc_pixels), replace=False) if len(t) else []
            auc_scores.append(p[pick])
            auc_truth.append(t[pick])
            row = {"design": label, "slide_id": record.slide_id, "grade": record.grade, "mean_iou": scores.mean_iou,
                   "stain": record.attributes.get("stain", ""), "scanner": record.attributes.get("scanner", "")}
            row.update(metrics.tumour_scores(scores.confusion, tumour))
            rows.append(row)
            if len(examples) < self.config.eval.figure_slides:
                examples.append((record.slide_id, pred, truth))
        if not rows:
            raise ConfigError(f"{self.manifest_path}: no test slide has an annotation; nothing to evaluate")
        auc_p, auc_t = np.concatenate(auc_scores), np.concatenate(auc_truth)
        per_class = pooled.to_dict()
        for cls, name in enumerate(pooled.names):
            curve = metrics.threshold_scores(curves[cls])
            per_class["classes"][name].update({
                "auc": metrics.roc_auc(auc_p[:, cls], auc_t == cls),
                "thresholds": {"threshold": list(c.pr_thresholds), **{k: v.tolist() for k, v in curve.items()}}})
        by_group = {f"{attr}={value}": s.to_dict() for (attr, value), s in sorted(groups.items())}
        result = {"pooled": pooled, "rows": rows, "classes": per_class["classes"], "mean_iou": pooled.mean_iou,
                  "groups": by_group, "examples": examples}
        self._evaluated[str(model_path)] = result
        return result

    def metadata(self, design: Design):
        return segmentation_metadata(self.config.munet, design.name, self.classes.metadata_classes(),
                                     both=design.rounds)

    def run(self, design: Design) -> dict:
        """Train (or reuse) and evaluate ``design``; writes ``OUT/<design>/``."""
        from h2g.evaluation import figures

        c = self.config
        folder = self.out / design.name
        stage = self.base_stage()
        evaluated = self.evaluate_model(design.label if not design.rounds else "U-Net-B0", stage.dir / "model.keras",
                                        both=False)
        rounds = [{"round": 0, "model": f"U-Net-{c.munet.base_encoder} (base)", "threshold": None,
                   **_round_scores(evaluated)}]
        if design.rounds:
            for k in range(len(c.munet.thresholds)):
                stage = self.round_stage(k, stage)
                evaluated = self.evaluate_model(f"{design.label} round {k + 1}", stage.dir / "model.keras", both=True)
                rounds.append({"round": k + 1, "model": f"m-UNet-{c.munet.master_encoder}",
                               "threshold": float(c.munet.thresholds[k]), "augment": c.munet.augment[k],
                               **_round_scores(evaluated)})
        model_path = stage.dir / "model.keras"
        pooled = evaluated["pooled"]
        rows = [dict(r, design=design.label) for r in evaluated["rows"]]
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "munet_tables.md", munet_tables(collapse.flagged_label(
            design.label, collapse.from_confusion(pooled.confusion, pooled.names)), evaluated, rounds))
        figures.group_iou_plot(folder / "iou_by_stain_scanner.png", evaluated["groups"],
                               [n for n in pooled.names if n != pooled.names[0]], title=design.label)
        resolution = f"the label maps' grid (downsample {c.patches.annotation_downsample:g})"
        result = self.class_result(folder, design, pooled, rows, [], resolution, evaluated["examples"],
                                   classes=evaluated["classes"], groups=evaluated["groups"], rounds=rounds)
        result["models"] = self.save_models(folder, {"segmenter": (model_path, self.metadata(design))})
        return self.write_result(folder, design, result)


def pseudo_labels(probs_covered, threshold: float) -> np.ndarray:
    """``(probs (H, W, C), covered (H, W))`` -> uint8 labels: the arg-max class where its
    probability is >= ``threshold`` and a window covered the pixel, else ``IGNORE``."""
    probs, covered = probs_covered
    labels = np.argmax(probs, axis=-1).astype(np.uint8)
    confident = (np.max(probs, axis=-1) >= threshold) & covered
    labels[~confident] = IGNORE
    return labels


def _round_scores(evaluated: dict) -> dict:
    classes = evaluated["classes"]
    unseen = evaluated["groups"].get("stain=he")
    return {"mean_iou": evaluated["mean_iou"], "iou": {n: v["iou"] for n, v in classes.items()},
            "unseen_he_mean_iou": None if unseen is None else unseen["mean_iou"],
            "unseen_he_iou": None if unseen is None else {n: v["iou"] for n, v in unseen["classes"].items()}}


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def munet_tables(label: str, evaluated: dict, rounds: list[dict]) -> str:
    """Markdown: Table 2 (per class IoU, precision, recall, AUC, and precision / recall
    across thresholds), Table 3 (IoU per stain and per scanner) and IoU per round."""
    classes = evaluated["classes"]
    names = list(classes)
    out = [f"# {label}", "", "## Per class (test slides, pooled; the paper's Table 2)", "",
           "| class | IoU | precision | recall | AUC |", "|---|---|---|---|---|"]
    out += [f"| {n} | {_f(v['iou'])} | {_f(v['precision'])} | {_f(v['recall'])} | {_f(v['auc'])} |"
            for n, v in classes.items()]
    out += ["", "## Precision / recall / specificity across thresholds (class probability > t)", ""]
    thresholds = classes[names[0]]["thresholds"]["threshold"]
    out += ["| class | metric | " + " | ".join(f"{t:g}" for t in thresholds) + " |",
            "|---|---|" + "---|" * len(thresholds)]
    for n, v in classes.items():
        for metric in ("precision", "recall", "specificity"):
            out.append(f"| {n} | {metric} | " + " | ".join(_f(x) for x in v["thresholds"][metric]) + " |")
    out += ["", "## IoU per stain and per scanner (the paper's Table 3; stain=he is unseen in training)", "",
            "| group | " + " | ".join(names) + " | mean IoU |", "|---|" + "---|" * (len(names) + 1)]
    for group, s in evaluated["groups"].items():
        out.append(f"| {group} | " + " | ".join(_f(s["classes"][n]["iou"]) for n in names)
                   + f" | {_f(s['mean_iou'])} |")
    out += ["", "## IoU per training round (all test slides; unseen H&E)", "",
            "| round | model | threshold | " + " | ".join(names) + " | mean IoU | H&E mean IoU |",
            "|---|---|---|" + "---|" * (len(names) + 2)]
    for r in rounds:
        out.append(f"| {r['round']} | {r['model']} | {_f(r['threshold'])} | "
                   + " | ".join(_f(r["iou"][n]) for n in names)
                   + f" | {_f(r['mean_iou'])} | {_f(r['unseen_he_mean_iou'])} |")
    return "\n".join(out) + "\n"


run_designs = Pipeline.run_designs
