"""How the stages of a :class:`~dibjax.models.StagedModel` are trained: the schedulers.

A run is a list of :class:`Phase` s. Each has one jitted training step, a pure function of the
:class:`TrainState` (:func:`train_step`), built from the network's stages, a per-stage objective
(:mod:`dibjax.objectives`; this module only knows that it maps a stage's output, its head's logits and the labels
to a loss) and one optax optimizer per parameter group.

* ``sequential`` (greedy layer-wise training): phase ``k`` trains stage ``k`` with its head ``k`` for its epochs;
  stages ``0 .. k-1`` are frozen, applied with their BatchNorm in inference mode (running statistics, never
  updated) under ``stop_gradient``, so only stage ``k``'s activations are kept for the backward pass. Group ``k``
  (stage ``k`` and head ``k``) has its own optimizer state and learning-rate schedule.
* ``simultaneous`` (decoupled greedy learning, Belilovsky, Eickenberg & Oyallon, "Decoupled Greedy Learning of
  CNNs", ICML 2020): one phase; every batch updates every stage and head, each from its own objective, with
  ``stop_gradient`` between stages and one optimizer state per group ``k``.
* ``end_to_end``: one phase, ordinary backpropagation of the objective on the last stage's head through the whole
  network (the SGD baseline); one group: every stage and the last head.

Stages, heads, phases and parameter groups are indexed from 0 in this Python API (files and the console count
them from 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dibjax import models, objectives
from dibjax.errors import ConfigError

SCHEDULERS = ("sequential", "simultaneous", "end_to_end")


@struct.dataclass
class TrainState:
    """Everything a run carries from one training step to the next; a pytree that orbax checkpoints.

    ``params`` and ``batch_stats`` are ``{"stages": [...], "heads": [...]}``, one ``nnx.State`` per stage and per
    head: the trainable parameters (``nnx.Param``) and the rest (BatchNorm running statistics).

    Attributes:
        batch_stats: per-stage and per-head BatchNorm running statistics.
        augment_key: raw key data (``jax.random.key_data``) of the augmentation stream, folded with ``step``.
        nonfinite_step: the first step whose loss was NaN or Inf, or -1.
        opt_states: one optax state per parameter group (:func:`num_groups`).
        params: per-stage and per-head parameters.
        step: global step, counted over every phase (int32 scalar).
    """

    # XLA assigns buffers in the order of the step's arguments, so this order changes the compiled memory of a
    # step by a few percent; this one keeps the smaller figure measured by benchmarks.memory.
    batch_stats: dict
    augment_key: jax.Array
    nonfinite_step: jax.Array
    opt_states: list
    params: dict
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class Phase:
    """A part of a run with one training step: ``stage`` is the stage trained (``None``: every stage).

    ``format``: the format phase, in which every head learns its cross-entropy on the frozen stages (the HSIC
    bottleneck's last phase, Ma, Lewis & Kleijn 2020); its parameter group is the last one and holds every head.
    """

    scheduler: str
    stage: int | None
    num_epochs: int
    format: bool = False


def make_phases(scheduler: str, num_stages: int, epochs: int | Sequence[int], format_epochs: int = 0) -> list[Phase]:
    """The phases of a run. ``epochs`` is the epochs of every phase, or for ``sequential`` one count per stage;
    ``format_epochs > 0`` adds the format phase at the end."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; accepted: {', '.join(SCHEDULERS)}")
    if isinstance(format_epochs, bool) or not isinstance(format_epochs, int) or format_epochs < 0:
        raise ConfigError(f"train.format_epochs must be an int >= 0, got {format_epochs!r}")
    if format_epochs and scheduler == "end_to_end":
        raise ConfigError("train.format_epochs retrains the layer-wise heads; the end_to_end scheduler has none")
    per_stage = [int(epochs)] * num_stages if isinstance(epochs, int) else [int(e) for e in epochs]
    if scheduler != "sequential" and not isinstance(epochs, int):
        raise ConfigError(f"scheduler {scheduler!r} takes one epoch count, got {epochs!r}")
    if len(per_stage) != num_stages:
        raise ConfigError(f"got {len(per_stage)} per-stage epoch counts {tuple(per_stage)} for {num_stages} stages")
    if any(e < 1 for e in per_stage):
        raise ConfigError(f"epoch counts must be >= 1, got {tuple(per_stage)}")
    if scheduler == "sequential":
        phases = [Phase(scheduler, k, e) for k, e in enumerate(per_stage)]
    else:
        phases = [Phase(scheduler, None, per_stage[0])]
    if format_epochs:
        phases.append(Phase(scheduler, None, format_epochs, format=True))
    return phases


