"""Model metadata: JSON and sidecar round trips, embedding in ONNX and OpenVINO IR and
reading it back through the deployment backends, and H2G-Net's inferred defaults."""
from __future__ import annotations

import json

import pytest
from helpers import colour_model, context_metadata, context_segmenter, threshold_refiner

from h2g.core.errors import ExportError
from h2g.data.views import View
from h2g.inference.metadata import (
    KEY,
    ModelMetadata,
    model_metadata,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

def test_json_and_sidecar_round_trip(tmp_path):
    meta = context_metadata()
    d = json.loads(meta.to_json())
    assert d["views"][1] == {"name": "ctx", "magnification": 2.5, "size": 64, "padding": "reflect"}
    assert d["classes"][0] == {"name": "Red", "colour": [255, 0, 0]} and d["scaling"] == "[0,1] float32 RGB"
    assert ModelMetadata.from_json(meta.to_json()) == meta
    assert meta.view() == View("hi", 10.0, 64) and meta.class_names == ["Red", "Green", "Blue"]
    model = tmp_path / "segmenter.keras"
    assert sidecar_path(model) == tmp_path / "segmenter.meta.json"
    assert read_sidecar(model) is None
    write_sidecar(model, meta)
    assert read_sidecar(model) == meta
    sidecar_path(model).write_text("{not json")
    with pytest.raises(ExportError, match="segmenter.meta.json: model metadata is not valid JSON"):
        read_sidecar(model)
    sidecar_path(model).write_text(json.dumps({"views": [{"name": "x", "magnification": -1, "size": 4}]}))
    with pytest.raises(ExportError, match="segmenter.meta.json: bad model metadata"):
        read_sidecar(model)
    sidecar_path(model).write_text(json.dumps({"colours": []}))
    with pytest.raises(ExportError, match="unknown model metadata fields"):
        read_sidecar(model)


@pytest.mark.slow
def test_metadata_round_trips_through_onnx_and_openvino(tmp_path):
    import keras

    from h2g.export.conversion import signature, to_onnx, to_openvino
    from h2g.inference.metadata import embed_onnx
    from h2g.inference.backends import OnnxRuntimeBackend, OpenVINOBackend

    keras.utils.set_random_seed(0)
    model, meta = context_segmenter(), context_metadata()
    sig = signature(model, "context", meta)
    assert set(sig.names) == {"hi", "ctx"} and sig.kind == "segmentation"
    onnx_path = embed_onnx(to_onnx(model, sig, tmp_path / "context.onnx"), meta)
    xml_path = to_openvino(onnx_path, tmp_path / "context.xml", metadata=meta)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props[KEY])["views"][0]["name"] == "hi"
    assert OnnxRuntimeBackend(onnx_path).metadata == meta
    assert OpenVINOBackend(xml_path).metadata == meta
    assert OpenVINOBackend(onnx_path).metadata == meta
    assert model_metadata(onnx_path) == meta and model_metadata(xml_path) == meta
    plain = to_onnx(model, sig, tmp_path / "plain.onnx")
    assert OnnxRuntimeBackend(plain).metadata is None and model_metadata(plain) is None


def test_metadata_is_inferred_for_h2g_models_without_a_sidecar(tmp_path):
    from h2g.export.conversion import inferred_metadata, signature

    patch = inferred_metadata(signature(colour_model(48), "patch"))
    assert (patch.system, patch.role, patch.output) == ("h2g", "patch_classifier", "class_probs")
    assert patch.views == (View("image", 10.0, 48, "white"),) and patch.class_names[1] == "Tumor"
    refiner = inferred_metadata(signature(threshold_refiner(32), "refiner"))
    assert refiner.role == "refinement" and refiner.views == ()
    assert refiner.extras["input_size"] == 32 and refiner.extras["inputs"] == ["image", "heatmap"]


def test_multi_input_names_must_match_the_views():
    from h2g.export.conversion import signature

    model = context_segmenter()
    with pytest.raises(ExportError, match="needs a <model>.meta.json sidecar"):
        signature(model, "context")
    wrong = context_metadata().replace(views=(View("hi", 10, 64), View("low", 2.5, 64)))
    with pytest.raises(ExportError, match="are not the views"):
        signature(model, "context", wrong)
