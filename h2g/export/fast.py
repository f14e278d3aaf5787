"""FAST (FastPathology) as a peer: H2G-Net written as a FAST text pipeline (.fpl), batch-1
OpenVINO copies for FAST's engine, and FAST's patch-wise stage timed through its Python
API for the runtime comparison.  TensorFlow-free; pyfast is optional."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from h2g.core.errors import ExportError
from h2g.core.measure import mean_sd

FAST_INSTALL_HINT = ("pip install pyfast (it also needs Debian's libusb-1.0-0 and an OpenCL platform "
                     "such as pocl-opencl-icd)")


# --------------------------------------------------------------------------------------
# FAST (FastPathology) text pipeline and peer timing
# --------------------------------------------------------------------------------------
FAST_ENGINES = {"openvino": "OpenVINO", "onnxruntime": "ONNXRuntime", "tensorrt": "TensorRT"}


def fast_pipeline_text(patch_model, refine_model, *, magnification: float = 10, patch_size: int = 256,
                       tissue_threshold: float = 0.25, engine: str = "openvino") -> str:
    """A FAST / FastPathology text pipeline (.fpl) running H2G-Net with the paper's
    parameters: tissue segmentation (colour thresholding, no model download) ->
    ``patch_size`` patches at ``magnification`` with more than ``tissue_threshold``
    tissue -> patch classifier -> stitched heatmap (tumour channel) -> refinement network
    on the low-resolution image in [0, 1] (input 0, ``image``) and the heatmap (input 1,
    ``heatmap``).  The slide is the pipeline input ``WSI`` (FastPathology provides it; in
    Python: ``fast.Pipeline(path).parse(inputData={"WSI": pyramid})``); its outputs are
    ``heatmap`` and ``segmentation``."""
    if engine not in FAST_ENGINES:
        raise ExportError(f"FAST engine must be one of {', '.join(FAST_ENGINES)}, got {engine!r}")
    fast_engine = FAST_ENGINES[engine]
    patch_model, refine_model = Path(patch_model).resolve(), Path(refine_model).resolve()
    blocks = [
        ['PipelineName "H2G-Net breast tumour segmentation"',
         f'PipelineDescription "Patch-wise tumour heatmap ({patch_size} x {patch_size} patches at '
         f'{magnification:g}x) refined with the low-resolution image (Pedersen et al. 2022)"',
         'PipelineInputData WSI "Whole-slide image"',
         "PipelineOutputData heatmap finish 0",
         "PipelineOutputData segmentation refinement 0",
         'Attribute classes "Background;Tumor"',
         "",
         "### Processing chain"],
        ["# colour thresholding: no model to download, works offline",
         "ProcessObject tissueSeg TissueSegmentation", "Attribute color-thresholding true", "Input 0 WSI"],
        ["ProcessObject patch PatchGenerator",
         f"Attribute patch-size {patch_size} {patch_size}",
         f"Attribute patch-magnification {magnification:g}",
         "Attribute patch-overlap 0.0",
         f"Attribute mask-threshold {tissue_threshold:g}",
         "Input 0 WSI", "Input 1 tissueSeg 0"],
        ["# patches arrive as uint8; the classifier expects [0, 1]",
         "ProcessObject network NeuralNetwork",
         f'Attribute model "{patch_model}"',
         f"Attribute inference-engine {fast_engine}",
         "Attribute scale-factor 0.00392156862745098",
         "Input 0 patch 0"],
        ["ProcessObject stitcher PatchStitcher", "Input 0 network 0"],
        ["ProcessObject finish RunUntilFinished", "Input 0 stitcher 0"],
        ["# channel 1 of the stitched softmax = tumour probability",
         "ProcessObject heatmap TensorToImage", "Attribute channels 1", "Input 0 finish 0"],
        ["# the coarsest pyramid level; the network resizes its inputs to its own size",
         "ProcessObject lowRes ImagePyramidLevelExtractor", "Attribute level -1", "Input 0 WSI"],
        ["ProcessObject scale IntensityNormalization", "Input 0 lowRes 0"],
        ["# input 0 = image, input 1 = heatmap (the ONNX input order)",
         "ProcessObject refinement SegmentationNetwork",
         f'Attribute model "{refine_model}"',
         f"Attribute inference-engine {fast_engine}",
         "Input 0 scale 0", "Input 1 heatmap 0"],
    ]
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def batch_one_copy(model, out_dir) -> Path:
    """An OpenVINO IR copy of ``model`` (.onnx or .xml) with its batch dimension fixed
    to 1, written as ``out_dir/<stem>_batch1.xml/.bin``.  FAST's OpenVINO engine feeds
    one patch at a time and cannot compile our dynamic-batch exports ("Primitive
    descriptor was not found for node .../MatMul")."""
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("FAST's OpenVINO engine needs batch-1 copies of the models, made with "
                          "openvino (pip install openvino)") from None
    model = Path(model)
    try:
        graph = ov.Core().read_model(str(model))
        graph.reshape({i.get_any_name(): [1, *[d.get_length() for d in i.get_partial_shape()[1:]]]
                       for i in graph.inputs})
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses
        raise ExportError(f"{model}: cannot make a batch-1 copy for FAST: {str(exc).splitlines()[0]}") from None
    out = Path(out_dir) / f"{model.stem}_batch1.xml"
    ov.save_model(graph, str(out), compress_to_fp16=False)
    return out


def write_fast_pipeline(path, patch_model, refine_model, *, engine: str = "openvino", **kw) -> Path:
    """Write :func:`fast_pipeline_text` to ``path``; the models must exist.  For FAST's
    OpenVINO engine the pipeline runs batch-1 copies of the models written beside
    ``path`` (:func:`batch_one_copy`)."""
    for model in (patch_model, refine_model):
        if not Path(model).is_file():
            raise ExportError(f"{model}: model file not found")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if engine == "openvino":
        patch_model, refine_model = (batch_one_copy(m, path.parent) for m in (patch_model, refine_model))
    path.write_text(fast_pipeline_text(patch_model, refine_model, engine=engine, **kw))
    return path


def fast_peer(slide_path, patch_model, *, engine: str, repeats: int, work_dir, objective_power: float,
              magnification: float = 10, patch_size: int = 256, tissue_threshold: float = 0.25) -> dict:
    """Time FAST (pyfast) on the same slide and patch model, with the chain of
    :func:`fast_pipeline_text` built through FAST's Python API: the network is loaded
    once, outside the timing, as ours is (a batch-1 copy for FAST's OpenVINO engine,
    which feeds one patch at a time); then one warm-up and ``repeats`` runs of the
    patch-wise stage (slide import, colour-threshold tissue segmentation, patches,
    inference, stitching to the finished heatmap).  FAST's refinement stage is not
    timed: in pyfast 4.18 run headless it does not return.  ``objective_power`` is set
    on the slide when FAST finds no magnification in it.  Patches/s counts the cells of
    FAST's own heatmap that hold a prediction (its tissue mask differs slightly from
    ours).  Returns ``{"skipped": reason}`` when pyfast is not installed or FAST fails."""
    try:
        import fast
    except ImportError as exc:  # not installed, or a system library it needs is missing
        return {"name": "fast", "skipped": f"pyfast cannot be imported ({exc}); {FAST_INSTALL_HINT}"}
    from importlib.metadata import version

    if engine not in FAST_ENGINES:
        raise ExportError(f"FAST engine must be one of {', '.join(FAST_ENGINES)}, got {engine!r}")
    model = batch_one_copy(patch_model, work_dir) if engine == "openvino" else Path(patch_model)
    runs = []
    try:
        network = fast.NeuralNetwork.create(str(model), scaleFactor=1 / 255,
                                            inferenceEngine=FAST_ENGINES[engine])
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            pyramid = fast.WholeSlideImageImporter.create(str(slide_path)).runAndGetOutputData()
            try:
                pyramid.getMagnification()
            except Exception:  # "magnification of this image pyramid is unknown"
                pyramid.setMagnification(float(objective_power))
            tissue = fast.TissueSegmentation.create(useColorThresholdingMethod=True).connect(pyramid)
            patches = fast.PatchGenerator.create(patch_size, patch_size, magnification=magnification,
                                                 overlapPercent=0, maskThreshold=tissue_threshold)
            patches.connect(0, pyramid).connect(1, tissue)
            network.connect(patches)
            stitcher = fast.PatchStitcher.create().connect(network)
            heatmap = fast.RunUntilFinished.create().connect(stitcher).runAndGetOutputData()
            seconds = time.perf_counter() - t0
            cells = np.asarray(heatmap)
            runs.append({"patch_wise": seconds, "patches": int((cells.sum(axis=-1) > 0.5).sum())})
    except Exception as exc:  # FAST raises RuntimeError from C++ for any failure
        return {"name": "fast", "skipped": f"FAST failed: {str(exc).splitlines()[0] if str(exc) else exc}"}
    runs = runs[1:]
    return {
        "name": "fast",
        "engine": f"FAST {FAST_ENGINES[engine]}",
        "version": f"pyfast {version('pyfast')}",
        "device": "GPU" if engine == "tensorrt" else "CPU",
        "precision": "bf16 on CPUs that have it (FAST's OpenVINO default)" if engine == "openvino" else "f32",
        "patches": runs[-1]["patches"],
        "stages": {"patch_wise": mean_sd(r["patch_wise"] for r in runs)},
        "per_second": mean_sd(r["patches"] / r["patch_wise"] for r in runs),
        "runs": runs,
    }

