"""The training loop: ``train_and_evaluate(config, workdir)``.

``config.schedule`` says how the stages are trained (:mod:`dibjax.schedule`: ``sequential`` greedy layer-wise,
``simultaneous`` decoupled, or ``end_to_end`` backpropagation) and ``config.objective`` with what per-stage loss
(:mod:`dibjax.objectives`). The loop is written on a functional training state (per-stage parameters, BatchNorm
statistics, one optimizer state per parameter group, step) so that it can be checkpointed with orbax and sharded:
the batch is split over a 1-D device mesh with axis ``"data"`` and the state is replicated, so the same code runs
on one CPU, a TPU slice or several GPUs.

Files written in ``workdir``:

* ``config.json``: the run's configuration; a later run in the same folder must match it
  (``config.train.overwrite=True`` starts over instead).
* ``metrics.jsonl``: one JSON record per epoch and trained stage: ``stage`` (``null`` end to end), ``epoch``
  (counted over the whole run), ``phase_epoch`` (within the stage's phase), ``train_loss``, ``train_accuracy`` (of
  the stage's head on the training batches), ``test_loss``, ``test_accuracy`` (of the network up to that stage with
  its head), ``images_per_second``, ``seconds``, ``learning_rate``, ``grad_norm`` (mean over the epoch's steps of the
  norm of the gradient of the stage's parameters; end to end, ``grad_norms`` lists every stage's) and every term of
  the objective averaged over the epoch (``ce``, ``H_T``, ``I_XT``, ``I_TY``, ...), and ``elapsed_seconds`` (wall
  time of the run so far, over every invocation that contributed a kept epoch).
* ``checkpoints/``: orbax checkpoints after every epoch (the last two kept; with ``config.analysis.enabled`` also
  those of the analysed epochs, 0 being the initial state); rerunning the same command resumes
  from the latest and continues exactly as an uninterrupted run would, inside any stage.
* with ``config.analysis.enabled``: ``gradient_norms.jsonl`` (per epoch, every step's gradient norm of every unit
  of the network), then at the end ``analysis.json`` and ``figures/`` (:mod:`dibjax.analysis`).
* ``summary.json``: ``test_accuracy`` (the classifier: the last stage with its head), ``stage_accuracies`` (every
  head's final test accuracy, for layer-wise schedules), ``wall_seconds``, ``train_step_peak_bytes`` (XLA's memory
  analysis of the compiled training step; the largest over the phases, each listed in ``phase_peak_bytes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import threadpoolctl
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dibjax import analysis, data, models, objectives, schedule

# Fields that do not change what a run computes, so resuming may differ in them.
_RESUMABLE_FIELDS = {("train", "overwrite"), ("train", "progress"), ("train", "log_every_steps")}


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or Inf; the last good checkpoint is kept."""


