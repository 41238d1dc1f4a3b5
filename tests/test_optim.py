"""The optimizers and learning-rate schedules of dibjax.optim against hand-written update rules."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dibjax import config_lib, optim


def optimizer_config(**fields):
    config = config_lib.get_config("cifar10", "cpu,greedy_ce")
    config.optimizer.update(fields)
    return config


def test_adam_with_l2_weight_decay_matches_the_update_rule():
    """PyTorch's Adam(weight_decay=λ): g ← g + λw, then the bias-corrected Adam step (Kingma & Ba 2015)."""
    lr, decay, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    config = optimizer_config(name="adam", weight_decay=decay)
    optimizer = optim.make_optimizer(config, lambda step: lr)
    w = jnp.asarray([1.0, -2.0, 0.5])
    state = optimizer.init(w)
    m = v = np.zeros(3)
    expected = np.asarray(w, np.float64)
    rng = np.random.default_rng(0)
    for t in range(1, 4):
        g = rng.normal(size=3)
        update, state = optimizer.update(jnp.asarray(g, jnp.float32), state, w)
        w = w + update
        g = g + decay * expected
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected = expected - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(w, expected, rtol=1e-5)


def test_multistep_schedule_of_the_predsim_recipe():
    config = config_lib.get_config("cifar10", "full,predsim")
    assert (config.optimizer.name, config.optimizer.learning_rate, config.train.num_epochs) == ("adam", 5e-4, 400)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, num_epochs=400, peak_learning_rate=5e-4)
    # The rate × 0.25 at epochs 200, 300, 350 and 375 (anokland/local-loss, --lr-decay-milestones).
    for epoch, factor in ((0, 1), (199, 1), (200, 0.25), (299, 0.25), (300, 0.25**2), (350, 0.25**3), (399, 0.25**4)):
        assert float(schedule(epoch * 10)) == pytest.approx(5e-4 * factor, rel=1e-6), epoch


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer.name 'rmsprop'; accepted: sgd, adam"):
        optim.make_optimizer(optimizer_config(name="rmsprop"), lambda step: 0.1)


def test_sgd_is_the_default():
    config = ml_collections.ConfigDict(optimizer_config().to_dict())
    del config.optimizer["name"]
    optimizer = optim.make_optimizer(config, lambda step: 0.1)
    w = jnp.asarray([1.0])
    update, _ = optimizer.update(jnp.asarray([2.0]), optimizer.init(w), w)
    # Nesterov momentum's first step: −lr · (g + λw) · (1 + μ).
    np.testing.assert_allclose(update, -0.1 * (2.0 + 5e-4) * 1.9, rtol=1e-6)
