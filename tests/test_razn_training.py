"""RAZN's Algorithm 1: the reward's sign on toys where the answer is known, the bounded
Bernoulli, the masked loss against a hand computation, exact resume."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from h2g.core.errors import ModelError
from h2g.inference.zoom import bounded_bernoulli
from h2g.models.razn import build_policy, build_resnet18_fcn
from h2g.systems.razn.training import RaznTrainer, UnitTrainer, masked_cross_entropy, read_log

S, C = 16, 3


def _onehot_net(size, sharpness, name):
    """A network without weights whose output is softmax(sharpness * input): fed a
    one-hot image of the labels it predicts them (cross-entropy ~0.24 for sharpness 2)."""
    x = keras.Input((size, size, 3))
    return keras.Model(x, keras.layers.Softmax()(keras.layers.Rescaling(sharpness)(x)), name=name)


def _uniform_net(size, name):
    x = keras.Input((size, size, 3))
    return keras.Model(x, keras.layers.Lambda(lambda t: tf.ones_like(t) / 3.0)(x), name=name)


def _toy_batch(rng, b=8):
    """Labels constant on 2x2 blocks of the fine grid; x1 = their one-hot image, x0 = the
    one-hot image at the coarse grid (so either net can be the 'informed' one)."""
    coarse = rng.integers(0, C, (b, S, S))
    y = np.repeat(np.repeat(coarse, 2, 1), 2, 2)
    eye = np.eye(C, dtype=np.float32)
    return {"x0": eye[coarse], "x1": eye[y]}, y.astype(np.int32)


def _train_policy(zoom_helps: bool, steps=60):
    keras.utils.set_random_seed(0)
    policy = build_policy(S, width=0.125)
    if zoom_helps:  # the fine net sees the labels, the coarse one guesses
        coarse, fine = _uniform_net(S, "coarse"), _onehot_net(S, 2.0, "fine")
    else:
        coarse, fine = _onehot_net(S, 2.0, "coarse"), _uniform_net(S, "fine")
    trainer = RaznTrainer(policy, coarse, fine, alpha=0.8, lr=0.01, seed=0)
    rng = np.random.default_rng(0)
    for step in range(steps):
        inputs, y = _toy_batch(rng)
        trainer.step(inputs["x0"], inputs["x1"], y, step)
    test, _ = _toy_batch(np.random.default_rng(99), 32)
    return float(np.mean(policy(test["x0"], training=False)))


@pytest.mark.slow
def test_policy_learns_to_zoom_when_zooming_lowers_the_loss():
    assert _train_policy(zoom_helps=True) > 0.9


@pytest.mark.slow
def test_policy_learns_not_to_zoom_when_zooming_raises_the_loss():
    assert _train_policy(zoom_helps=False) < 0.1


def test_bounded_bernoulli_stays_in_its_bounds():
    p = np.linspace(0, 1, 101)
    for alpha in (0.5, 0.8, 1.0):
        pt = bounded_bernoulli(p, alpha)
        assert pt.min() >= 1 - alpha - 1e-12 and pt.max() <= alpha + 1e-12
        assert bounded_bernoulli(0.0, alpha) == pytest.approx(1 - alpha)
        assert bounded_bernoulli(1.0, alpha) == pytest.approx(alpha)
    # the policy's zoom draws follow p~: with p = 1 everywhere, a = 1 in 80 % of the draws
    u = tf.random.stateless_uniform([20000], tf.constant([0, 0], tf.int64)).numpy()
    assert abs((u < bounded_bernoulli(1.0, 0.8)).mean() - 0.8) < 0.01


def test_masked_cross_entropy_by_hand():
    probs = np.full((2, 2, 2, 3), 1 / 3, np.float32)
    probs[0, 0, 0] = [0.5, 0.25, 0.25]
    labels = np.array([[[0, 255], [1, 2]], [[255, 255], [255, 255]]])
    got = masked_cross_entropy(tf.constant(probs), tf.constant(labels)).numpy()
    expected = (-np.log(0.5) - np.log(1 / 3) - np.log(1 / 3)) / 3
    np.testing.assert_allclose(got, [expected, 0.0], rtol=1e-6)


def _real_trainer(seed=0):
    keras.utils.set_random_seed(seed)
    return RaznTrainer(build_policy(S, 0.125), build_resnet18_fcn(C, S, 0.125), build_resnet18_fcn(C, S, 0.125),
                       lr=0.01, seed=seed)


def _batches(start):
    def gen():
        k = start
        while True:
            rng = np.random.default_rng(k)
            yield {"x0": rng.random((4, S, S, 3), np.float32), "x1": rng.random((4, 2 * S, 2 * S, 3), np.float32)}, \
                rng.integers(0, C, (4, 2 * S, 2 * S)).astype(np.int32)
            k += 1
    return gen()


def test_a_diverged_step_stops_training_before_its_weights_are_saved(tmp_path):
    """A NaN image from step 3 on makes every loss NaN: training stops there with one line
    naming the run folder and the step, and the step-2 checkpoint is left as it was (the
    weights in it are numbers), so nothing downstream gets NaN networks."""
    def poisoned(start):
        for k, (inputs, y) in enumerate(_batches(start), start=start):
            if k >= 2:
                inputs = {"x0": np.full_like(inputs["x0"], np.nan), "x1": inputs["x1"]}
            yield inputs, y

    trainer = _real_trainer()
    with pytest.raises(ModelError, match=r"training diverged at step 3: .*policy_loss.* the checkpoint of "
                                         r"step 2 is kept") as error:
        trainer.fit(poisoned, steps=6, run_dir=tmp_path, checkpoint_every=2, progress=False)
    assert str(tmp_path) in str(error.value)
    saved = np.load(tmp_path / "checkpoint.npz")
    assert saved.files and all(np.isfinite(saved[k]).all() for k in saved.files)
    assert read_log(tmp_path / "log.csv")["step"] == [2.0]


@pytest.mark.slow
def test_resumed_run_gives_the_weights_of_an_uninterrupted_one(tmp_path):
    """Fresh networks from the same seed restored from a checkpoint after 2 of 4 steps end
    with the weights of a 4-step run (so training is also repeatable for a seed)."""
    tf.config.experimental.enable_op_determinism()
    whole = _real_trainer()
    whole.fit(_batches, steps=4, run_dir=tmp_path / "whole", checkpoint_every=2, progress=False)
    part = _real_trainer()
    part.fit(_batches, steps=2, run_dir=tmp_path / "part", checkpoint_every=2, progress=False)
    resumed = _real_trainer()  # a fresh process: new networks, restored from the checkpoint
    log = resumed.fit(_batches, steps=4, run_dir=tmp_path / "part", checkpoint_every=2, resume=True,
                      progress=False)
    assert log["step"] == [2.0, 4.0]
    for a, b in zip(whole._variables(), resumed._variables()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(whole._variables(), part._variables()))


@pytest.mark.slow
def test_baseline_unit_trains_a_step():
    from h2g.models.razn import unit_model

    keras.utils.set_random_seed(0)
    unit = unit_model("attention", build_resnet18_fcn(C, S, 0.125), attention_width=4)
    trainer = UnitTrainer(unit, outputs=("segmentation", "enlarge", "stitch"), lr=0.01)
    before = [v.numpy().copy() for v in unit.trainable_variables]
    inputs, y = next(_batches(0))
    logs = trainer.step(inputs["x0"], inputs["x1"], y, 0)
    assert logs["loss"] == pytest.approx(logs["loss_segmentation"] + logs["loss_enlarge"] + logs["loss_stitch"],
                                         rel=1e-5)
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, unit.trainable_variables))


@pytest.mark.slow
def test_reward_by_hand_with_the_floor():
    """R = a (J0 - J1) / max(J0, floor), checked on constant networks: coarse J0 =
    -log(1/3), fine J1 = -log(p_true) of softmax(2 * one-hot); zoom draws with p~ = 0.8."""
    keras.utils.set_random_seed(0)
    policy = build_policy(S, width=0.125)
    trainer = RaznTrainer(policy, _uniform_net(S, "c"), _onehot_net(S, 2.0, "f"), alpha=0.8, reward_floor=2.0,
                          lr=0.0, seed=3)
    inputs, y = _toy_batch(np.random.default_rng(0), 64)
    logs = trainer.step(inputs["x0"], inputs["x1"], y, 0)
    j0, j1 = np.log(3.0), -np.log(np.exp(2) / (np.exp(2) + 2))
    assert logs["j0"] == pytest.approx(j0, rel=1e-5) and logs["j1"] == pytest.approx(j1, rel=1e-4)
    assert logs["reward"] == pytest.approx(logs["zoom_rate"] * (j0 - j1) / 2.0, rel=1e-4)  # floor 2 > J0


# --------------------------------------------------------------------------------------
# Which regions each network is trained on (Algorithm 1's rule, or every region)
# --------------------------------------------------------------------------------------
def _marker_policy():
    """p = 1 on regions whose first channel's mean is > 0.5, else 0 (no weights): with
    alpha = 1 the drawn action is exactly p."""
    x = keras.Input((S, S, 3))
    p = keras.layers.Lambda(lambda t: tf.cast(tf.reduce_mean(t[..., :1], axis=[1, 2, 3]) > 0.5, tf.float32)[:, None])(x)
    return keras.Model(x, p, name="marker_policy")


def _marked_batch(b=8, zoomed=4):
    rng = np.random.default_rng(5)
    x0 = rng.random((b, S, S, 3), np.float32) * 0.4  # first-channel mean ~0.2: no zoom
    x0[:zoomed, ..., 0] += 0.6  # ~0.8: zoom
    x1 = rng.random((b, 2 * S, 2 * S, 3), np.float32)
    y = rng.integers(0, C, (b, 2 * S, 2 * S)).astype(np.int32)
    return x0, x1, y


def _conv_net(name="conv"):
    """A seeded FCN without batch normalisation (whose batch statistics would mix the
    regions a rule leaves out into the step)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((S, S, 3))
    return keras.Model(x, keras.layers.Softmax()(keras.layers.Conv2D(C, 3, padding="same")(x)), name=name)


