"""The optimizer and its learning-rate schedules, one per parameter group (:func:`dibjax.schedulers.num_groups`).

``config.optimizer``:

* ``learning_rate``: the peak rate; ``stage_learning_rates``: one peak rate per parameter group instead
  (layer-wise schedulers: one per stage).
* ``lr_schedule``: ``"cosine"`` (cosine decay from the peak to 0 over the group's steps) or ``"multistep"`` (the
  peak multiplied by ``decay_factor`` at each of ``milestones``, fractions of the group's steps).
* ``warmup_epochs``: a linear ramp from 0 to the peak over these epochs, before the schedule.
* ``name``: ``"sgd"`` (the default) or ``"adam"`` (Kingma & Ba 2015, optax's defaults β1 = 0.9, β2 = 0.999,
  ε = 1e-8, as PyTorch's); ``weight_decay`` is L2 weight decay added to the gradient (``optax.add_decayed_weights``)
  for both, as in the CIFAR literature and PyTorch's ``Adam(weight_decay=...)``.
* ``momentum``, ``nesterov``: SGD with (Nesterov) momentum.

A sequential run gives every stage's group the epochs of its own phase, so each stage has a complete schedule.
"""

from __future__ import annotations

import ml_collections
import optax

from dibjax.errors import ConfigError

LR_SCHEDULES = ("cosine", "multistep")
OPTIMIZERS = ("sgd", "adam")


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, peak_learning_rate: float
) -> optax.Schedule:
    """The learning rate over ``num_epochs`` epochs of ``steps_per_epoch`` steps, peaking at ``peak_learning_rate``."""
    opt = config.optimizer
    total = num_epochs * steps_per_epoch
    warmup = int(opt.warmup_epochs * steps_per_epoch)
    if opt.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(peak_learning_rate, max(total - warmup, 1))
    elif opt.lr_schedule == "multistep":
        boundaries = {int(f * total) - warmup: opt.decay_factor for f in opt.milestones}
        main = optax.piecewise_constant_schedule(peak_learning_rate, boundaries)
    else:
        raise ConfigError(f"unknown optimizer.lr_schedule {opt.lr_schedule!r}; accepted: {', '.join(LR_SCHEDULES)}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak_learning_rate, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, or Adam, with weight decay added to the gradient, at ``learning_rate(step)``."""
    opt = config.optimizer
    name = opt.get("name", "sgd")
    if name == "adam":
        step = optax.adam(learning_rate)
    elif name == "sgd":
        step = optax.sgd(learning_rate, momentum=opt.momentum or None, nesterov=bool(opt.nesterov and opt.momentum))
    else:
        raise ConfigError(f"unknown optimizer.name {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    return optax.chain(optax.add_decayed_weights(opt.weight_decay), step)


def peak_learning_rates(config: ml_collections.ConfigDict, num_groups: int) -> tuple[float, ...]:
    """The peak learning rate of each parameter group: ``optimizer.stage_learning_rates`` if given, else the one."""
    given = tuple(config.optimizer.get("stage_learning_rates", ()) or ())
    if not given:
        return (config.optimizer.learning_rate,) * num_groups
    if len(given) != num_groups:
        raise ConfigError(
            f"optimizer.stage_learning_rates={given} has {len(given)} entries; this run has {num_groups} "
            "parameter groups (one per stage, or one for end_to_end)"
        )
    return given
