"""The trainer of one configuration: its model, training state and compiled steps, one pair per phase.

The batch is split over a 1-D mesh of every device of every process, axis ``"data"``, and the
:class:`~dibjax.schedulers.TrainState` is replicated, so the same code runs on one CPU, a TPU pod slice or
several GPU hosts. Each process passes only its own rows of a batch (:meth:`Trainer.shard`); the compiled steps
pin the shardings of what they take and give.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dibjax import config_lib, data, distributed, models, objectives, optim, schedulers, streams
from dibjax.schedulers import TrainState

# Folded into a step's augmentation key to give the key of its dropout between stages.
_DROPOUT_STREAM = 1


@dataclasses.dataclass
class Trainer:
    """Compiled train and eval steps, one per phase of the scheduler, for one model and configuration.

    Attributes:
        config: the run's configuration.
        info: the data set's facts (classes, normalisation, whether flips keep labels).
        steps_per_epoch: training steps in an epoch.
        net: the model as pure functions (:class:`~dibjax.schedulers.FunctionalModel`).
        phases: the scheduler's phases, in order.
        lr_schedules: one learning-rate schedule per parameter group, over the group's steps.
        train_steps: one jitted step per phase, ``(state, totals, batch) -> (state, totals, unit_grad_norm)``:
            ``totals`` sums the batch metrics of :func:`dibjax.schedulers.train_step` over an epoch on the devices
            (start from :meth:`zero_totals`); state and totals are donated.
        eval_steps: one jitted step per phase, ``(state, batch) -> sums`` of losses, right answers and count.
    """

    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    steps_per_epoch: int

    def __post_init__(self):
        config = self.config
        rngs = nnx.Rngs(streams.init_key(config.seed))
        model = models.build_model(config_lib.model_fields(config), self.info.num_classes, rngs)
        self.net = schedulers.FunctionalModel(model)
        num_stages = self.net.num_stages
        self.objective = objectives.from_config(config.objective, config.train.label_smoothing)
        format_epochs = config.train.get("format_epochs", 0)
        self.phases = schedulers.make_phases(
            config.scheduler, num_stages, config_lib.stage_epochs(config, num_stages), format_epochs
        )
        layer_groups = schedulers.num_groups(config.scheduler, num_stages)
        peaks = optim.peak_learning_rates(config, layer_groups)
        # Group g's schedule runs over the epochs of the phase that trains it.
        if config.scheduler == "sequential":
            group_epochs = [phase.num_epochs for phase in self.phases[:layer_groups]]
        else:
            group_epochs = [self.phases[0].num_epochs] * layer_groups
        if format_epochs:
            # The format phase's group (every head) has a schedule of its own, at the run's peak rate.
            peaks, group_epochs = (*peaks, config.optimizer.learning_rate), [*group_epochs, format_epochs]
        self.lr_schedules = [
            optim.learning_rate_schedule(config, self.steps_per_epoch, epochs, peak)
            for epochs, peak in zip(group_epochs, peaks, strict=True)
        ]
        self.optimizers = [optim.make_optimizer(config, s) for s in self.lr_schedules]
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self._metric_shapes: dict[int, dict] = {}
        replicated, batch = self.replicated, self.batch_sharding
        self.train_steps = [
            jax.jit(
                functools.partial(self._train_step, phase),
                in_shardings=(replicated, replicated, batch),
                out_shardings=replicated,
                donate_argnums=(0, 1),
            )
            for phase in self.phases
        ]
        self.eval_steps = [
            jax.jit(
                functools.partial(self._eval_step, schedulers.evaluated_heads(phase, num_stages)),
                in_shardings=(replicated, batch),
                out_shardings=replicated,
            )
            for phase in self.phases
        ]

    @property
    def num_stages(self) -> int:
        return self.net.num_stages

    def _initial_state(self) -> TrainState:
        params = self.net.initial_params
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=self.net.initial_batch_stats,
            opt_states=schedulers.init_optimizer_states(
                self.config.scheduler, self.optimizers, params, stages_trained=self.objective.trains_stage
            ),
            augment_key=jax.random.key_data(streams.augment_key(self.config.seed)),
            nonfinite_step=-jnp.ones((), jnp.int32),
        )

    def create_state(self) -> TrainState:
        """A fresh initial state, replicated over the mesh.

        Always a copy: the first training step donates (deletes) its input, which must never be the model's own
        initial arrays, whatever the device count.
        """
        return jax.device_put(self._initial_state(), self.replicated, may_alias=False)

    def abstract_state(self) -> TrainState:
        """The state's structure, shapes, dtypes and shardings, for restoring a checkpoint."""
        shapes = jax.eval_shape(self._initial_state)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), shapes)

    def _step_metrics(self, phase: schedulers.Phase, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.augment_key), state.step)
        augmented = data.augment(batch["image"], key, crop_padding=self.config.data.crop_padding, flip=self.info.flip)
        return schedulers.train_step(
            self.net,
            self.objective,
            self.optimizers,
            phase,
            state,
            data.normalize(augmented, self.info),
            batch["label"],
            # Unused by most objectives, and then removed by XLA.
            pixels=augmented.astype(jnp.float32) / 255.0,
            dropout_rate=self.config.train.get("stage_dropout", 0.0),
            # Its own stream: the augmentation draws from `key` itself, as it did before dropout existed.
            dropout_key=jax.random.fold_in(key, _DROPOUT_STREAM),
        )

    def _train_step(
        self, phase: schedulers.Phase, state: TrainState, totals: dict, batch: dict
    ) -> tuple[TrainState, dict, jax.Array]:
        state, metrics = self._step_metrics(phase, state, batch)
        unit_grad_norm = metrics.pop("unit_grad_norm")
        return state, jax.tree.map(jnp.add, totals, metrics), unit_grad_norm

    def zero_totals(self, phase_index: int, state: TrainState, batch: dict) -> dict:
        """Zero sums of the metrics of a training step of the phase (shapes from one abstract evaluation per phase)."""
        if phase_index not in self._metric_shapes:
            step = functools.partial(self._step_metrics, self.phases[phase_index])
            _, metrics = jax.eval_shape(step, state, batch)
            del metrics["unit_grad_norm"]
            self._metric_shapes[phase_index] = metrics
        return jax.tree.map(
            lambda m: jnp.zeros(m.shape, m.dtype, device=self.replicated), self._metric_shapes[phase_index]
        )

    def _eval_step(self, heads: tuple[int, ...], state: TrainState, batch: dict) -> dict:
        logits = schedulers.eval_logits(self.net, state, data.normalize(batch["image"], self.info), heads)
        mask = batch["mask"]
        out = {"count": jnp.sum(mask)}
        for k, head_logits in logits.items():
            losses = objectives.cross_entropy(head_logits, batch["label"])
            out[f"loss_sum/{k}"] = jnp.sum(jnp.where(mask, losses, 0))
            out[f"correct/{k}"] = jnp.sum((jnp.argmax(head_logits, -1) == batch["label"]) & mask)
        return out

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch of ``batch_size`` this process provides (all of them with one process)."""
        return distributed.local_rows(self.batch_sharding, batch_size)

    def shard(self, local_batch: dict, batch_size: int) -> dict:
        """This process's rows of a global batch of ``batch_size`` (:meth:`local_rows`) as global arrays."""
        return {
            name: jax.make_array_from_process_local_data(self.batch_sharding, rows, (batch_size, *rows.shape[1:]))
            for name, rows in local_batch.items()
        }

    def evaluate(self, phase_index: int, state: TrainState, dataset: data.ArrayDataset, batch_size: int) -> dict:
        """Loss and accuracy of the heads the phase reports on, ``{head: {"loss": .., "accuracy": ..}}``.

        ``batch_size`` must split evenly over the devices (:func:`eval_batch_size` rounds a configured size up).
        """
        totals = None
        for batch in data.eval_batches(dataset, batch_size, rows=self.local_rows(batch_size)):
            metrics = self.eval_steps[phase_index](state, self.shard(batch, batch_size))
            # A handful of evaluation batches per epoch: eager sums cost nothing measurable here.
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        totals = jax.device_get(totals)
        heads = schedulers.evaluated_heads(self.phases[phase_index], self.num_stages)
        return {
            k: {
                "loss": float(totals[f"loss_sum/{k}"] / totals["count"]),
                "accuracy": float(totals[f"correct/{k}"] / totals["count"]),
            }
            for k in heads
        }

    @staticmethod
    def peak_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
        """XLA's estimate of a compiled step's memory: arguments + outputs + temporaries − donated (aliased) buffers.

        ``peak_memory_in_bytes`` is not used: XLA:CPU leaves it at about the size of the arguments, without the
        temporaries that hold the activations.
        """
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        return int(
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )
