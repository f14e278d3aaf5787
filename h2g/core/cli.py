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
  (:func:`require_training_stack`) instead of an ImportError; or, better, they parse
  their arguments and check their outputs first and then call :func:`start_tensorflow`
  (a wrong option is then reported in a fraction of a second, not after TensorFlow's
  start-up).
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


def start_tensorflow(verbose: bool = False, what: str | None = None) -> None:
    """What a CLI that trains or converts does once its arguments are parsed and its
    outputs checked: :func:`require_training_stack` (one line naming the extra in a
    deployment install), then TensorFlow imported quietly unless ``verbose``
    (:func:`preload_tensorflow_quietly`).  Called after argument parsing, so that a
    mistyped option is reported at once, not after TensorFlow's seconds of start-up."""
    require_training_stack(what or Path(sys.argv[0]).name or "this command")
    if not verbose:
        preload_tensorflow_quietly()


def add_verbose_argument(parser) -> None:
    parser.add_argument(*VERBOSE_FLAGS, dest="verbose", action="store_true",
                        help="also show TensorFlow's own log lines and debug messages")


def run_cli(main, argv=None, *, tensorflow: bool = False) -> int:
    """Run ``main(argv)``; an :class:`H2GError` becomes exit code 2 and its message on
    stderr without a traceback.  Returns the exit code (``main``'s return or 0).
    ``tensorflow=True`` preloads TensorFlow quietly unless ``-v`` is given
    (:func:`preload_tensorflow_quietly`) before ``main`` runs; CLIs whose arguments are
    cheap to check first (experiments/run.py, export/convert.py) call
    :func:`start_tensorflow` themselves after parsing instead."""
    args = sys.argv[1:] if argv is None else argv
    verbose = any(a in VERBOSE_FLAGS for a in args)
    quiet_tensorflow(verbose=verbose)
    with _InterruptWatch() as interrupted:
        try:
            if tensorflow and not any(a in ("-h", "--help") for a in args):
                start_tensorflow(verbose)
            code = main(argv)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except H2GError as exc:
            if interrupted.seen:  # the interrupt surfaced as another error (e.g. an import cut short)
                print("interrupted", file=sys.stderr)
                return 130
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception:
            if interrupted.seen:
                print("interrupted", file=sys.stderr)
                return 130
            raise
    return 0 if code is None else int(code)


#: Seconds a Ctrl-C gives the main thread to wind down before the process exits anyway.
INTERRUPT_GRACE_S = 3.0


class _InterruptWatch:
    """How a CLI answers Ctrl-C (main thread only; elsewhere it does nothing):

    - a SIGINT handler that notes the interrupt, then raises KeyboardInterrupt as
      Python's own does: a Ctrl-C that a library turns into another error (numpy's C
      extension import fails with ImportError when interrupted) is still exit code 130;
    - a watchdog thread woken by the signal itself (``signal.set_wakeup_fd``), which does
      not wait for the main thread: Python runs handlers only between bytecodes, and a
      native call (an engine loading a model) can hold the main thread for seconds.
      If the main thread has not finished within :data:`INTERRUPT_GRACE_S`, the watchdog
      terminates this process's worker processes and exits with 130.

    A SIGINT that is ignored (``SIG_IGN``, e.g. while the cohort stops its workers) wakes
    neither; after an interrupt, SIGINT stays ignored while the process exits."""

    def __init__(self):
        self.seen: list[int] = []
        self._installed = False

    def __enter__(self) -> "_InterruptWatch":
        import signal
        import threading

        current = signal.getsignal(signal.SIGINT)
        early = getattr(current, "__name__", "") == "_exit_130"  # a CLI's own, while it imported
        if threading.current_thread() is not threading.main_thread() \
                or (current is not signal.default_int_handler and not early):
            return self  # not ours to change (a test harness, an embedding program)
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        try:
            self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except ValueError:
            os.close(self._read)
            os.close(self._write)
            return self
        self._done = threading.Event()
        self._previous_handler = current
        signal.signal(signal.SIGINT, self._handler)
        self._thread = threading.Thread(target=self._watch, name="h2g-interrupt-watch", daemon=True)
        self._thread.start()
        self._installed = True
        return self

    def _handler(self, signum, frame):
        self.seen.append(signum)
        raise KeyboardInterrupt

    def _watch(self) -> None:
        import signal

        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:  # closed: the CLI returned
                return
            if signal.SIGINT in data and not self._done.wait(INTERRUPT_GRACE_S):
                self._exit_now()

    @staticmethod
    def _exit_now() -> None:
        import multiprocessing

        for child in multiprocessing.active_children():  # a process pool's workers
            child.terminate()
        for child in multiprocessing.active_children():
            child.join(0.5)
            if child.is_alive():
                child.kill()
        try:
            sys.stderr.write("interrupted\n")
            sys.stderr.flush()
        finally:
            os._exit(130)

    def __exit__(self, *exc) -> None:
        if not self._installed:
            return
        import signal

        self._done.set()
        # after an interrupt the process is on its way out (exit code 130): a second Ctrl-C
        # must not cut its exit short with a traceback, so it is ignored from here on
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.seen else self._previous_handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # wakes the watchdog, which then returns
        self._thread.join(1.0)
        os.close(self._read)
