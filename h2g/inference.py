"""Whole-slide inference: pluggable backends and the one slide -> heatmap -> refinement core.

The same code makes the heatmaps the refinement stage trains on (Keras backend) and runs
deployment (ONNX Runtime / OpenVINO backends, ``export/segment_slide.py``).  This module
is TensorFlow-free: only :class:`KerasBackend` imports Keras / TensorFlow, inside itself.

Backends take float32 images in [0, 1], either one ``(B, H, W, C)`` array (fed to the
model's ``image`` input, or its only input) or a dict ``{input name: array}``, and return
the model's first output as a numpy array.  Each reports the engine, version, device,
threads and precision it actually runs with (:meth:`info`).

:func:`slide_heatmap` reads the patches of a slide's tissue grid in a pool of reader
threads that feed a bounded queue while the backend predicts batches, so reading overlaps
inference and memory stays bounded; the tumour-class probability (column 1) of each patch
lands in its grid cell.  :func:`refinement_inputs` builds the refinement stage's inputs
(low-resolution image + heatmap, both ``size`` x ``size``) and :func:`refine` runs it.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Union

import numpy as np
from PIL import Image

from h2g.errors import ConfigError, ExportError, ModelError

ENGINES = ("keras", "onnxruntime", "openvino")
DEVICES = ("CPU", "GPU")
PRECISIONS = ("f32", "bf16", "f16")
HINTS = ("latency", "throughput")
INPUT_NAMES = ("image", "heatmap")

Inputs = Union[np.ndarray, Mapping[str, np.ndarray]]


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------
class Backend(Protocol):
    """A model ready for batched inference on one engine and device."""

    name: str  # engine: "keras" | "onnxruntime" | "openvino"
    source: str  # the model file (or the Keras model's name)
    version: str
    device: str
    threads: int | None
    precision: str
    input_names: tuple[str, ...]

    def predict(self, inputs: Inputs) -> np.ndarray: ...

    def info(self) -> dict: ...

    def require_inputs(self, allowed: tuple[str, ...], role: str) -> None: ...


class _BackendBase:
    """Shared input handling and reporting of the concrete backends."""

    name = ""
    source = ""
    version = ""
    device = "CPU"
    threads: int | None = None
    precision = "f32"
    input_names: tuple[str, ...] = ()
    image_size: int | None = None  # side of the `image` input when the model fixes it
    hint = "latency"  # "throughput": sub-batches of `sub_batch` run concurrently on `streams`
    streams = 1
    sub_batch: int | None = None

    def info(self) -> dict:
        """Engine, version, device, threads, precision and concurrency actually in use."""
        return {
            "engine": self.name,
            "version": self.version,
            "device": self.device,
            "threads": self.threads,
            "precision": self.precision,
            "model": self.source,
            "inputs": list(self.input_names),
            "hint": self.hint,
            "streams": self.streams,
            "sub_batch": self.sub_batch if self.hint == "throughput" else None,
        }

    def _feed(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """``inputs`` as ``{input name: float32 array}`` matching the model's inputs."""
        if not isinstance(inputs, Mapping):
            if "image" in self.input_names:
                key = "image"
            elif len(self.input_names) == 1:
                key = self.input_names[0]
            else:
                raise ExportError(f"{self.source}: the model has inputs {list(self.input_names)}; "
                                  "give them by name")
            inputs = {key: inputs}
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names]
        if missing or unknown:
            raise ExportError(f"{self.source}: the model has inputs {list(self.input_names)}, "
                              f"but was given {list(inputs)}")
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}

    def _failed(self, feed: dict, exc: Exception) -> ExportError:
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        return ExportError(f"{self.source}: inference failed for inputs {shapes}: {_summary(exc)}")

    def require_inputs(self, allowed: tuple[str, ...], role: str) -> None:
        """Fail with a clear :class:`ExportError` unless the model's inputs are ``image``
        and, if ``allowed`` has it, ``heatmap`` (the names export gives them)."""
        names = set(self.input_names)
        if "image" not in names or not names <= set(allowed):
            raise ExportError(f"{self.source}: wrong input names {sorted(names)} for a {role}; "
                              f"expected {' + '.join(repr(a) for a in allowed)} "
                              "(export models with export/convert.py)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, device={self.device!r}, precision={self.precision!r})"


def _square_side(shape: tuple) -> int | None:
    """The side of a ``(batch, S, S, channels)`` input whose S is fixed, else None."""
    if len(shape) == 4 and isinstance(shape[1], int) and shape[1] == shape[2]:
        return int(shape[1])
    return None


def _summary(exc: Exception) -> str:
    """One informative line of an engine's error (OpenVINO prefixes its message with
    source locations, "Exception from src/...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Exception from ")]
    return (useful or lines or [type(exc).__name__])[-1]


def _check_file(path, suffixes: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: model file not found")
    if path.suffix.lower() not in suffixes:
        raise ExportError(f"{path}: expected a {' or '.join(suffixes)} model file")
    return path


def load_keras_model(path):
    """Load a ``.keras`` model without compiling it.  The package's custom layers (models,
    cluster model) are imported first so that they deserialise."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    import keras

    import h2g.clustering  # noqa: F401  (registers the cluster model's layers)
    import h2g.models  # noqa: F401  (registers the architectures' layers)

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for unreadable files
        raise ModelError(f"{path}: cannot load the Keras model: {exc}") from None