def _unit_step(unit_name, x0, x1, y, build):
    """One step of the baseline ``unit_name`` on its network (the independent expectation)."""
    from h2g.models.razn import unit_model

    fcn = build()
    trainer = UnitTrainer(unit_model(unit_name, fcn), lr=0.01)
    trainer.step(x0, x1, y, 0)
    return fcn


def _razn_step(x0, x1, y, build, **kw):
    nets = {"coarse": build(), "fine": build()}
    trainer = RaznTrainer(_marker_policy(), nets["coarse"], nets["fine"], alpha=1.0, lr=0.01, seed=0, **kw)
    logs = trainer.step(x0, x1, y, 0)
    assert logs["zoom_rate"] == pytest.approx(0.5)
    return nets


def _seeded_fcn():
    from h2g.models.razn import build_razn_networks

    return build_razn_networks(C, S, 0.125, seed=0)["coarse"]


def _assert_same_weights(a, b, same=True):
    pairs = list(zip(a.variables, b.variables))
    assert len(pairs) == len(a.variables) == len(b.variables)
    close = [np.allclose(u.numpy(), v.numpy(), rtol=1e-5, atol=1e-6) for u, v in pairs]
    assert all(close) if same else not all(close)


def test_razn_fcns_start_from_the_baselines_weights():
    from h2g.models.razn import build_razn_networks

    nets = build_razn_networks(C, S, 0.125, seed=4)
    keras.utils.set_random_seed(4)
    scale1 = build_resnet18_fcn(C, S, 0.125)
    for role in ("coarse", "fine"):
        for u, v in zip(nets[role].variables, scale1.variables):
            np.testing.assert_array_equal(u.numpy(), v.numpy())


