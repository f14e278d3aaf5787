"""Subprocess side of tests/test_distribute.py: logical devices and TF_CONFIG must be set
before TensorFlow initialises, so each check runs in a fresh interpreter.

    python tests/distributed_worker.py mirrored MANIFEST OUT.npz
        fit a small conv net with batch normalisation on the sampler's batches, once on
        one device and once mirrored over two logical CPUs, with gradient accumulation;
        saves the initial weights and both trained sets (moving statistics included).
    python tests/distributed_worker.py classifier MANIFEST OUT     (TF_CONFIG set)
        the tiny pipeline's MobileNetV2 classifier stage under MultiWorkerMirroredStrategy.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _small_net():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((256, 256, 3)),
        keras.layers.AveragePooling2D(8),
        keras.layers.Conv2D(8, 3, use_bias=False),  # a bias before BN has zero gradient: Adam would amplify noise
        keras.layers.BatchNormalization(momentum=0.5),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, activation="softmax"),
    ])


def mirrored(manifest: Path, out: Path) -> None:
    import numpy as np

    from h2g.data.dataset import patch_dataset
    from h2g.data.sampler import HierarchicalSampler, build_sources
    from h2g.io.manifest import load_manifest
    from h2g.training import distribute
    from h2g.training.fit import fit

    strategy = distribute.make_strategy("mirrored", replicas=2)
    sampler = HierarchicalSampler(build_sources(load_manifest(manifest).split("train"), progress=False), seed=0)

    def data(start, shard=None):
        return patch_dataset(sampler, batch_size=8, start_batch=start, shard=shard, readers=2)

    val = patch_dataset(sampler, batch_size=6, training=False, n_batches=2, readers=2)
    weights, val_loss = {"init": _small_net().get_weights()}, {}
    for name, chosen in (("single", None), ("mirrored", strategy)):
        with distribute.scope(chosen):
            model = _small_net()
        result = fit(model, data, val, loss="categorical_crossentropy", run_dir=out.parent / name, epochs=2,
                     steps_per_epoch=2, learning_rate=1e-2, accumulation_steps=2, verbose=0,
                     restore_best=False, strategy=chosen)
        weights[name] = model.get_weights()
        val_loss[name] = result.history["val_loss"]
    np.savez(out, replicas=strategy.num_replicas_in_sync,
             **{f"val_loss_{name}": v for name, v in val_loss.items()},
             **{f"{name}_{i}": w for name, ws in weights.items() for i, w in enumerate(ws)})


def classifier(manifest: Path, out: Path) -> None:
    from conftest import tiny_config

    from h2g.systems.h2g.pipeline import Pipeline
    from h2g.systems.registry import get_design
    from h2g.training import distribute

    strategy = distribute.make_strategy("multiworker")
    config = tiny_config().override(["classifier.train_batches=3", "classifier.epochs=1",
                                     "classifier.val_batches=1"])
    folder = distribute.worker_folder(out, strategy)
    stage = Pipeline(manifest, folder, config, strategy=strategy).classifier_stage(get_design("mob_pw"))
    print(f"STAGE {stage.dir}")


if __name__ == "__main__":
    {"mirrored": mirrored, "classifier": classifier}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