def keras_inputs(model) -> tuple[str, tuple[str, ...]]:
    """How a Keras model takes its inputs: ``"single"``, ``"list"`` or ``"dict"``, and
    the input names in the model's own order."""
    if isinstance(model.input, dict):
        return "dict", tuple(model.input)
    structure = "list" if isinstance(model.input, (list, tuple)) else "single"
    return structure, tuple(t.name for t in model.inputs)


def call_keras(model, structure: str, keras_order: tuple[str, ...], by_name: Mapping):
    """``model``'s first output for inputs given by name (a single-input model takes its
    one input whatever it is called), packed the way :func:`keras_inputs` says.  Used
    eagerly by :class:`KerasBackend` and inside the graph that export traces."""
    values = list(by_name.values()) if len(keras_order) == 1 else [by_name[n] for n in keras_order]
    if structure == "dict":
        x = dict(zip(keras_order, values))
    else:
        x = values if structure == "list" else values[0]
    out = model(x, training=False)
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0] if isinstance(out, (list, tuple)) else out


class KerasBackend(_BackendBase):
    """A Keras model (or ``.keras`` file) run by TensorFlow."""

    name = "keras"

    def __init__(self, model, device: str | None = None):
        import keras
        import tensorflow as tf

        if isinstance(model, (str, Path)):
            model = load_keras_model(model)
        self.model = model
        self.source = model.name
        self.version = f"{keras.__version__} (tensorflow {tf.__version__})"
        gpus = tf.config.list_physical_devices("GPU")
        if device == "GPU" and not gpus:
            raise ExportError("device GPU requested but TensorFlow sees no GPU "
                              "(install a CUDA build of TensorFlow, or use --device CPU)")
        self.device = "GPU" if gpus and device != "CPU" else "CPU"
        self.threads = tf.config.threading.get_intra_op_parallelism_threads() or available_cpus()
        policy = keras.config.dtype_policy().compute_dtype
        self.precision = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(policy, policy)
        self._structure, self._keras_order = keras_inputs(model)
        # a single input is the image, whatever its Keras name (as in export)
        self.input_names = self._keras_order if len(self._keras_order) > 1 else ("image",)
        self.image_size = _square_side(tuple(self.model.inputs[0].shape))

    def predict(self, inputs: Inputs) -> np.ndarray:
        # eager: no retracing per batch size
        return np.asarray(call_keras(self.model, self._structure, self._keras_order, self._feed(inputs)))