@pytest.mark.slow
def test_algorithm1_trains_each_net_on_the_regions_its_action_chose():
    """The paper's rule: the coarse net takes Scale 1's step on the 4 unzoomed regions
    only, the fine net Scale 2's step on the 4 zoomed ones (nets without batch
    normalisation: its batch statistics take every region the net runs on)."""
    x0, x1, y = _marked_batch()
    nets = _razn_step(x0, x1, y, _conv_net)
    _assert_same_weights(nets["coarse"], _unit_step("scale1", x0[4:], x1[4:], y[4:], _conv_net))
    _assert_same_weights(nets["fine"], _unit_step("scale2", x0[:4], x1[:4], y[:4], _conv_net))
    _assert_same_weights(nets["coarse"], _unit_step("scale1", x0, x1, y, _conv_net), same=False)


@pytest.mark.parametrize("build", [_conv_net, pytest.param(_seeded_fcn, marks=pytest.mark.slow, id="resnet18_fcn")])
def test_nets_trained_on_all_regions_take_the_baselines_steps(build):
    """coarse_regions = fine_regions = "all": whatever the policy draws, the coarse net
    takes Scale 1's step on the whole batch and the fine net Scale 2's (with the dilated
    ResNet18 FCN too, batch normalisation included)."""
    x0, x1, y = _marked_batch()
    nets = _razn_step(x0, x1, y, build, coarse_regions="all", fine_regions="all")
    _assert_same_weights(nets["coarse"], _unit_step("scale1", x0, x1, y, build))
    _assert_same_weights(nets["fine"], _unit_step("scale2", x0, x1, y, build))