def num_groups(scheduler: str, num_stages: int, format_epochs: int = 0) -> int:
    """Parameter groups with an optimizer of their own: one per stage and head, or one for end-to-end; and with a
    format phase, one more, the last, for every head."""
    return (1 if scheduler == "end_to_end" else num_stages) + (1 if format_epochs else 0)


def group_members(
    scheduler: str, num_stages: int, group: int, *, stages_trained: bool = True
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stage indices, head indices) of a parameter group; no stages when ``stages_trained`` is False.

    Group ``num_stages`` of a layer-wise scheduler is the format phase's: every head, no stage.
    """
    if scheduler != "end_to_end" and group == num_stages:
        return (), tuple(range(num_stages))
    if scheduler == "end_to_end":
        stages, heads = tuple(range(num_stages)), (num_stages - 1,)
    else:
        stages, heads = (group,), (group,)
    return (stages if stages_trained else ()), heads


def init_optimizer_states(
    scheduler: str, optimizers: Sequence[optax.GradientTransformation], params: dict, *, stages_trained: bool = True
) -> list[optax.OptState]:
    """One optimizer state per parameter group, each over the group's trained parameters only."""
    num_stages = len(params["stages"])
    return [
        optimizer.init(select(params, *group_members(scheduler, num_stages, g, stages_trained=stages_trained)))
        for g, optimizer in enumerate(optimizers)
    ]


def trained_groups(phase: Phase, num_stages: int) -> tuple[int, ...]:
    if phase.format:
        return (num_stages,)
    if phase.scheduler == "sequential":
        return (phase.stage,)
    return tuple(range(num_groups(phase.scheduler, num_stages)))


def trained_stages(phase: Phase, num_stages: int) -> tuple[int, ...]:
    """Stages whose parameters the phase updates."""
    if phase.format:
        return ()
    return (phase.stage,) if phase.stage is not None else tuple(range(num_stages))


def evaluated_heads(phase: Phase, num_stages: int) -> tuple[int, ...]:
    """Heads whose accuracy the phase reports: the trained stage's, every head, or the classifier."""
    if phase.format:
        return tuple(range(num_stages))
    if phase.scheduler == "sequential":
        return (phase.stage,)
    if phase.scheduler == "simultaneous":
        return tuple(range(num_stages))
    return (num_stages - 1,)