class OnnxRuntimeBackend(_BackendBase):
    """An ``.onnx`` model run by ONNX Runtime (CUDA / TensorRT providers for ``GPU``).

    ``hint="throughput"`` on CPU mirrors OpenVINO's: one single-threaded stream per
    thread, each batch split into sub-batches of ``sub_batch`` (default 1: measured
    fastest, 240 MobileNetV2 patches/s on 2 cores against 210 with 2 and 155 latency) run
    concurrently (``InferenceSession.run`` is thread-safe and releases the GIL).  On GPU
    the hint is ignored (latency)."""

    name = "onnxruntime"
    GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

    def __init__(self, path, device: str = "CPU", threads: int | None = None, precision: str | None = None,
                 hint: str = "latency", sub_batch: int | None = None):
        path = _check_file(path, (".onnx",))
        self.source = str(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("engine onnxruntime is not installed "
                              "(pip install onnxruntime, or onnxruntime-gpu for GPUs)") from None
        if precision not in (None, "f32"):
            raise ConfigError(f"ONNX Runtime runs the model in its stored precision (f32); "
                              f"precision {precision!r} needs --engine openvino")
        device = _check_device(device)
        _check_concurrency(hint, sub_batch)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device == "GPU":
            gpu = [p for p in self.GPU_PROVIDERS if p in available]
            if not gpu:
                raise ExportError(f"device GPU requested but ONNX Runtime has no CUDA or TensorRT "
                                  f"execution provider (available: {', '.join(available)}); install "
                                  "onnxruntime-gpu (pip install 'h2g[gpu]') or use --device CPU")
            providers = gpu + providers
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.threads = int(threads) if threads else available_cpus()
        self._pool = None
        if hint == "throughput" and device == "CPU":
            self.hint, self.streams, self.sub_batch = hint, self.threads, int(sub_batch or 1)
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="ort-stream")
        else:
            options.intra_op_num_threads = self.threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise ExportError(f"{path}: ONNX Runtime cannot load the model: {_summary(exc)}") from None
        if device == "GPU" and not set(self.session.get_providers()) & set(self.GPU_PROVIDERS):
            raise ExportError(f"device GPU requested but ONNX Runtime could not start a GPU provider "
                              f"(CUDA/cuDNN libraries missing?); it fell back to {self.session.get_providers()}")
        self.version = ort.__version__
        self.device = device
        self.precision = "f32"
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.image_size = _square_side(tuple(self.session.get_inputs()[0].shape))
        self._output = self.session.get_outputs()[0].name

    def _run(self, feed: dict) -> np.ndarray:
        return self.session.run([self._output], feed)[0]

    def predict(self, inputs: Inputs) -> np.ndarray:
        feed = self._feed(inputs)
        try:
            if self._pool is None or _rows(feed) < 2:
                return self._run(feed)
            parts = (part for _, part in _sub_feeds(feed, self.sub_batch))
            return np.concatenate(list(self._pool.map(self._run, parts)))
        except Exception as exc:  # onnxruntime's own error types (shape, type mismatch)
            raise self._failed(feed, exc) from None


