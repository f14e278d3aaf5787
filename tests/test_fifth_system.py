"""A fifth system plugs in without touching core: docs/DESIGN.md's recipe, followed here by
a toy system defined in this file alone.  It registers itself (designs, its own config
section with a smoke preset, a runner and the segmenter that deploys its models), trains
a few steps through the shared pipeline base and sampler factory, scores its test slides
through its segmenter, and deploys its exported model with export/segment_slide.py's
machinery chosen by the system recorded in the model's metadata."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from h2g.core.config import CORE_SECTIONS
from h2g.data.views import View
from h2g.systems import base, registry


@dataclass(frozen=True)
class ToyConfig:
    """The toy system's own section (the "paper" values are the defaults)."""

    size: int = 32
    magnification: float = 2.5
    steps: int = 40
    batch_size: int = 8


@dataclass(frozen=True)
class ToyDesign:
    name: str = "toy_colour"
    label: str = "Toy colour net"
    system: str = "toy"
    deep_learning: bool = True


@dataclass
class ToyPipeline(base.Pipeline):
    """One 1x1-convolution segmentation network on one view."""

    system_label: ClassVar[str] = "Toy"

    def view(self) -> View:
        c = self.config.toy
        return View("image", c.magnification, c.size)

    def metadata(self, design):
        from h2g.inference.metadata import ModelMetadata

        classes = [{"name": n, "colour": [40 * i, 80, 0]} for i, n in enumerate(self.classes.names)]
        return ModelMetadata(system="toy", design=design.name, role="segmentation", views=(self.view(),),
                             classes=classes, output="pixel_probs")

    def model_stage(self, design):
        import keras

        from h2g.data.dataset import sample_dataset
        from h2g.training.losses import WeightedCrossEntropy

        c = self.config.toy
        stage = self.training_stage("toy", ("toy", "patches", "sampler"), design=design.name)
        if stage.done:
            return stage
        stage.prepare(self.resume)
        records = self._annotated("train")
        sampler = self.sampler("train", records, training=True, magnification=c.magnification, patch_size=c.size,
                               tissue_threshold=0.05, min_labelled=0.01, progress=False)
        data = sample_dataset(sampler, (self.view(),), target="pixels", target_view="image",
                              batch_size=c.batch_size, n_batches=c.steps, n_classes=self.classes.n_classes,
                              annotations={r.slide_id: self.annotation(r) for r in records})
        keras.utils.set_random_seed(self.config.seed)
        image = keras.Input((c.size, c.size, 3), name="image")
        model = keras.Model(image, keras.layers.Conv2D(self.classes.n_classes, 1, activation="softmax")(image))
        model.compile(optimizer=keras.optimizers.Adam(0.05),
                      loss=WeightedCrossEntropy([1.0] * self.classes.n_classes))
        model.fit(data.map(lambda x, y: (x["image"], y)), epochs=1, verbose=0)
        model.save(stage.dir / "model.keras")
        stage.finish()
        return stage

    def run(self, design) -> dict:
        from h2g.inference.backends import KerasBackend
        from h2g.inference.segmenter import SlidingSegmenter
        from h2g.io.slide import open_slide

        folder = self.out / design.name
        model = self.model_stage(design).dir / "model.keras"
        segmenter = SlidingSegmenter({"segmentation": KerasBackend(model)},
                                     metadata={"segmentation": self.metadata(design)})

        def raster_of(record):
            with open_slide(record.slide_path, mpp=record.mpp) as slide:
                return segmenter.segment(slide).raster

        pooled, rows, unevaluated, examples = self.score_test_slides(design, raster_of)
        result = self.class_result(folder, design, pooled, rows, unevaluated, "the label maps' grid", examples)
        result["models"] = self.save_models(folder, {"segmenter": (model, self.metadata(design))})
        return self.write_result(folder, design, result)


run_designs = ToyPipeline.run_designs
TOY = registry.System(name="toy", label="Toy", source="(a test)", designs=(ToyDesign(),),
                      runner="test_fifth_system:run_designs", sections={"toy": ToyConfig},
                      presets={"smoke": lambda: {"toy": ToyConfig(steps=20)}},
                      segmenters=("h2g.inference.segmenter:SlidingSegmenter",))


@pytest.fixture
def toy_registered():
    registry.register(TOY)
    yield TOY
    registry.unregister("toy")


@pytest.mark.slow
def test_a_toy_system_registers_trains_evaluates_and_deploys(toy_registered, tiny_cohort, tmp_path):
    from h2g.export.conversion import convert_model
    from h2g.export.deploy import Deployment
    from h2g.inference.segmenter import EngineOptions, SlidingSegmenter
    from h2g.io.manifest import load_manifest
    from h2g.io.slide import Slide

    assert "toy" not in CORE_SECTIONS  # core knows nothing of it
    config = registry.load_config("smoke", seed=0)
    assert config.toy == ToyConfig(steps=20) and registry.load_config("paper").toy == ToyConfig()
    assert config.override(["toy.steps=5"]).toy.steps == 5
    assert [d.name for d in registry.resolve(system="toy")] == ["toy_colour"]

    manifest = tiny_cohort.parent / "data_manifest_multiclass.csv"
    results = registry.run(registry.resolve(["toy_colour"]), manifest, tmp_path / "runs", config)
    metrics = json.loads((tmp_path / "runs" / "toy_colour" / "metrics.json").read_text())
    assert metrics["system"] == "toy" and metrics == results["toy_colour"]
    assert 0 < metrics["mean_iou"] <= 1 and metrics["n_test_slides"] == 2
    # the section is the toy's own, in the run's config.json beside the core sections
    saved = json.loads((tmp_path / "runs" / "toy_colour" / "config.json").read_text())
    assert saved["toy"]["steps"] == 20 and "patches" in saved

    # deployment: the exported model's metadata names the toy system, whose segmenter runs it
    model = tmp_path / "runs" / "toy_colour" / "models" / "segmenter.keras"
    record = load_manifest(manifest).split("test")[0]
    with Slide(record.slide_path) as slide:
        entry = convert_model(model, tmp_path / "exported", slide)
        plan = Deployment((entry["onnx"],), EngineOptions(engine="onnxruntime"))
        segmenter = plan.segmenter()
        assert isinstance(segmenter, SlidingSegmenter) and segmenter.metadata["segmentation"].system == "toy"
        deployed = segmenter.segment(slide).raster
        from h2g.inference.backends import KerasBackend

        keras_seg = SlidingSegmenter({"segmentation": KerasBackend(model)}).segment(slide).raster
    np.testing.assert_allclose(deployed.probs, keras_seg.probs, atol=1e-4)


def test_an_unregistered_system_is_named_in_one_error(tmp_path):
    from h2g.core.errors import ExportError
    from h2g.inference.metadata import ModelMetadata

    meta = ModelMetadata(system="toy", role="segmentation", views=(View("image", 2.5, 32),), output="pixel_probs")
    with pytest.raises(ExportError, match="system 'toy' is not registered"):
        registry.segmenter_class({"segmentation": meta})