class FunctionalModel:
    """A :class:`~dibjax.models.StagedModel` as pure functions of per-stage parameters and statistics."""

    def __init__(self, model: models.StagedModel):
        self.num_stages = model.num_stages
        # The units (layers, for the analysis) of every stage: names, and how many of the stage's layers each spans.
        self.unit_layers = model.unit_layers
        self.unit_names = tuple(name for names in model.stage_units for name in names)
        self.unit_offsets = tuple(sum(len(c) for c in model.unit_layers[:k]) for k in range(model.num_stages))
        model.train()
        stage_split = [nnx.split(stage, nnx.Param, ...) for stage in model.stages]
        head_split = [nnx.split(head, nnx.Param, ...) for head in model.heads]
        self.train_defs = {"stages": [s[0] for s in stage_split], "heads": [h[0] for h in head_split]}
        self.initial_params = {"stages": [s[1] for s in stage_split], "heads": [h[1] for h in head_split]}
        self.initial_batch_stats = {"stages": [s[2] for s in stage_split], "heads": [h[2] for h in head_split]}
        model.eval()
        self.eval_defs = {
            "stages": [nnx.graphdef(stage) for stage in model.stages],
            "heads": [nnx.graphdef(head) for head in model.heads],
        }
        model.train()

    def apply(self, kind: str, k: int, params: dict, batch_stats: dict, x: jax.Array, *, train: bool):
        """Applies stage or head ``k`` (``kind`` is ``"stages"`` or ``"heads"``); returns (output, new statistics)."""
        graphdef = (self.train_defs if train else self.eval_defs)[kind][k]
        module = nnx.merge(graphdef, params[kind][k], batch_stats[kind][k], copy=True)
        y = module(x)
        return y, nnx.state(module, nnx.Not(nnx.Param)) if train else batch_stats[kind][k]

    def _stage_unit_outputs(self, k: int, params: dict, batch_stats: dict, x: jax.Array, *, materialized: bool):
        """The output of each unit of stage ``k`` in inference mode, in order; each unit reads the previous output,
        written to its own buffer first when ``materialized`` (:func:`dibjax.models.materialize`).

        A stage that is not a :class:`~dibjax.models.layers.Chain` counts as one unit.
        """
        stage = nnx.merge(self.eval_defs["stages"][k], params["stages"][k], batch_stats["stages"][k], copy=True)
        layers = getattr(stage, "layers", None)
        units = [[stage]] if layers is None else []
        start = 0
        for count in self.unit_layers[k] if layers is not None else ():
            units.append(layers[start : start + count])
            start += count
        # A frozen parameter guards the materialization: replicated, it is read without a collective.
        guard = jax.tree.leaves(params["stages"][k])[0] if materialized else None
        outputs, h = [], x
        for unit in units:
            for layer in unit:
                h = layer(h)
            if materialized:
                h = models.materialize(h, guard)
            outputs.append(h)
        return outputs

    def frozen_forward(self, k: int, params: dict, batch_stats: dict, x: jax.Array) -> jax.Array:
        """Stage ``k`` run forward in inference mode as a frozen stage: each unit's output is materialized, so that
        the memory of a frozen prefix does not grow with its depth (:func:`dibjax.models.materialize`)."""
        return self._stage_unit_outputs(k, params, batch_stats, x, materialized=True)[-1]

    def unit_outputs(self, params: dict, batch_stats: dict, x: jax.Array) -> list[jax.Array]:
        """The output of every unit of every stage on ``x``, in order, all modules in inference mode.

        A stage that is not a :class:`~dibjax.models.layers.Chain` counts as one unit.
        """
        outputs, h = [], x
        with models.native_convolutions():
            for k in range(self.num_stages):
                outputs += self._stage_unit_outputs(k, params, batch_stats, h, materialized=False)
                h = outputs[-1]
        return outputs

    def apply_head(self, k: int, params: dict, batch_stats: dict, head_input: jax.Array, t: jax.Array):
        """Head ``k`` in training mode: its logits on ``head_input``, the outputs of its extra modules on the stage
        output ``t`` (:class:`~dibjax.models.layers.HeadWithExtras`; none for a plain head) and its new statistics."""
        module = nnx.merge(self.train_defs["heads"][k], params["heads"][k], batch_stats["heads"][k], copy=True)
        if isinstance(module, models.HeadWithExtras):
            logits, extras = module.outputs(head_input, t)
        else:
            logits, extras = module(head_input), {}
        return logits, extras, nnx.state(module, nnx.Not(nnx.Param))

    def unit_norms(self, k: int, stage_tree) -> list[jax.Array]:
        """Global norms of the parts of stage ``k``'s parameter tree (e.g. its gradient) that belong to each unit."""
        counts = self.unit_layers[k]
        if len(counts) == 1:
            return [_global_norm(stage_tree)]
        layers = stage_tree["layers"]
        norms, start = [], 0
        for count in counts:
            norms.append(_global_norm([layers[i] for i in range(start, start + count) if i in layers]))
            start += count
        return norms


def select(tree: dict, stages: Sequence[int], heads: Sequence[int]) -> dict:
    """The entries of ``tree`` (``{"stages": [...], "heads": [...]}``) for the given stage and head indices."""
    return {"stages": {k: tree["stages"][k] for k in stages}, "heads": {k: tree["heads"][k] for k in heads}}


def _replace(tree: dict, part: dict) -> dict:
    out = {"stages": list(tree["stages"]), "heads": list(tree["heads"])}
    for kind in ("stages", "heads"):
        for k, value in part[kind].items():
            out[kind][k] = value
    return out


