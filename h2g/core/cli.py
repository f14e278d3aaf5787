"""Shared command-line plumbing.

- :func:`run_cli`: an :class:`H2GError` becomes exit code 2 and one line on stderr (no
  traceback); Ctrl-C exit code 130.  Unless ``-v``/``--verbose`` is on the command line it
  first keeps TensorFlow's C++ logging quiet (``TF_CPP_MIN_LOG_LEVEL=3``: no "failed call
  to cuInit", NodeDef or CPU-feature lines between the package's progress bars) - it must
  run before TensorFlow is imported, which the CLIs do lazily.  A value the user set in
  the environment is kept.
  CLIs that use TensorFlow pass ``tensorflow=True`` so that its C++ start-up lines,
  which no log level silences in TF 2.21, are swallowed too, and so that a deployment
  install (the base package, no TensorFlow) gets one line naming the extra to install
  (:func:`require_training_stack`) instead of an ImportError.
- :func:`add_verbose_argument`: the ``-v`` option every CLI shares.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from h2g.core.errors import H2GError

VERBOSE_FLAGS = ("-v", "--verbose")


def quiet_tensorflow(verbose: bool = False) -> None:
    """Silence TensorFlow's and absl's start-up chatter unless ``verbose``."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def preload_tensorflow_quietly() -> None:
    """Import TensorFlow and let it probe its devices with the process's stderr (file
    descriptor 2) sent to a temporary file: TensorFlow 2.21 writes its start-up lines
    ("All log messages before absl::InitializeLog()", oneDNN and CUDA notices, "failed call
    to cuInit") from C++ before any log level applies.  An import that fails shows what
    was captured.  Only for CLIs that use TensorFlow anyway: the deployment CLIs never
    import it."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


#: what the ``train`` extra adds (setup.cfg), by import name
TRAINING_STACK = ("tensorflow", "keras", "tf2onnx", "onnx", "sklearn", "albumentations", "matplotlib")


def missing_training_packages() -> list[str]:
    """The import names of the training stack (the ``train`` extra) not installed here."""
    import importlib.util

    return [name for name in TRAINING_STACK if importlib.util.find_spec(name) is None]


def require_training_stack(what: str = "this command") -> None:
    """:class:`H2GError` naming the extra when the training stack is not installed (a
    deployment install: ``pip install h2g`` without ``[train]``)."""
    missing = missing_training_packages()
    if missing:
        raise H2GError(f"{what} trains or converts models and needs the training stack, which is not installed "
                       f"here (missing: {', '.join(missing)}): pip install \"h2g[train]\" "
                       "(from a checkout: pip install -e \".[train]\"); segmentation, cohort inference and "
                       "benchmarks of exported models need only the base install")


def add_verbose_argument(parser) -> None:
    parser.add_argument(*VERBOSE_FLAGS, dest="verbose", action="store_true",
                        help="also show TensorFlow's own log lines and debug messages")


def run_cli(main, argv=None, *, tensorflow: bool = False) -> int:
    """Run ``main(argv)``; an :class:`H2GError` becomes exit code 2 and its message on
    stderr without a traceback.  Returns the exit code (``main``'s return or 0).
    ``tensorflow=True`` (CLIs that train or convert) preloads TensorFlow quietly unless
    ``-v`` is given (:func:`preload_tensorflow_quietly`)."""
    args = sys.argv[1:] if argv is None else argv
    verbose = any(a in VERBOSE_FLAGS for a in args)
    quiet_tensorflow(verbose=verbose)
    try:
        if tensorflow and not any(a in ("-h", "--help") for a in args):
            require_training_stack(Path(sys.argv[0]).name or "this command")
            if not verbose:
                preload_tensorflow_quietly()
        code = main(argv)
    except H2GError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)