def test_unknown_region_rule_is_refused():
    from h2g.core.errors import ConfigError

    with pytest.raises(ConfigError, match="coarse_regions"):
        RaznTrainer(_marker_policy(), _uniform_net(S, "c"), _uniform_net(S, "f"), coarse_regions="some")


def _half_toy_batch(rng, b=8):
    """Half the regions are 'fine' ones: their x0 is blank (the coarse net guesses) and
    their x1 shows the labels; the other half the reverse.  The policy sees x0 only."""
    inputs, y = _toy_batch(rng, b)
    fine = np.arange(b) < b // 2
    inputs["x0"][fine] = 1.0 / 3
    inputs["x1"][~fine] = 1.0 / 3
    return inputs, y, fine


@pytest.mark.slow
def test_policy_learns_which_regions_zooming_helps():
    """Per region, not on average: p > 0.5 exactly on the regions whose zoom shows the labels."""
    keras.utils.set_random_seed(0)
    policy = build_policy(S, width=0.125)
    trainer = RaznTrainer(policy, _onehot_net(S, 2.0, "coarse"), _onehot_net(S, 2.0, "fine"), alpha=0.8,
                          lr=0.01, seed=0)
    rng = np.random.default_rng(0)
    for step in range(60):
        inputs, y, _ = _half_toy_batch(rng)
        trainer.step(inputs["x0"], inputs["x1"], y, step)
    test, _, fine = _half_toy_batch(np.random.default_rng(99), 32)
    p = policy(test["x0"], training=False).numpy()[:, 0]
    assert (p[fine] > 0.5).all() and (p[~fine] < 0.5).all()


class _ModeNet(keras.layers.Layer):
    """softmax(2 * input) at inference, uniform in training: a network whose training pass
    and inference disagree (as batch normalisation's batch and moving statistics can)."""

    def call(self, x, training=None):
        return tf.ones_like(x) / 3.0 if training else tf.nn.softmax(2.0 * x)


def _mode_net(name):
    x = keras.Input((S, S, 3))
    return keras.Model(x, _ModeNet()(x), name=name)


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_reward_from_the_training_pass_or_from_inference(mode):
    """The coarse net is uniform in its training pass (J0 = log 3, as the fine net) and
    right at inference (J0 = -log(e^2 / (e^2 + 2))): the training pass rewards nothing,
    inference's losses punish every zoom by (J0 - log 3) / J0."""
    keras.utils.set_random_seed(0)
    trainer = RaznTrainer(build_policy(S, width=0.125), _mode_net("c"), _uniform_net(S, "f"), alpha=0.8,
                          lr=0.0, seed=3, reward_mode=mode)
    inputs, y = _toy_batch(np.random.default_rng(0), 64)
    logs = trainer.step(inputs["x0"], inputs["x1"], y, 0)
    assert logs["j0"] == pytest.approx(np.log(3.0), rel=1e-5)  # the logged J0 is the training pass's
    right = -np.log(np.exp(2) / (np.exp(2) + 2))
    expected = 0.0 if mode == "training" else logs["zoom_rate"] * (right - np.log(3.0)) / right
    assert logs["reward"] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_razn_config_refuses_unknown_rules_in_one_line():
    from h2g.systems.registry import load_config
    from h2g.core.errors import ConfigError

    c = load_config("smoke")
    for assignment in ("razn.coarse_regions=zoomed", "razn.fine_regions=unzoomed", "razn.reward_mode=eval"):
        with pytest.raises(ConfigError, match=assignment.split("=")[0]):
            c.override([assignment])
