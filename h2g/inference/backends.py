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

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Union

import numpy as np

from h2g.core.choices import Choice
from h2g.core.errors import ConfigError, ExportError, ModelError
from h2g.core.resources import available_cores



class Engine(Choice):
    KERAS = "keras"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class Precision(Choice):
    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"


class Hint(Choice):
    LATENCY = "latency"
    THROUGHPUT = "throughput"


ENGINES = Engine.values()
DEVICES = ("CPU", "GPU")
PRECISIONS = Precision.values()
HINTS = Hint.values()


class Provider(Choice):
    """ONNX Runtime's GPU execution provider (``--provider``): ``auto`` is TensorRT where
    available, CUDA for what TensorRT does not take (or alone)."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    CUDA = "cuda"


ORT_GPU_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDERS = Provider.values()
INPUT_NAMES = ("image", "heatmap")  # H2G-Net's refinement network; other models name their views

Inputs = Union[np.ndarray, Mapping[str, np.ndarray]]


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
    metadata: object | None  # h2g.inference.metadata.ModelMetadata read from the model file

    def predict(self, inputs: Inputs) -> np.ndarray: ...

    def info(self) -> dict: ...

    def require_inputs(self, allowed: tuple[str, ...], role: str, required: tuple[str, ...] = ("image",)) -> None: ...


class _BackendBase:
    """Shared input handling and reporting of the concrete backends."""

    name = ""
    source = ""
    version = ""
    device = "CPU"
    threads: int | None = None
    precision = "f32"
    input_names: tuple[str, ...] = ()
    metadata = None  # ModelMetadata embedded in the model file (ONNX metadata_props, IR rt_info, sidecar)
    image_size: int | None = None  # side of the `image` input when the model fixes it
    hint = "latency"  # "throughput": sub-batches of `sub_batch` run concurrently on `streams`
    streams = 1
    sub_batch: int | None = None

    @property
    def quantised(self) -> bool:
        """The model was quantised to int8 (its metadata says so: ``export/convert.py --int8``)."""
        return bool(self.metadata is not None and self.metadata.extras.get("quantization"))

    def info(self) -> dict:
        """Engine, version, device, threads, precision and concurrency actually in use;
        an int8 model's precision reads ``int8+<the precision of its other layers>``."""
        return {
            "engine": self.name,
            "version": self.version,
            "device": self.device,
            "threads": self.threads,
            "precision": f"int8+{self.precision}" if self.quantised else self.precision,
            "model": self.source,
            "inputs": list(self.input_names),
            "hint": str(self.hint),
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

    def require_inputs(self, allowed: tuple[str, ...], role: str, required: tuple[str, ...] = ("image",)) -> None:
        """Fail with a clear :class:`ExportError` unless the model's inputs include every
        name in ``required`` and no name outside ``allowed`` (H2G-Net: ``image`` and, for a
        refinement network, ``heatmap``; a multi-view model: its view names)."""
        names = set(self.input_names)
        if not set(required) <= names or not names <= set(allowed):
            raise ExportError(f"{self.source}: wrong input names {sorted(names)} for a {role}; "
                              f"expected {' + '.join(repr(a) for a in allowed)} "
                              "(export models with export/convert.py)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, device={self.device!r}, precision={self.precision!r})"

    def check_output(self, shape) -> None:
        """:class:`ExportError` (one line: the model file, its output shape and what the
        metadata says) when the first output's ``shape`` (``None`` for a dynamic
        dimension) disagrees with the metadata: its rank with the output kind
        (``class_probs`` (B, C), ``pixel_probs`` (B, H, W, C)) or its last dimension with
        the number of classes.  Called when a backend loads its model, so a classifier with
        three outputs whose metadata names two is refused before a slide is read."""
        check_output_shape(shape, self.metadata, self.source)


#: The first output's rank for each metadata output kind (clusters: not checked).
OUTPUT_RANKS = {"class_probs": 2, "pixel_probs": 4}


def check_output_shape(shape, metadata, source: str) -> None:
    """See :meth:`_BackendBase.check_output`; nothing to check without metadata."""
    if metadata is None:
        return
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
    rank = OUTPUT_RANKS.get(metadata.output)
    n = len(metadata.classes)
    wanted = None
    if rank is not None and len(dims) != rank:
        wanted = "(batch, classes)" if rank == 2 else "(batch, height, width, classes)"
    elif n and dims and dims[-1] is not None and dims[-1] != n:
        wanted = f"{n} classes in the last dimension"
    if wanted is not None:
        shown = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
        names = f" ({', '.join(metadata.class_names)})" if n else ""
        raise ExportError(f"{source}: the model's output has shape {shown}, but its metadata says {metadata.output} "
                          f"over {n} classes{names}: {wanted} expected; the model and its metadata do not belong "
                          "together (export it again with export/convert.py)")


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

    import h2g.models  # noqa: F401  (registers the architectures' layers)
    import h2g.training.clustering  # noqa: F401  (registers the cluster model's layers)

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

    def __init__(self, model, device: str | None = None, metadata=None):
        import keras
        import tensorflow as tf

        self.metadata = metadata  # a .keras file's own comes from its <model>.meta.json sidecar
        if isinstance(model, (str, Path)) and metadata is None:
            from h2g.inference.metadata import read_sidecar

            self.metadata = read_sidecar(model)
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
        self.threads = tf.config.threading.get_intra_op_parallelism_threads() or available_cores()
        policy = keras.config.dtype_policy().compute_dtype
        self.precision = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(policy, policy)
        self._structure, self._keras_order = keras_inputs(model)
        # a single input is the image, whatever its Keras name (as in export)
        self.input_names = self._keras_order if len(self._keras_order) > 1 else ("image",)
        self.image_size = _square_side(tuple(self.model.inputs[0].shape))
        self.check_output(tuple(self.model.outputs[0].shape))

    def predict(self, inputs: Inputs) -> np.ndarray:
        # eager: no retracing per batch size
        return np.asarray(call_keras(self.model, self._structure, self._keras_order, self._feed(inputs)))


def tensorrt_options() -> dict:
    """TensorRT provider options: engines and kernel timings cached on disk
    (``$H2G_TRT_CACHE``, default ``~/.cache/h2g/tensorrt``), so that an engine is built
    once per model and input shape, not in every session."""
    import os

    cache = os.environ.get("H2G_TRT_CACHE") or str(Path.home() / ".cache" / "h2g" / "tensorrt")
    Path(cache).mkdir(parents=True, exist_ok=True)
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}


def gpu_providers(available, provider: str | None = None) -> list:
    """The ONNX Runtime providers to ask for on a GPU (CPU is appended by the caller),
    from the ``available`` ones: ``provider`` None / ``"auto"`` -> TensorRT (with
    :func:`tensorrt_options`) and CUDA, whichever are there; ``"tensorrt"`` -> TensorRT,
    with CUDA behind it for the nodes TensorRT does not take (ONNX Runtime's advice);
    ``"cuda"`` -> CUDA alone.  :class:`ExportError` naming the available providers when
    the one asked for (or any GPU provider) is missing; :class:`ConfigError` for an
    unknown name."""
    provider = (provider or "auto").lower()
    if provider not in PROVIDERS:
        raise ConfigError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    available = list(available)
    wanted = {"auto": ("tensorrt", "cuda"), "tensorrt": ("tensorrt", "cuda"), "cuda": ("cuda",)}[provider]
    chosen = [ORT_GPU_PROVIDERS[w] for w in wanted if ORT_GPU_PROVIDERS[w] in available]
    if provider != "auto" and ORT_GPU_PROVIDERS[provider] not in chosen:
        raise ExportError(f"provider {provider} requested but ONNX Runtime has no {ORT_GPU_PROVIDERS[provider]} "
                          f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install 'h2g[gpu]'"
                          + (" and TensorRT" if provider == "tensorrt" else "") + ")")
    if not chosen:
        raise ExportError(f"device GPU requested but ONNX Runtime has no CUDA or TensorRT "
                          f"execution provider (available: {', '.join(available)}); install "
                          "onnxruntime-gpu (pip install 'h2g[gpu]') or use --device CPU")
    return [(p, tensorrt_options()) if p == ORT_GPU_PROVIDERS["tensorrt"] else p for p in chosen]


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
                 hint: str = "latency", sub_batch: int | None = None, provider: str | None = None):
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
        check_concurrency(hint, sub_batch)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device == "GPU":
            providers = gpu_providers(available, provider) + providers
        elif provider not in (None, "auto"):
            raise ConfigError(f"provider {provider} is a GPU execution provider: use it with device GPU")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.threads = int(threads) if threads else available_cores()
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
        started = self.session.get_providers()
        if device == "GPU" and provider in ORT_GPU_PROVIDERS and ORT_GPU_PROVIDERS[provider] not in started:
            raise ExportError(f"provider {provider} requested but ONNX Runtime could not start "
                              f"{ORT_GPU_PROVIDERS[provider]} (its CUDA / cuDNN / TensorRT libraries missing?); "
                              f"it fell back to {started}")
        if device == "GPU" and not set(started) & set(self.GPU_PROVIDERS):
            raise ExportError(f"device GPU requested but ONNX Runtime could not start a GPU provider "
                              f"(CUDA/cuDNN libraries missing?); it fell back to {self.session.get_providers()}")
        self.version = ort.__version__
        self.device = device
        #: the execution providers the session runs with, first = preferred
        self.providers = tuple(self.session.get_providers())
        self.precision = "f32"
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.image_size = _square_side(tuple(self.session.get_inputs()[0].shape))
        self.metadata = _embedded(self.session.get_modelmeta().custom_metadata_map.get(_META_KEY), path)
        self._output = self.session.get_outputs()[0].name
        self.check_output(tuple(self.session.get_outputs()[0].shape))

    def info(self) -> dict:
        """:meth:`_BackendBase.info` and the execution ``providers`` the session runs with."""
        return {**super().info(), "providers": list(self.providers)}

    def _run(self, feed: dict) -> np.ndarray:
        return self.session.run([self._output], feed)[0]

    def _padded(self, feed: dict) -> tuple[dict, int]:
        """TensorRT builds an engine per range of input shapes and rebuilds it (for
        minutes, with full-size models) when a batch falls outside: a batch smaller than
        the largest seen so far (a slide's last one) is padded with zeros to that size,
        so one engine serves every batch.  Returns (feed, rows to keep)."""
        rows = _rows(feed)
        self._max_rows = max(getattr(self, "_max_rows", 0), rows)
        if rows == self._max_rows:
            return feed, rows
        return {k: np.concatenate([v, np.zeros((self._max_rows - rows,) + v.shape[1:], v.dtype)])
                for k, v in feed.items()}, rows

    def predict(self, inputs: Inputs) -> np.ndarray:
        feed = self._feed(inputs)
        try:
            if self.providers[0] == ORT_GPU_PROVIDERS["tensorrt"]:
                padded, rows = self._padded(feed)
                return self._run(padded)[:rows]
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
    fastest for MobileNetV2 on 2 cores of an earlier machine; on an AVX-512 EPYC 2-4 was 6 % faster
    in bf16 and no different in int8: ``tools/bench_sub_batch.py``; an equal share per
    stream on GPU) queued on twice
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
        if precision is not None:
            precision = Precision.parse(precision, "precision")
        check_concurrency(hint, sub_batch)
        hint = Hint(hint)
        config = {"PERFORMANCE_HINT": hint.value.upper()}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision.value
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses
            raise ExportError(f"{path}: OpenVINO cannot read the model: {_summary(exc)}") from None
        self.metadata = _openvino_metadata(model, path)
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
        output = self.compiled.outputs[0].get_partial_shape()
        self.check_output(tuple(d.get_length() if d.is_static else None for d in output))
        self.hint = hint
        try:
            self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        except Exception:  # not every plugin reports it
            self.streams = 1
        self._request = self.compiled.create_infer_request()
        self._queue = None
        self.sub_batch = int(sub_batch) if sub_batch else (1 if device == "CPU" else None)
        self._parts: dict[int, np.ndarray] = {}
        if hint == "throughput":
            self._queue = ov.AsyncInferQueue(self.compiled, 2 * max(1, self.streams))
            # The callback must not hold the backend: the queue keeps it in C++, where Python's
            # garbage collector cannot see the cycle, and a backend in such a cycle (its compiled
            # model and stream threads) was never freed: a cohort worker grew by 8 MB per slide.
            self._queue.set_callback(_collector(self._parts))

    def predict(self, inputs: Inputs) -> np.ndarray:
        feed = self._feed(inputs)
        try:
            if self._queue is None or _rows(feed) < 2:
                self._request.infer(feed)
                return self._request.get_output_tensor(0).data.copy()
            self._parts.clear()
            for start, part in _sub_feeds(feed, self.sub_batch or -(-_rows(feed) // max(1, self.streams))):
                self._queue.start_async(part, start)
            self._queue.wait_all()
        except Exception as exc:  # OpenVINO's RuntimeError subclasses
            raise self._failed(feed, exc) from None
        return np.concatenate([self._parts[k] for k in sorted(self._parts)])


def _collector(parts: dict):
    """An AsyncInferQueue callback storing each request's output in ``parts`` by its
    userdata (the sub-batch's first row); it runs in OpenVINO's callback thread."""

    def collect(request, start: int) -> None:
        parts[start] = request.get_output_tensor(0).data.copy()

    return collect


_META_KEY = "h2g"  # = h2g.inference.metadata.KEY


def _embedded(text: str | None, path):
    """The :class:`~h2g.inference.metadata.ModelMetadata` in ``text`` (None when absent)."""
    from h2g.inference.metadata import from_text

    return from_text(text, str(path))


def _openvino_metadata(model, path: Path):
    """Metadata of a model OpenVINO read: its rt_info entry (IR written by export), or for
    an ``.onnx`` file its metadata_props (OpenVINO's ONNX reader drops them)."""
    if model.has_rt_info(_META_KEY):
        return _embedded(model.get_rt_info(_META_KEY).astype(str), path)
    if path.suffix.lower() == ".onnx":
        from h2g.inference.metadata import read_onnx_metadata

        return read_onnx_metadata(path)
    return None


def _rows(feed: dict[str, np.ndarray]) -> int:
    """The batch size of a feed."""
    return len(next(iter(feed.values())))


def _sub_feeds(feed: dict[str, np.ndarray], size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(start, rows start:start + size of every input)`` over a feed, in order: the
    sub-batches of the throughput hint."""
    for start in range(0, _rows(feed), size):
        yield start, {name: value[start:start + size] for name, value in feed.items()}


def check_concurrency(hint: str, sub_batch: int | None) -> None:
    """:class:`ConfigError` for an unknown hint or a sub-batch size below 1."""
    Hint.parse(hint, "hint")
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
                 hint: str = "latency", provider: str | None = None, sub_batch: int | None = None) -> Backend:
    """A backend for a Keras model object or a model file.  ``engine`` defaults from the
    file type (:func:`engine_for`); OpenVINO also runs ``.onnx`` files.  ``hint``
    (``latency`` or ``throughput``: see :class:`OpenVINOBackend` and
    :class:`OnnxRuntimeBackend`) and ``sub_batch`` (the throughput hint's sub-batch size,
    None: the engine's default) are ignored by the Keras backend.  ``provider``
    (ONNX Runtime on GPU: ``auto``, ``tensorrt`` or ``cuda``, :func:`gpu_providers`)
    is refused by the other engines."""
    if engine is None:
        engine = "keras" if not isinstance(model_or_path, (str, Path)) else engine_for(model_or_path)
    engine = Engine.parse(engine, "engine")
    hint = Hint.parse(hint, "hint")
    if provider is not None:
        provider = Provider.parse(provider, "provider")
    if provider not in (None, Provider.AUTO) and engine != Engine.ONNXRUNTIME:
        raise ConfigError(f"provider {provider} selects an ONNX Runtime execution provider; "
                          f"it needs engine onnxruntime, not {engine}")
    if engine == Engine.KERAS:
        if precision not in (None, "f32"):
            raise ConfigError("the Keras backend runs f32; use --engine openvino for other precisions")
        return KerasBackend(model_or_path, device=_check_device(device))
    if not isinstance(model_or_path, (str, Path)):
        raise ConfigError(f"engine {engine} needs a model file, not a Keras model")
    if engine == Engine.ONNXRUNTIME:
        return OnnxRuntimeBackend(model_or_path, device=device, threads=threads, precision=precision, hint=hint,
                                  provider=provider, sub_batch=sub_batch)
    return OpenVINOBackend(model_or_path, device=device, precision=precision, threads=threads, hint=hint,
                           sub_batch=sub_batch)