def learning_rate_schedule(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    num_epochs: int | None = None,
    learning_rate: float | None = None,
) -> optax.Schedule:
    """The learning rate over ``num_epochs`` (default ``config.train.num_epochs``) of ``steps_per_epoch`` steps."""
    opt = config.optimizer
    num_epochs = config.train.num_epochs if num_epochs is None else num_epochs
    peak = opt.learning_rate if learning_rate is None else learning_rate
    total = num_epochs * steps_per_epoch
    warmup = int(opt.warmup_epochs * steps_per_epoch)
    if opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
    elif opt.schedule == "multistep":
        boundaries = {int(f * total) - warmup: opt.decay_factor for f in opt.milestones}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    else:
        raise ValueError(f"unknown optimizer.schedule {opt.schedule!r}; accepted: 'cosine', 'multistep'")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and decoupled-from-the-loss L2 weight decay, as in the CIFAR literature."""
    opt = config.optimizer
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(schedule, momentum=opt.momentum or None, nesterov=bool(opt.nesterov and opt.momentum)),
    )


def stage_epochs(config: ml_collections.ConfigDict, num_stages: int) -> int | tuple[int, ...]:
    """Epochs per phase: ``train.stage_epochs`` for a sequential run when given, else ``train.num_epochs``."""
    given = tuple(config.train.get("stage_epochs", ()) or ())
    if not given:
        return config.train.num_epochs
    if config.schedule != "sequential":
        raise ValueError(f"train.stage_epochs={given} is only read by the sequential schedule, not {config.schedule!r}")
    if len(given) != num_stages:
        raise ValueError(f"train.stage_epochs={given} has {len(given)} entries; the model has {num_stages} stages")
    return given


def _stage_learning_rates(config: ml_collections.ConfigDict, num_groups: int) -> tuple[float, ...]:
    given = tuple(config.optimizer.get("stage_learning_rates", ()) or ())
    if not given:
        return (config.optimizer.learning_rate,) * num_groups
    if len(given) != num_groups:
        raise ValueError(
            f"optimizer.stage_learning_rates={given} has {len(given)} entries; this run has {num_groups} "
            "parameter groups (one per stage, or one for end_to_end)"
        )
    return given


@dataclasses.dataclass
class Trainer:
    """Compiled train and eval steps, one per phase of the schedule, for one model and configuration."""

    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    steps_per_epoch: int

    def __post_init__(self):
        config = self.config
        model = models.build_model(_model_config(config.model), self.info.num_classes, nnx.Rngs(config.seed))
        self.net = schedule.StagedNetwork(model)
        num_stages = self.net.num_stages
        self.objective = objectives.from_config(config.objective, config.train.label_smoothing)
        self.phases = schedule.make_phases(config.schedule, num_stages, stage_epochs(config, num_stages))
        groups = schedule.num_groups(config.schedule, num_stages)
        rates = _stage_learning_rates(config, groups)
        # Group g's optimizer runs over the epochs of the phase that trains it.
        if config.schedule == "sequential":
            group_epochs = [phase.num_epochs for phase in self.phases]
        else:
            group_epochs = [self.phases[0].num_epochs] * groups
        self.schedules = [
            learning_rate_schedule(config, self.steps_per_epoch, group_epochs[g], rates[g]) for g in range(groups)
        ]
        self.optimizers = [make_optimizer(config, s) for s in self.schedules]
        params, extra = self.net.initial_params, self.net.initial_extra
        opt_state = schedule.init_optimizer_states(config.schedule, self.optimizers, params)
        self.initial_state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "extra": extra,
            "opt_state": opt_state,
            "key": jax.random.key_data(jax.random.key(config.seed + 1)),
            # Index of the first step whose loss was not finite, or -1.
            "nonfinite_step": -jnp.ones((), jnp.int32),
        }
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.train_steps = [
            jax.jit(functools.partial(self._train_step, phase), donate_argnums=0) for phase in self.phases
        ]
        self.eval_steps = [
            jax.jit(functools.partial(self._eval_step, schedule.evaluated_heads(phase, num_stages)))
            for phase in self.phases
        ]

    @property
    def num_stages(self) -> int:
        return self.net.num_stages

    def _train_step(self, phase: schedule.Phase, state: dict, batch: dict) -> tuple[dict, dict]:
        config = self.config
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
        images = data.augment(batch["image"], key, crop_padding=config.data.crop_padding, flip=self.info.flip)
        images = data.normalize(images, self.info)
        return schedule.train_step(self.net, self.objective, self.optimizers, phase, state, images, batch["label"])

    def _eval_step(self, heads: tuple[int, ...], state: dict, batch: dict) -> dict:
        logits = schedule.eval_logits(self.net, state, data.normalize(batch["image"], self.info), heads)
        mask = batch["mask"]
        out = {"count": jnp.sum(mask)}
        for k, head_logits in logits.items():
            losses = objectives.cross_entropy(head_logits, batch["label"])
            out[f"loss_sum/{k}"] = jnp.sum(jnp.where(mask, losses, 0))
            out[f"correct/{k}"] = jnp.sum((jnp.argmax(head_logits, -1) == batch["label"]) & mask)
        return out

    def shard(self, batch: dict) -> dict:
        return jax.device_put(batch, self.batch_sharding)

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


def _model_config(model_config: ml_collections.ConfigDict) -> dict:
    fields = model_config.to_dict()
    fields["width"] = fields.get("width") or None
    fields["num_groups"] = fields.get("num_groups") or None
    return fields


def _flat(config_dict: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in config_dict.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _check_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses to resume a run of another configuration unless told to start over."""
    saved_path = workdir / "config.json"
    current = json.loads(config.to_json())
    if saved_path.exists():
        saved_flat, current_flat = _flat(json.loads(saved_path.read_text())), _flat(current)
        differences = {
            ".".join(k): (saved_flat.get(k), current_flat.get(k))
            for k in set(saved_flat) | set(current_flat)
            # The analysis reads the run without changing it, so its settings may change between invocations.
            if k not in _RESUMABLE_FIELDS and k[0] != "analysis" and saved_flat.get(k) != current_flat.get(k)
        }
        if differences and not config.train.overwrite:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(differences.items()))
            raise ValueError(
                f"workdir {workdir} holds a run with another configuration ({shown}); "
                "use another workdir, or pass --config.train.overwrite=True to start over"
            )
        if differences:
            run_files = ("checkpoints", "metrics.jsonl", "summary.json", analysis.GRADIENT_FILE, analysis.ANALYSIS_FILE)
            for name in run_files:
                path = workdir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(current, indent=2, sort_keys=True))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses unknown names and impossible settings before any data is read or any model is built."""
    for field, accepted in (
        ("name", models.MODELS),
        ("split", models.SPLITS),
        ("head", models.HEADS),
        ("dtype", models.COMPUTE_DTYPES),
    ):
        value = config.model.get(field, "float32" if field == "dtype" else None)
        if value not in accepted:
            raise ValueError(f"unknown model.{field} {value!r}; accepted: {', '.join(accepted)}")
    if config.data.name not in data.DATASETS:
        raise ValueError(f"unknown data.name {config.data.name!r}; accepted: {', '.join(data.DATASETS)}")
    if config.data.source not in data.SOURCES:
        raise ValueError(f"unknown data.source {config.data.source!r}; accepted: {', '.join(data.SOURCES)}")
    if config.schedule not in schedule.SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; accepted: {', '.join(schedule.SCHEDULES)}")
    if config.optimizer.schedule not in ("cosine", "multistep"):
        raise ValueError(f"unknown optimizer.schedule {config.optimizer.schedule!r}; accepted: 'cosine', 'multistep'")
    objective = objectives.from_config(config.objective, config.train.label_smoothing)
    num_stages = len(models.stage_sizes(_model_config(config.model)))
    schedule.make_phases(config.schedule, num_stages, stage_epochs(config, num_stages))
    _stage_learning_rates(config, schedule.num_groups(config.schedule, num_stages))
    if "analysis" in config:
        analysis.check_options({**analysis.default_options(), **config.analysis.to_dict()})
        if config.analysis.enabled and not config.train.checkpoint:
            raise ValueError("analysis.enabled=True analyses the run's checkpoints: it needs train.checkpoint=True")
    minimum = objectives.minimum_batch_size(objective)
    if config.train.batch_size < minimum:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is too small for the {config.objective.name!r} objective's "
            f"estimators, which need at least {minimum} samples per batch"
        )


def _check_batch_sizes(config: ml_collections.ConfigDict, train_size: int) -> None:
    batch = config.train.batch_size
    if batch <= 0 or batch > train_size:
        raise ValueError(f"train.batch_size={batch} must be between 1 and the {train_size} training images")
    if batch % jax.device_count():
        raise ValueError(
            f"train.batch_size={batch} must be a multiple of the {jax.device_count()} devices it is split over"
        )
    if config.train.eval_batch_size % jax.device_count():
        raise ValueError(
            f"train.eval_batch_size={config.train.eval_batch_size} must be a multiple of the "
            f"{jax.device_count()} devices it is split over"
        )


def evaluate(trainer: Trainer, phase_index: int, state: dict, dataset: data.ArrayDataset, batch_size: int) -> dict:
    """Test loss and accuracy of the heads the phase reports on, ``{head: {"loss": .., "accuracy": ..}}``."""
    totals = None
    for batch in data.eval_batches(dataset, batch_size):
        metrics = trainer.eval_steps[phase_index](state, trainer.shard(batch))
        totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    totals = jax.device_get(totals)
    heads = schedule.evaluated_heads(trainer.phases[phase_index], trainer.num_stages)
    return {
        k: {
            "loss": float(totals[f"loss_sum/{k}"] / totals["count"]),
            "accuracy": float(totals[f"correct/{k}"] / totals["count"]),
        }
        for k in heads
    }


def _epoch_records(
    trainer: Trainer, phase: schedule.Phase, epoch: int, phase_epoch: int, totals: dict, steps: int, test: dict
) -> list[dict]:
    """The metrics.jsonl records of one epoch: one per stage the phase trains (one with stage None end to end)."""
    num_stages = trainer.num_stages
    seconds, train_seconds, step_in_phase = totals.pop("_seconds"), totals.pop("_train_seconds"), totals.pop("_steps")
    terms = [name for name in totals if name not in ("loss", "correct", "count", "grad_norm", "unit_grad_norm")]
    records = []
    for k in schedule.evaluated_heads(phase, num_stages):
        group = 0 if phase.schedule == "end_to_end" else k  # the optimizer of the stage's parameter group
        record = {
            "stage": None if phase.schedule == "end_to_end" else k,
            "epoch": epoch,
            "phase_epoch": phase_epoch,
            "train_loss": float(totals["loss"][k] / steps),
            "train_accuracy": float(totals["correct"][k] / totals["count"]),
            "test_loss": test[k]["loss"],
            "test_accuracy": test[k]["accuracy"],
            "images_per_second": float(totals["count"] / train_seconds),
            "seconds": seconds,
            "learning_rate": float(trainer.schedules[group](step_in_phase - 1)),
        }
        if phase.schedule == "end_to_end":
            record["grad_norms"] = [float(v / steps) for v in totals["grad_norm"]]
        else:
            record["grad_norm"] = float(totals["grad_norm"][k] / steps)
        for name in terms:
            record[name] = float(totals[name][k] / steps)
        records.append(record)
    return records


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """On CPU, limits the BLAS/LAPACK libraries loaded in the process to one thread while the context is open.

    XLA:CPU calls LAPACK (OpenBLAS) for the eigendecompositions of the entropy terms. OpenBLAS's worker threads
    keep spinning after a call and take the cores from XLA's own thread pool: on 2 cores a greedy stage's step with
    the DIB objective ran 35–75% slower than with CE alone, and as fast with one BLAS thread. On other backends
    nothing is changed.
    """
    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    # threadpoolctl reaches only libraries already loaded; JAX's CPU LAPACK kernels come from SciPy's OpenBLAS,
    # which is otherwise loaded at the first compilation that needs it.
    import scipy.linalg.cython_lapack  # noqa: F401

    return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains as ``config`` says (its schedule's phases in order), evaluating every epoch; returns the summary."""
    with single_threaded_blas():
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    start = time.perf_counter()
    workdir = pathlib.Path(workdir).absolute()
    check_config(config)
    train_ds, test_ds, info = data.load(config.data)
    _check_batch_sizes(config, len(train_ds))
    _check_workdir(config, workdir)

    steps = data.steps_per_epoch(len(train_ds), config.train.batch_size)
    trainer = Trainer(config, info, steps)
    state = jax.device_put(trainer.initial_state, trainer.replicated)
    total_epochs = sum(phase.num_epochs for phase in trainer.phases)

    analyse = "analysis" in config and config.analysis.enabled
    # The analysis reads the checkpoints of its epochs (0: the initial state), so those are kept.
    kept = set(analysis.analysis_epochs(config.analysis.epochs, total_epochs)) if analyse else set()
    if analyse:
        policies = ocp.checkpoint_managers.preservation_policy
        policy = policies.AnyPreservationPolicy([policies.LatestN(2), policies.CustomSteps(kept)])
        keep = {"preservation_policy": policy}
    else:
        keep = {"max_to_keep": 2}
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(create=True, **keep))
    first_epoch = 0
    if manager.latest_step() is not None:
        first_epoch = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(first_epoch, args=ocp.args.StandardRestore(abstract))
    elif 0 in kept:
        manager.save(0, args=ocp.args.StandardSave(state))

    metrics_path = workdir / "metrics.jsonl"
    records = []
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        records = [r for r in records if r["epoch"] < first_epoch]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Wall time counts every invocation that contributed a kept epoch (not the work an interruption lost).
    elapsed_before = records[-1].get("elapsed_seconds", 0.0) if records else 0.0
    gradient_path = workdir / analysis.GRADIENT_FILE
    if gradient_path.exists():
        kept_lines = [line for line in gradient_path.read_text().splitlines() if line.strip()]
        kept_lines = [line for line in kept_lines if json.loads(line)["epoch"] < first_epoch]
        gradient_path.write_text("".join(line + "\n" for line in kept_lines))

    sample_batch = trainer.shard(next(data.train_batches(train_ds, config.train.batch_size, seed=config.seed, epoch=0)))
    peak_bytes: list[int | None] = []
    epoch = 0
    try:
        for phase_index, phase in enumerate(trainer.phases):
            # Compiled once ahead of time: the executable gives XLA's memory analysis and runs every step.
            train_step = trainer.train_steps[phase_index].lower(state, sample_batch).compile()
            peak_bytes.append(trainer.peak_memory_bytes(train_step))
            for phase_epoch in range(phase.num_epochs):
                if epoch < first_epoch:
                    epoch += 1
                    continue
                epoch_start = time.perf_counter()
                totals = None
                unit_grad_norms = []
                bar = tqdm.tqdm(
                    data.train_batches(train_ds, config.train.batch_size, seed=config.seed, epoch=epoch),
                    total=steps,
                    desc=f"{phase.name} epoch {phase_epoch + 1}/{phase.num_epochs}",
                    disable=not config.train.progress,
                    leave=False,
                )
                head = schedule.evaluated_heads(phase, trainer.num_stages)[-1]
                for i, batch in enumerate(bar):
                    state, metrics = train_step(state, trainer.shard(batch))
                    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
                    if analyse:
                        unit_grad_norms.append(metrics["unit_grad_norm"])
                    if (i + 1) % config.train.log_every_steps == 0 or i + 1 == steps:
                        host = jax.device_get(totals)
                        _stop_if_nonfinite(state, phase, phase_epoch, epoch, steps)
                        bar.set_postfix(
                            loss=f"{host['loss'][head] / (i + 1):.4f}",
                            acc=f"{host['correct'][head] / host['count']:.4f}",
                            img_s=f"{host['count'] / (time.perf_counter() - epoch_start):.0f}",
                        )
                bar.close()
                host = jax.device_get(totals)
                _stop_if_nonfinite(state, phase, phase_epoch, epoch, steps)
                host["_train_seconds"] = time.perf_counter() - epoch_start
                test = evaluate(trainer, phase_index, state, test_ds, config.train.eval_batch_size)
                host["_seconds"] = time.perf_counter() - epoch_start
                host["_steps"] = (phase_epoch + 1) * steps
                epoch_records = _epoch_records(trainer, phase, epoch, phase_epoch, host, steps, test)
                for r in epoch_records:
                    r["elapsed_seconds"] = elapsed_before + time.perf_counter() - start
                records.extend(epoch_records)
                with metrics_path.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in epoch_records)
                if analyse:
                    norms = np.stack(jax.device_get(unit_grad_norms)).tolist()
                    with gradient_path.open("a") as f:
                        f.write(json.dumps({"epoch": epoch, "stage": phase.stage, "norms": norms}) + "\n")
                for r in epoch_records:
                    where = "" if r["stage"] is None else f"stage {r['stage']} "
                    print(
                        f"{where}epoch {epoch + 1}/{total_epochs}: train loss {r['train_loss']:.4f} "
                        f"acc {r['train_accuracy']:.4f} | test loss {r['test_loss']:.4f} "
                        f"acc {r['test_accuracy']:.4f} | {r['images_per_second']:.0f} img/s"
                    )
                epoch += 1
                if config.train.checkpoint:
                    manager.save(epoch, args=ocp.args.StandardSave(state))
    finally:
        # Finish writing the last good checkpoint even when the run stops on an error.
        manager.wait_until_finished()
        manager.close()

    summary = _summary(trainer, records)
    summary.update(
        {
            "wall_seconds": elapsed_before + time.perf_counter() - start,
            "train_step_peak_bytes": max((b for b in peak_bytes if b is not None), default=None),
            "phase_peak_bytes": peak_bytes,
            "num_epochs": total_epochs,
            "devices": [str(d) for d in jax.devices()],
        }
    )
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if analyse:
        analysis_start = time.perf_counter()
        analysis.analyze_run(workdir, trainer, train_ds)
        summary["analysis_seconds"] = time.perf_counter() - analysis_start
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(trainer: Trainer, records: list[dict]) -> dict[str, Any]:
    """Final test accuracy of the classifier (the last stage's head) and, for layer-wise runs, of every head."""
    last = trainer.num_stages - 1
    by_stage: dict[int | None, dict] = {}
    for r in records:
        by_stage[r["stage"]] = r  # the latest record of each stage
    schedule_name = trainer.config.schedule
    final = by_stage[None] if schedule_name == "end_to_end" else by_stage[last]
    stage_accuracies = None
    if schedule_name != "end_to_end":
        stage_accuracies = [by_stage[k]["test_accuracy"] for k in range(trainer.num_stages)]
    return {
        "test_accuracy": final["test_accuracy"],
        "stage_accuracies": stage_accuracies,
        "schedule": schedule_name,
        "objective": trainer.config.objective.name,
    }


def _stop_if_nonfinite(state: dict, phase: schedule.Phase, phase_epoch: int, epoch: int, steps_per_epoch: int):
    bad_step = int(state["nonfinite_step"])
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"the training loss became NaN/Inf at {phase.name}, epoch {phase_epoch + 1}, "
            f"step {bad_step - epoch * steps_per_epoch + 1} of that epoch (global step {bad_step + 1}); "
            "the state was not updated from that step on and the last good checkpoint is kept"
        )
