"""Tiny H2G-Net models written directly as ONNX graphs (onnx.helper), with the package's
metadata embedded: no TensorFlow, built in milliseconds.  For tests that need real
exported model files but not real networks (cohort runs, interrupts, load-time checks).

- :func:`patch_classifier`: ``image`` (N, S, S, 3) -> mean colour -> linear -> softmax
  over ``classes`` outputs (N, classes): redder patches score higher on the last class.
- :func:`refiner`: ``image`` (N, R, R, 3) + ``heatmap`` (N, R, R, 1) -> per pixel
  linear -> softmax (N, R, R, 2), tumour where the heatmap is high.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(graph, path: Path, metadata) -> Path:
    import onnx
    from onnx import helper

    from h2g.inference.metadata import KEY

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, {KEY: metadata.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def patch_classifier(path, size: int = 64, classes: int = 2, magnification: float = 10.0, metadata=True) -> Path:
    """See the module doc; ``metadata``: True = H2G-Net's patch metadata (two classes),
    a :class:`~h2g.inference.metadata.ModelMetadata`, or None."""
    from onnx import TensorProto, helper, numpy_helper

    from h2g.inference.metadata import h2g_patch_metadata

    weights = np.zeros((3, classes), np.float32)
    weights[0, -1], weights[1, -1] = 0.05, -0.05
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
             helper.make_node("Add", ["logits0", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    init = [numpy_helper.from_array(weights * 255, "w"),
            numpy_helper.from_array(np.zeros(classes, np.float32), "b")]
    graph = helper.make_graph(nodes, "patch", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                             ["N", size, size, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])], init)
    meta = h2g_patch_metadata(size, magnification) if metadata is True else metadata
    return _save(graph, Path(path), meta)


def refiner(path, size: int = 64, metadata=True) -> Path:
    """See the module doc; ``metadata`` as for :func:`patch_classifier`."""
    from onnx import TensorProto, helper, numpy_helper

    from h2g.inference.metadata import h2g_refinement_metadata

    weights = np.array([[0, 0], [0, 0], [0, 0], [-4, 4]], np.float32)
    nodes = [helper.make_node("Concat", ["image", "heatmap"], ["x"], axis=-1),
             helper.make_node("MatMul", ["x", "w"], ["l0"]),
             helper.make_node("Add", ["l0", "b"], ["l"]),
             helper.make_node("Softmax", ["l"], ["probs"], axis=-1)]
    init = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([2, -2], np.float32), "b")]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 3]),
              helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", size, size, 1])]
    graph = helper.make_graph(nodes, "refine", inputs,
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", size, size, 2])], init)
    meta = h2g_refinement_metadata(size) if metadata is True else metadata
    return _save(graph, Path(path), meta)


def h2g_models(folder, patch: int = 64, size: int = 64) -> list[Path]:
    """Both models in ``folder`` (``patch.onnx``, ``refine.onnx``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [patch_classifier(folder / "patch.onnx", patch), refiner(folder / "refine.onnx", size)]
