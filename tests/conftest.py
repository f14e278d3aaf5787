"""Shared fixtures.  Real data is found through $H2G_REAL_DATA (default
../shared/data/real beside the repository); tests that need it skip when absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("H2G_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent (set H2G_REAL_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """The `tiny` synthetic cohort (6 slides: 3 train, 1 val, 2 test); its manifest path."""
    from h2g.data.cohort import make_cohort

    return make_cohort(tmp_path_factory.mktemp("tiny_cohort"), "tiny", seed=0, progress=False)


def tiny_config(seed: int = 0):
    """The smoke preset shrunk further so a whole design runs in seconds in tests.

    Heatmaps on the paper's grid of non-overlapping patches (``heatmap.stride=None``): the
    smoke preset's half stride reads four times the patches, and every H2G-Net pipeline
    test would pay for it; ``test_pipeline``'s half-stride test sets the smoke stride
    (``heatmap.stride=128``) where it is tested."""
    import dataclasses

    from h2g.systems.registry import load_config

    c = load_config("smoke", seed=seed)
    return c.replace(
        classifier=dataclasses.replace(c.classifier, batch_size=16, train_batches=6, val_batches=2, epochs=2),
        cluster=dataclasses.replace(c.cluster, n_batches=2, batch_size=16, n_clusters=3),
        heatmap=dataclasses.replace(c.heatmap, stride=None),
        refine=dataclasses.replace(c.refine, size=256, width=0.25, batch_size=2, epochs=2, patience=2),
        eval=dataclasses.replace(c.eval, figure_slides=2),
    )


@pytest.fixture(scope="session")
def smoke_run(tiny_cohort, tmp_path_factory):
    """Every H2G-Net design through the registry on the tiny cohort (tiny models, seed 0):
    ``(run folder, metrics by design)``; its stages (``OUT/_cache``) serve other tests."""
    from h2g.systems.registry import resolve, run

    out = tmp_path_factory.mktemp("runs")
    results = run(resolve("all", system="h2g"), tiny_cohort, out, tiny_config())
    return out, results


@pytest.fixture(scope="session")
def checker_path(tmp_path_factory) -> Path:
    """A 40x checker slide of 4.5 x 3.25 patches (helpers.CELL), pixel-exact."""
    from helpers import CELL
    from synthetic import make_slide

    path = tmp_path_factory.mktemp("slides") / "checker.tiff"
    return make_slide(path, size=(4 * CELL + CELL // 2, 3 * CELL + CELL // 4), pattern="checker",
                      cell=CELL, compression=None, downsamples=(1, 4))


@pytest.fixture(scope="session")
def deploy_models(tmp_path_factory):
    """The colour classifier and the threshold refiner (helpers) as ONNX and OpenVINO IR:
    ``{"patch" | "refine": (keras model, onnx path, xml path)}``."""
    from helpers import REFINE_SIZE, colour_model, threshold_refiner

    from h2g.export.conversion import signature, to_onnx, to_openvino

    folder = tmp_path_factory.mktemp("deploy_models")
    files = {}
    for name, model in (("patch", colour_model()), ("refine", threshold_refiner(REFINE_SIZE))):
        onnx_path = to_onnx(model, signature(model, name), folder / f"{name}.onnx")
        files[name] = (model, onnx_path, to_openvino(onnx_path, folder / f"{name}.xml"))
    return files


# ------------------------------------------------------------- parallel runs (pytest-xdist)
#: test files holding minutes of training, longest first: collected before every other file,
#: so that ``pytest -n 2 --dist loadfile --no-loadscope-reorder`` (the README's test command)
#: starts them first and the short files fill the other worker meanwhile
LONG_FILES = ("test_pipeline.py", "test_pipeline_training.py", "test_munet.py", "test_dmmn_pipeline.py",
              "test_distribute.py", "test_tools.py", "test_razn_training.py", "test_razn_pipeline.py")
#: session fixtures too costly to build twice: every test using one lives in one file, so
#: that ``--dist loadfile`` builds it on one worker
ONE_FILE_FIXTURES = ("smoke_run",)


def pytest_collection_modifyitems(config, items):
    for name in ONE_FILE_FIXTURES:
        files = sorted({item.path.name for item in items if name in getattr(item, "fixturenames", ())})
        if len(files) > 1:
            raise pytest.UsageError(f"the session fixture {name!r} is used in {', '.join(files)}: keep its tests "
                                    f"in one file, or each pytest-xdist worker trains it again")
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: collection order within


# ---------------------------------------------------------------------------- CPU seconds per test
def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=0, metavar="N",
                     help="print the N tests that used the most CPU seconds (this process and its children, "
                          "setup included): a ranking that a busy machine distorts less than wall time")


_CPU: dict = {}  # node id -> CPU seconds (setup, call and teardown), gathered from the reports
_PHASE: dict = {}  # node id -> CPU seconds at the start of the running phase


def _cpu_now() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _PHASE[item.nodeid] = _cpu_now()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    _PHASE[item.nodeid] = _cpu_now()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    _PHASE[item.nodeid] = _cpu_now()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's CPU seconds travel in its report (``user_properties``), so that under
    pytest-xdist the controller, which runs no test, can rank them (``--cpu-durations``)."""
    outcome = yield
    start = _PHASE.pop(item.nodeid, None)
    if start is not None:
        outcome.get_result().user_properties.append(("cpu_seconds", _cpu_now() - start))


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == "cpu_seconds":
            _CPU[report.nodeid] = _CPU.get(report.nodeid, 0.0) + value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``$H2G_TEST_TIMES`` set, one line per test appended to that file as it finishes
    (wall s, CPU s, node id), so that a long run can be read while it goes."""
    import time

    start, wall = _cpu_now(), time.perf_counter()
    yield
    log = os.environ.get("H2G_TEST_TIMES")
    if log:
        with open(log, "a") as f:
            f.write(f"{time.perf_counter() - wall:8.1f} {_cpu_now() - start:8.1f} {item.nodeid}\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption("--cpu-durations")
    if n and _CPU:
        terminalreporter.section(f"{n} largest CPU seconds (of {sum(_CPU.values()):.0f} in all)")
        for nodeid, seconds in sorted(_CPU.items(), key=lambda kv: -kv[1])[:n]:
            terminalreporter.write_line(f"{seconds:8.1f} s  {nodeid}")