class OpenVINOBackend(_BackendBase):
    """An OpenVINO IR (``.xml`` + ``.bin``) or ``.onnx`` model run by OpenVINO.

    The device is always named ("CPU" or "GPU"): "AUTO" and device discovery make OpenVINO
    probe GPUs, which crashes some hosts when TensorFlow is loaded.  ``precision`` sets
    ``INFERENCE_PRECISION_HINT``; left ``None``, OpenVINO picks (bf16 on CPUs with AMX /
    AVX512-BF16), and :attr:`precision` reports what it chose.

    ``hint`` is OpenVINO's ``PERFORMANCE_HINT``.  ``"latency"`` runs each call as one
    request on all threads (best for one large input: the refinement network).
    ``"throughput"`` compiles several streams (:attr:`streams`), each with its own threads,
    and splits each batch into sub-batches of ``sub_batch`` (default: 1 on CPU, measured
    fastest for MobileNetV2 on 2 cores; an equal share per stream on GPU) queued on twice
    as many requests as streams, so no stream waits for Python between sub-batches.  A
    stream's threads need no barrier with the others', so when patch-reader threads share
    the cores, inference loses less to them (the patch classifier in the slide pipeline)."""

    name = "openvino"

    def __init__(self, path, device: str = "CPU", precision: str | None = None, threads: int | None = None,
                 hint: str = "latency", sub_batch: int | None = None):
        path = _check_file(path, (".xml", ".onnx"))
        if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
            raise ExportError(f"{path}: the OpenVINO weights file {path.with_suffix('.bin').name} is missing")
        self.source = str(path)
        try:
            import openvino as ov
        except ImportError:
            raise ExportError("engine openvino is not installed (pip install openvino)") from None
        device = _check_device(device)
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        _check_concurrency(hint, sub_batch)
        config = {"PERFORMANCE_HINT": hint.upper()}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses
            raise ExportError(f"{path}: OpenVINO cannot read the model: {_summary(exc)}") from None
        try:
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:
            if device == "GPU":
                raise ExportError(f"device GPU requested but OpenVINO cannot use a GPU "
                                  f"(no Intel GPU or its OpenCL driver is missing): "
                                  f"{_summary(exc)}; use --device CPU") from None
            raise ExportError(f"{path}: OpenVINO cannot compile the model for {device}: {_summary(exc)}") from None
        chosen = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = chosen.get_type_name()  # "f32" | "bf16" | "f16"
        try:
            self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        except Exception:  # GPU plugins do not report CPU threads
            self.threads = None
        self.version = ov.get_version()
        self.device = device
        self.input_names = tuple(i.get_any_name() for i in self.compiled.inputs)
        first = self.compiled.inputs[0].get_partial_shape()
        self.image_size = _square_side(tuple(d.get_length() if d.is_static else None for d in first))
        self.hint = hint
        try:
            self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        except Exception:  # not every plugin reports it
            self.streams = 1
        self._request = self.compiled.create_infer_request()
        self._queue = None
        self.sub_batch = int(sub_batch) if sub_batch else (1 if device == "CPU" else None)
        if hint == "throughput":
            self._queue = ov.AsyncInferQueue(self.compiled, 2 * max(1, self.streams))
            self._queue.set_callback(self._collect)
        self._parts: dict[int, np.ndarray] = {}

    def _collect(self, request, start: int) -> None:  # runs in OpenVINO's callback thread
        self._parts[start] = request.get_output_tensor(0).data.copy()

    def predict(self, inputs: Inputs) -> np.ndarray:
        feed = self._feed(inputs)
        try:
            if self._queue is None or _rows(feed) < 2:
                self._request.infer(feed)
                return self._request.get_output_tensor(0).data.copy()
            self._parts = {}
            for start, part in _sub_feeds(feed, self.sub_batch or -(-_rows(feed) // max(1, self.streams))):
                self._queue.start_async(part, start)
            self._queue.wait_all()
        except Exception as exc:  # OpenVINO's RuntimeError subclasses
            raise self._failed(feed, exc) from None
        return np.concatenate([self._parts[k] for k in sorted(self._parts)])


def _rows(feed: dict[str, np.ndarray]) -> int:
    """The batch size of a feed."""
    return len(next(iter(feed.values())))


def _sub_feeds(feed: dict[str, np.ndarray], size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(start, rows start:start + size of every input)`` over a feed, in order: the
    sub-batches of the throughput hint."""
    for start in range(0, _rows(feed), size):
        yield start, {name: value[start:start + size] for name, value in feed.items()}


def _check_concurrency(hint: str, sub_batch: int | None) -> None:
    if hint not in HINTS:
        raise ConfigError(f"hint must be one of {', '.join(HINTS)}, got {hint!r}")
    if sub_batch is not None and int(sub_batch) < 1:
        raise ConfigError(f"sub_batch must be >= 1, got {sub_batch}")


def _check_device(device: str) -> str:
    device = str(device).upper()
    if device not in DEVICES:
        raise ConfigError(f"device must be CPU or GPU (named explicitly, never AUTO), got {device!r}")
    return device


def engine_for(path) -> str:
    """The default engine of a model file: .keras -> keras, .onnx -> onnxruntime,
    .xml -> openvino."""
    suffix = Path(path).suffix.lower()
    engines = {".keras": "keras", ".onnx": "onnxruntime", ".xml": "openvino"}
    if suffix not in engines:
        raise ExportError(f"{path}: not a model file (.keras, .onnx or .xml expected)")
    return engines[suffix]


def make_backend(model_or_path, engine: str | None = None, device: str = "CPU",
                 precision: str | None = None, threads: int | None = None,
                 hint: str = "latency") -> Backend:
    """A backend for a Keras model object or a model file.  ``engine`` defaults from the
    file type (:func:`engine_for`); OpenVINO also runs ``.onnx`` files.  ``hint``
    (``latency`` or ``throughput``: see :class:`OpenVINOBackend` and
    :class:`OnnxRuntimeBackend`) is ignored by the Keras backend."""
    if engine is None:
        engine = "keras" if not isinstance(model_or_path, (str, Path)) else engine_for(model_or_path)
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "keras":
        if precision not in (None, "f32"):
            raise ConfigError("the Keras backend runs f32; use --engine openvino for other precisions")
        return KerasBackend(model_or_path, device=_check_device(device))
    if not isinstance(model_or_path, (str, Path)):
        raise ConfigError(f"engine {engine} needs a model file, not a Keras model")
    if engine == "onnxruntime":
        return OnnxRuntimeBackend(model_or_path, device=device, threads=threads, precision=precision, hint=hint)
    return OpenVINOBackend(model_or_path, device=device, precision=precision, threads=threads, hint=hint)


# --------------------------------------------------------------------------------------
# Patch reading overlapped with inference
# --------------------------------------------------------------------------------------
class PatchReader:
    """Reads batches of patches in ``readers`` threads into a bounded queue.

    Iterating yields ``(start, batch)``: ``batch`` is float32 ``(b, P, P, 3)`` in [0, 1]
    holding patches ``coords[start:start + b]``; batches arrive in completion order.
    At most ``depth`` read batches wait in the queue, so memory is bounded whatever the
    slide size.  :attr:`read_seconds` sums the readers' busy time.  A reader error is
    re-raised in the consumer.  Use as a context manager (stops the threads)."""

    def __init__(self, slide, coords: np.ndarray, *, magnification: float, patch_size: int,
                 batch_size: int = 32, readers: int = 2, depth: int | None = None):
        if batch_size < 1 or readers < 1:
            raise ConfigError(f"batch_size and readers must be >= 1, got {batch_size} and {readers}")
        self.slide, self.coords = slide, np.asarray(coords)
        self.magnification, self.patch_size, self.batch_size = magnification, patch_size, batch_size
        self.n_batches = -(-len(self.coords) // batch_size)
        self.read_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth or 2 * readers)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"patch-reader-{i}")
                         for i in range(min(readers, max(self.n_batches, 1)))]
        for t in self._threads:
            t.start()

    def _read_batch(self, start: int) -> np.ndarray:
        size = (self.patch_size, self.patch_size)
        chunk = self.coords[start:start + self.batch_size]
        batch = np.empty((len(chunk), self.patch_size, self.patch_size, 3), np.float32)
        for i, (x, y) in enumerate(chunk):
            np.multiply(self.slide.read_region((int(x), int(y)), size, self.magnification),
                        np.float32(1 / 255), out=batch[i])
        return batch

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                index, self._next = self._next, self._next + 1
            if index >= self.n_batches:
                return
            start = index * self.batch_size
            t0 = time.perf_counter()
            try:
                item = (start, self._read_batch(start))
            except BaseException as exc:  # handed to the consumer, re-raised there
                item = (start, exc)
            with self._lock:
                self.read_seconds += time.perf_counter() - t0
            if not self._put(item):
                return

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for _ in range(self.n_batches):
            start, batch = self._queue.get()
            if isinstance(batch, BaseException):
                self.close()
                raise batch
            yield start, batch

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def __enter__(self) -> "PatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------
@dataclass
class Heatmap:
    """Tumour probability per patch-grid cell of a slide.

    ``probs[r, c]`` covers level-0 ``[c * step, (c + 1) * step) x [r * step, ...)``; cells
    outside tissue are 0.  ``tissue`` is the mask the grid was built from (None when the
    heatmap was loaded from disk)."""

    probs: np.ndarray  # (rows, cols) float32
    step: int  # level-0 px per cell
    tissue: object | None = None  # h2g.tissue.TissueMask
    n_patches: int = 0

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.probs.shape)


def _tumour_column(out: np.ndarray, backend) -> np.ndarray:
    if out.ndim != 2 or out.shape[1] < 2:
        raise ExportError(f"{backend.source}: output of shape {tuple(out.shape)} is not "
                          "(batch, classes) class probabilities of a patch classifier")
    return out[:, 1]


def slide_heatmap(slide, backend: Backend, *, tissue=None, magnification: float = 10,
                  patch_size: int = 256, batch_size: int = 32, readers: int = 2,
                  progress: bool = True, timings: dict | None = None) -> Heatmap:
    """The tumour heatmap of ``slide``: tissue mask (:func:`h2g.tissue.detect_tissue`
    unless given) -> grid of non-overlapping ``patch_size`` patches at ``magnification``
    over tissue -> batches read by ``readers`` threads while ``backend`` predicts ->
    each patch's class-1 probability in its grid cell.

    ``timings`` (a dict) receives seconds per stage: ``tissue`` (mask + grid), ``reading``
    (reader threads' busy time, summed), ``inference`` (inside the backend), ``waiting``
    (inference idle, waiting for patches), ``patch_pipeline`` (wall time of the overlapped
    reading + inference), ``stitching``, and ``patches`` (count)."""
    from tqdm.auto import tqdm

    from h2g.patches import build_patch_grid
    from h2g.tissue import detect_tissue

    backend.require_inputs(("image",), "patch classifier")
    t0 = time.perf_counter()
    if tissue is None:
        tissue = detect_tissue(slide)
    grid = build_patch_grid(slide, tissue=tissue, magnification=magnification, patch_size=patch_size)
    t1 = time.perf_counter()
    n = len(grid.coords)
    probs = np.zeros(n, np.float32)
    inference = waiting = 0.0
    with PatchReader(slide, grid.coords, magnification=magnification, patch_size=patch_size,
                     batch_size=batch_size, readers=readers) as reader, \
            tqdm(total=n, unit="patch", desc="patches", disable=not progress, leave=False) as bar:
        batches = iter(reader)
        while True:
            tw = time.perf_counter()
            item = next(batches, None)
            ti = time.perf_counter()
            waiting += ti - tw
            if item is None:
                break
            start, batch = item
            probs[start:start + len(batch)] = _tumour_column(backend.predict(batch), backend)
            inference += time.perf_counter() - ti
            bar.update(len(batch))
    t2 = time.perf_counter()
    heat = np.zeros(grid.grid_shape, np.float32)
    if n:
        cells = grid.coords // grid.step
        heat[cells[:, 1], cells[:, 0]] = probs
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(tissue=t1 - t0, reading=reader.read_seconds, inference=inference,
                       waiting=waiting, patch_pipeline=t2 - t1, stitching=t3 - t2, patches=n)
    return Heatmap(probs=heat, step=int(grid.step), tissue=tissue, n_patches=n)


# --------------------------------------------------------------------------------------
# Refinement stage
# --------------------------------------------------------------------------------------
def _resize_plane(plane: np.ndarray, size: int, box=None) -> np.ndarray:
    """Bilinear resize of a 2-D float array to ``size`` x ``size`` (PIL; ``box`` is the
    source rectangle in pixel units, fractional allowed)."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box), dtype=np.float32)


def lowres_level(slide, size: int = 1024) -> int:
    """The lowest-resolution pyramid level with at least ``size`` px on each side
    (level 0 when none has)."""
    big = [i for i, (w, h) in enumerate(slide.level_dimensions) if min(w, h) >= size]
    return max(big, key=lambda i: slide.level_downsamples[i]) if big else 0


def heatmap_raster(heatmap: Heatmap, dimensions: tuple[int, int], size: int) -> np.ndarray:
    """The heatmap over the slide's level-0 extent ``dimensions`` = (w, h), bilinearly
    resized to ``size`` x ``size``.  Cells sit at their level-0 positions: the grid may
    stop short of the slide's partial last row / column (those areas count as 0) or run
    past its edge (cropped)."""
    width, height = dimensions
    step = float(heatmap.step)
    rows, cols = heatmap.grid_shape
    ext_rows, ext_cols = max(rows, -(-height // heatmap.step)), max(cols, -(-width // heatmap.step))
    cells = np.zeros((ext_rows, ext_cols), np.float32)
    cells[:rows, :cols] = heatmap.probs
    return _resize_plane(cells, size, box=(0.0, 0.0, width / step, height / step))


def refinement_inputs(slide, heatmap: Heatmap | None, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The refinement network's inputs: ``image`` ``(size, size, 3)`` float32 in [0, 1] -
    the lowest pyramid level with at least ``size`` px a side (:func:`lowres_level`),
    scaled to [0, 1] and bilinearly resized - and ``heat`` ``(size, size, 1)`` float32 -
    the heatmap placed on the slide's level-0 extent and resized the same way
    (:func:`heatmap_raster`; zeros when ``heatmap`` is None, for image-only models)."""
    level = slide.read_level(lowres_level(slide, size))
    image = np.stack([_resize_plane(level[..., c].astype(np.float32) / 255.0, size) for c in range(3)], axis=-1)
    if heatmap is None:
        heat = np.zeros((size, size), np.float32)
    else:
        heat = heatmap_raster(heatmap, slide.dimensions, size)
    return np.clip(image, 0.0, 1.0), np.clip(heat, 0.0, 1.0)[..., None]


def refine(backend: Backend, image: np.ndarray, heat: np.ndarray | None = None) -> np.ndarray:
    """Tumour probability ``(S, S)`` of a refinement network (inputs ``image`` +
    ``heatmap``) or an image-only low-resolution network (input ``image``)."""
    backend.require_inputs(INPUT_NAMES, "refinement network")
    feed = {"image": image[None]}
    if "heatmap" in backend.input_names:
        if heat is None:
            raise ExportError(f"{backend.source}: the refinement network needs a heatmap")
        feed["heatmap"] = heat.reshape(heat.shape[0], heat.shape[1], 1)[None]
    out = backend.predict(feed)
    if out.ndim != 4 or out.shape[-1] < 2:
        raise ExportError(f"{backend.source}: output of shape {tuple(out.shape)} is not "
                          "(1, S, S, classes) segmentation probabilities")
    return out[0, ..., 1]
