"""tf.distribute training (h2g.training.distribute): sharded batches, a mirrored step
against a one-device step, and two local workers under MultiWorkerMirroredStrategy."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

WORKER = REPO / "tests" / "distributed_worker.py"


def _sampler(manifest):
    from h2g.data.sampler import HierarchicalSampler, build_sources
    from h2g.io.manifest import load_manifest

    return HierarchicalSampler(build_sources(load_manifest(manifest).split("train"), progress=False), seed=0)


def test_replica_shards_partition_the_global_batch(tiny_cohort):
    """The shards of a batch, in order, are exactly the unsharded batch (same patches,
    same augmentation seeds), so replicas never read the same patch of a step."""
    from h2g.data.augment import ClassifierAugmentConfig, classifier_augmenter
    from h2g.data.dataset import read_batch

    sampler = _sampler(tiny_cohort)
    augment = classifier_augmenter(ClassifierAugmentConfig())
    whole, labels = read_batch(sampler, 3, 8, augment=augment, readers=2)
    parts = [read_batch(sampler, 3, 8, augment=augment, readers=2, shard=(i, 4)) for i in range(4)]
    assert all(p[0].shape[0] == 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), labels)


def test_a_batch_that_does_not_split_is_a_config_error(tiny_cohort):
    from h2g.core.errors import ConfigError
    from h2g.data.dataset import patch_dataset

    with pytest.raises(ConfigError, match="multiple of the replicas"):
        patch_dataset(_sampler(tiny_cohort), batch_size=6, shard=(0, 4))


def test_refinement_shards_partition_the_global_batch():
    from h2g.systems.h2g.refinement import RefinementSample, refinement_dataset

    rng = np.random.default_rng(0)
    samples = [RefinementSample(f"s{i}", 1, rng.random((32, 32, 3), np.float32), rng.random((32, 32, 1), np.float32),
                                rng.random((32, 32)) > 0.5) for i in range(5)]

    def flip(image, heat, mask, seed):
        return (image[:, ::-1], heat[:, ::-1], mask[:, ::-1]) if seed % 2 else (image, heat, mask)

    def first(ds):
        inputs, target = next(iter(ds))
        return inputs["image"].numpy(), target.numpy()

    whole = first(refinement_dataset(samples, batch_size=4, seed=1, augment=flip, start_batch=2))
    parts = [first(refinement_dataset(samples, batch_size=4, seed=1, augment=flip, start_batch=2, shard=(i, 2)))
             for i in range(2)]
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


@pytest.mark.slow
def test_mirrored_step_with_accumulation_equals_one_device(tiny_cohort, tmp_path):
    """Two logical CPU devices, global batch 8 (4 per replica), two micro-batches
    accumulated per update, batch normalisation synchronised: the weights and moving
    statistics after two epochs of two micro-batches equal those of the same training on one device
    (float tolerance), and training moved them 20x further.  The tolerance is 1e-3, not
    1e-6: synchronised batch norm computes the variance as E[x^2] - E[x]^2 over replicas
    (one device: two-pass), and Adam's first steps are ~ lr * sign(gradient), so a
    float-level difference in a near-zero gradient component moves a weight visibly.
    (Without batch normalisation the two agree to 3e-7.)"""
    proc = subprocess.run([sys.executable, str(WORKER), "mirrored", str(tiny_cohort), str(tmp_path / "w.npz")],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(tmp_path / "w.npz")
    assert int(data["replicas"]) == 2
    n = len([k for k in data.files if k.startswith("single_")])
    single = [data[f"single_{i}"] for i in range(n)]
    mirrored = [data[f"mirrored_{i}"] for i in range(n)]
    init = [data[f"init_{i}"] for i in range(n)]
    assert max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored)) < 1e-3
    # validation (6 patches a batch, outside the replicas) reports the one-device loss
    np.testing.assert_allclose(data["val_loss_mirrored"], data["val_loss_single"], atol=1e-3)
    assert min(float(np.abs(a - b).max()) for a, b in zip(single, init)) > 2e-3


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_the_classifier_in_lockstep(tiny_cohort, tmp_path):
    """Two local worker processes with a TF_CONFIG train a few steps of the tiny
    pipeline's MobileNetV2: they end with the same weights; the chief writes OUT, the
    other worker only OUT/_workers/worker-1; the stage key names the strategy."""
    import keras

    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TF_NUM_INTRAOP_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "classifier", str(tiny_cohort), str(tmp_path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    stages = [next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("STAGE ")) for out in outputs]
    chief, other = (Path(s) for s in stages)
    assert chief.parent == tmp_path / "_cache" and other.parent == tmp_path / "_workers" / "worker-1" / "_cache"
    assert chief.name == other.name  # the same stage key on both workers
    assert [p.name for p in tmp_path.iterdir()] == ["_cache", "_workers"] or set(
        p.name for p in tmp_path.iterdir()) == {"_cache", "_workers"}
    inputs = json.loads((chief / "done.json").read_text())["inputs"]
    assert inputs["params"]["strategy"] == "multiworker" and inputs["params"]["replicas"] == 2
    a = keras.models.load_model(chief / "classifier.keras").get_weights()
    b = keras.models.load_model(other / "classifier.keras").get_weights()
    assert len(a) == len(b) and all(np.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


@pytest.mark.slow
def test_multiworker_without_tf_config_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "--design", "otsu",
                           "--strategy", "multiworker", "--manifest", str(tmp_path / "none.csv"),
                           "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert "TF_CONFIG" in proc.stderr and "Traceback" not in proc.stderr