def _view(params: dict, trainable: dict) -> dict:
    """``params`` with the trainable groups' entries taken from ``trainable`` (so gradients reach them)."""
    for part in trainable.values():
        params = _replace(params, part)
    return params


def scale_gradient(x: jax.Array, factor: float) -> jax.Array:
    """``x`` in the forward pass; in the backward pass the gradient that reaches ``x`` is multiplied by ``factor``."""
    if factor == 1:
        return x
    if factor == 0:
        return jax.lax.stop_gradient(x)
    # x − x is exactly 0, so the value is x to the last bit.
    return jax.lax.stop_gradient(x) + factor * (x - jax.lax.stop_gradient(x))


def channel_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zeroes each channel of each sample with probability ``rate`` and scales the rest by ``1 / (1 − rate)``
    (PyTorch's ``Dropout2d`` for feature maps, plain dropout for ``(n, d)`` arrays)."""
    if rate == 0:
        return x
    shape = (x.shape[0], 1, 1, x.shape[-1]) if x.ndim == 4 else x.shape
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def phase_loss(
    net: FunctionalModel,
    objective: Callable,
    phase: Phase,
    trainable: dict,
    params: dict,
    batch_stats: dict,
    x,
    labels,
    *,
    pixels: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
):
    """The phase's loss and, per stage, its loss terms, logits and updated statistics.

    ``x`` is the normalised image batch; ``pixels``, the same images in ``[0, 1]``, is passed on to the objective.

    With ``dropout_rate > 0`` every stage's output is passed on to the next stage through :func:`channel_dropout`
    (a key per stage, folded from ``dropout_key``); the objectives see the outputs before dropout, as in
    Nøkland & Eidnes (2019).
    """
    num_stages = net.num_stages

    def dropped(h: jax.Array, k: int) -> jax.Array:
        # h is the output of stage k - 1, about to enter stage k.
        if dropout_rate == 0 or k == 0:
            return h
        return channel_dropout(h, dropout_rate, jax.random.fold_in(dropout_key, k))

    params = _view(params, trainable)
    new_batch_stats = {"stages": list(batch_stats["stages"]), "heads": list(batch_stats["heads"])}
    outputs: dict[int, dict[str, Any]] = {}

    def stage_objective(k: int, t: jax.Array, stage_input: jax.Array) -> jax.Array:
        loss_of_stage = objective.for_stage(k, num_stages) if hasattr(objective, "for_stage") else objective
        head_input = scale_gradient(t, loss_of_stage.head_gradient)
        logits, extras, new_batch_stats["heads"][k] = net.apply_head(k, params, batch_stats, head_input, t)
        loss, terms = loss_of_stage(
            t, logits, labels, stage_input=stage_input, network_input=x, extras=extras, pixels=pixels
        )
        outputs[k] = {"loss": loss, "terms": terms, "logits": logits}
        return loss

    if phase.format:
        # Every head on the frozen stages, in inference mode, each learning its cross-entropy.
        format_loss = objectives.CrossEntropy(getattr(objective, "label_smoothing", 0.0))
        h, total = x, 0.0
        with models.native_convolutions():
            for k in range(num_stages):
                h = net.frozen_forward(k, params, batch_stats, h)
                t = jax.lax.stop_gradient(h)
                logits, _, new_batch_stats["heads"][k] = net.apply_head(k, params, batch_stats, t, t)
                loss, terms = format_loss(t, logits, labels)
                outputs[k] = {"loss": loss, "terms": terms, "logits": logits}
                total = total + loss
    elif phase.scheduler == "sequential":
        k = phase.stage
        h = x
        # The frozen stages only run forward: the native convolution is the faster one there.
        with models.native_convolutions():
            for j in range(k):
                h = net.frozen_forward(j, params, batch_stats, h)
        h = jax.lax.stop_gradient(dropped(h, k))
        t, new_batch_stats["stages"][k] = net.apply("stages", k, params, batch_stats, h, train=True)
        total = stage_objective(k, t, h)
    elif phase.scheduler == "simultaneous":
        h, total = x, 0.0
        for k in range(num_stages):
            stage_input = jax.lax.stop_gradient(dropped(h, k))
            h, new_batch_stats["stages"][k] = net.apply("stages", k, params, batch_stats, stage_input, train=True)
            total = total + stage_objective(k, h, stage_input)
    else:
        h, stage_input = x, x
        for k in range(num_stages):
            stage_input = dropped(h, k)
            h, new_batch_stats["stages"][k] = net.apply("stages", k, params, batch_stats, stage_input, train=True)
        total = stage_objective(num_stages - 1, h, stage_input)
    return total, (outputs, new_batch_stats)


def _global_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def train_step(
    net: FunctionalModel,
    objective: Callable,
    optimizers: Sequence[optax.GradientTransformation],
    phase: Phase,
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    *,
    pixels: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> tuple[TrainState, dict]:
    """One optimisation step of ``phase`` on a batch of normalised, augmented ``images``.

    Returns the new state and the batch's metrics, each an array over the stages: ``loss``, ``correct`` (right
    predictions of the stage's head), ``grad_norm`` (global norm of the gradient of the stage's parameters,
    head excluded) and one entry per objective term, all zero for stages the phase does not train; plus ``count``
    and ``unit_grad_norm``, the gradient norm of every unit of the network (zero where not trained).
    A step whose loss is not finite leaves the state as it was and records its index in ``nonfinite_step``.
    ``pixels``, ``dropout_rate`` and ``dropout_key``: as for :func:`phase_loss`.
    """
    num_stages = net.num_stages
    groups = trained_groups(phase, num_stages)
    stages_trained = objective.trains_stage
    members = {g: group_members(phase.scheduler, num_stages, g, stages_trained=stages_trained) for g in groups}
    trainable = {g: select(state.params, *members[g]) for g in groups}

    def loss_fn(trainable):
        return phase_loss(
            net,
            objective,
            phase,
            trainable,
            state.params,
            state.batch_stats,
            images,
            labels,
            pixels=pixels,
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
        )

    (loss, (outputs, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)

    params, opt_states = state.params, list(state.opt_states)
    for g in groups:
        updates, opt_states[g] = optimizers[g].update(grads[g], state.opt_states[g], trainable[g])
        params = _replace(params, optax.apply_updates(trainable[g], updates))

    finite = jnp.isfinite(loss)
    # A non-finite step leaves the state as it was, so the run stops on the last good one.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(new_batch_stats, state.batch_stats),
        opt_states=keep(opt_states, list(state.opt_states)),
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step),
    )

    zeros = jnp.zeros((num_stages,), jnp.float32)
    metrics = {"loss": zeros, "correct": zeros, "grad_norm": zeros}
    for k, out in outputs.items():
        metrics["loss"] = metrics["loss"].at[k].set(out["loss"].astype(jnp.float32))
        correct = jnp.sum(jnp.argmax(out["logits"], -1) == labels).astype(jnp.float32)
        metrics["correct"] = metrics["correct"].at[k].set(correct)
        for name, value in out["terms"].items():
            metrics.setdefault(name, zeros)
            metrics[name] = metrics[name].at[k].set(value.astype(jnp.float32))
    unit_norms = [jnp.zeros((), jnp.float32)] * len(net.unit_names)
    for g in groups:
        for k in members[g][0]:
            norms = net.unit_norms(k, grads[g]["stages"][k])
            unit_norms[net.unit_offsets[k] : net.unit_offsets[k] + len(norms)] = norms
            # The stage's norm from its units' norms: one pass over the gradient.
            stage_norm = jnp.sqrt(sum(jnp.square(norm) for norm in norms))
            metrics["grad_norm"] = metrics["grad_norm"].at[k].set(stage_norm)
    metrics["unit_grad_norm"] = jnp.stack(unit_norms)
    metrics["count"] = jnp.asarray(labels.shape[0], jnp.float32)
    return new_state, metrics


def eval_logits(net: FunctionalModel, state: TrainState, x: jax.Array, heads: Sequence[int]) -> dict[int, jax.Array]:
    """Logits of the given heads on ``x``, every module in inference mode, stages run only as far as needed."""
    outputs, h = {}, x
    with models.native_convolutions():
        for k in range(max(heads) + 1):
            h, _ = net.apply("stages", k, state.params, state.batch_stats, h, train=False)
            if k in heads:
                outputs[k], _ = net.apply("heads", k, state.params, state.batch_stats, h, train=False)
    return outputs
