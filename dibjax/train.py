"""End-to-end training loop: ``train_and_evaluate(config, workdir)``.

The whole network is trained by backpropagation (the SGD baseline). The loop is written
on a functional training state (parameters, BatchNorm statistics, optimizer state, step)
so that it can be checkpointed with orbax and sharded: the batch is split over a 1-D
device mesh with axis ``"data"`` and the state is replicated, so the same code runs on one
CPU, a TPU slice or several GPUs.

Files written in ``workdir``:

* ``config.json``: the run's configuration; a later run in the same folder must match it
  (``config.train.overwrite=True`` starts over instead).
* ``metrics.jsonl``: one JSON record per epoch (``stage``, ``epoch``, ``train_loss``,
  ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``images_per_second``, ``seconds``,
  ``learning_rate``).
* ``checkpoints/``: orbax checkpoints after every epoch; rerunning the same command resumes
  from the latest and continues exactly as an uninterrupted run would.
* ``summary.json``: ``test_accuracy``, ``wall_seconds``, ``train_step_peak_bytes`` (XLA's
  memory analysis of the compiled training step) and the run's shape.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dibjax import data, models

# Fields that do not change what a run computes, so resuming may differ in them.
_RESUMABLE_FIELDS = {("train", "overwrite"), ("train", "progress"), ("train", "log_every_steps")}


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or Inf; the last good checkpoint is kept."""


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    opt = config.optimizer
    total = config.train.num_epochs * steps_per_epoch
    warmup = int(opt.warmup_epochs * steps_per_epoch)
    if opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(opt.learning_rate, max(total - warmup, 1))
    elif opt.schedule == "multistep":
        boundaries = {int(f * total) - warmup: opt.decay_factor for f in opt.milestones}
        main = optax.piecewise_constant_schedule(opt.learning_rate, boundaries)
    else:
        raise ValueError(f"unknown optimizer.schedule {opt.schedule!r}; accepted: 'cosine', 'multistep'")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and decoupled-from-the-loss L2 weight decay, as in the CIFAR literature."""
    opt = config.optimizer
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(schedule, momentum=opt.momentum or None, nesterov=bool(opt.nesterov and opt.momentum)),
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) if label_smoothing else None
    if targets is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return optax.softmax_cross_entropy(logits, targets)


@dataclasses.dataclass
class Trainer:
    """Compiled train and eval steps for one model and configuration."""

    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    steps_per_epoch: int

    def __post_init__(self):
        config = self.config
        model = models.build_model(_model_config(config.model), self.info.num_classes, nnx.Rngs(config.seed))
        model.train()
        self.train_graphdef, params, extra = nnx.split(model, nnx.Param, ...)
        model.eval()
        self.eval_graphdef = nnx.graphdef(model)
        self.schedule = learning_rate_schedule(config, self.steps_per_epoch)
        self.optimizer = make_optimizer(config, self.schedule)
        self.initial_state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "extra": extra,
            "opt_state": self.optimizer.init(params),
            "key": jax.random.key_data(jax.random.key(config.seed + 1)),
            # Index of the first step whose loss was not finite, or -1.
            "nonfinite_step": -jnp.ones((), jnp.int32),
        }
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step)

    def _train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        config = self.config
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
        images = data.augment(batch["image"], key, crop_padding=config.data.crop_padding, flip=self.info.flip)
        images = data.normalize(images, self.info)

        def loss_fn(params, extra):
            model = nnx.merge(self.train_graphdef, params, extra, copy=True)
            logits = model(images)
            loss = jnp.mean(cross_entropy(logits, batch["label"], config.train.label_smoothing))
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["extra"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss)
        # A non-finite step leaves the state as it was, so the run stops on the last good one.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "extra": keep(extra, state["extra"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "key": state["key"],
            "nonfinite_step": jnp.where(
                (state["nonfinite_step"] < 0) & ~finite, state["step"], state["nonfinite_step"]
            ),
        }
        metrics = {
            "loss_sum": loss * labels_count(batch),
            "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]),
            "count": labels_count(batch),
        }
        return new_state, metrics

    def _eval_step(self, state: dict, batch: dict) -> dict:
        model = nnx.merge(self.eval_graphdef, state["params"], state["extra"], copy=True)
        logits = model(data.normalize(batch["image"], self.info))
        mask = batch["mask"]
        losses = cross_entropy(logits, batch["label"], 0.0)
        return {
            "loss_sum": jnp.sum(jnp.where(mask, losses, 0)),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & mask),
            "count": jnp.sum(mask),
        }

    def shard(self, batch: dict) -> dict:
        return jax.device_put(batch, self.batch_sharding)

    @staticmethod
    def peak_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
        """XLA's estimate of a compiled step's peak memory (arguments + outputs + temporaries)."""
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        peak = getattr(analysis, "peak_memory_in_bytes", 0)
        if peak:
            return int(peak)
        return int(
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )


def labels_count(batch: dict) -> jax.Array:
    return jnp.asarray(batch["label"].shape[0], jnp.float32)


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
            if k not in _RESUMABLE_FIELDS and saved_flat.get(k) != current_flat.get(k)
        }
        if differences and not config.train.overwrite:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(differences.items()))
            raise ValueError(
                f"workdir {workdir} holds a run with another configuration ({shown}); "
                "use another workdir, or pass --config.train.overwrite=True to start over"
            )
        if differences:
            for name in ("checkpoints", "metrics.jsonl", "summary.json"):
                path = workdir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(current, indent=2, sort_keys=True))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses unknown names before any data is read or any model is built."""
    for field, accepted in (("name", models.MODELS), ("split", models.SPLITS), ("head", models.HEADS)):
        value = config.model[field]
        if value not in accepted:
            raise ValueError(f"unknown model.{field} {value!r}; accepted: {', '.join(accepted)}")
    if config.data.name not in data.DATASETS:
        raise ValueError(f"unknown data.name {config.data.name!r}; accepted: {', '.join(data.DATASETS)}")
    if config.data.source not in data.SOURCES:
        raise ValueError(f"unknown data.source {config.data.source!r}; accepted: {', '.join(data.SOURCES)}")
    if config.schedule != "end_to_end":
        raise ValueError(f"unknown schedule {config.schedule!r}; accepted: 'end_to_end'")
    if config.optimizer.schedule not in ("cosine", "multistep"):
        raise ValueError(f"unknown optimizer.schedule {config.optimizer.schedule!r}; accepted: 'cosine', 'multistep'")


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


def evaluate(trainer: Trainer, state: dict, dataset: data.ArrayDataset, batch_size: int) -> dict:
    totals = None
    for batch in data.eval_batches(dataset, batch_size):
        metrics = trainer.eval_step(state, trainer.shard(batch))
        totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss_sum"] / totals["count"]), "accuracy": float(totals["correct"] / totals["count"])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains end to end as ``config`` says, evaluating every epoch; returns the summary."""
    start = time.perf_counter()
    workdir = pathlib.Path(workdir).absolute()
    check_config(config)
    train_ds, test_ds, info = data.load(config.data)
    _check_batch_sizes(config, len(train_ds))
    _check_workdir(config, workdir)

    steps = data.steps_per_epoch(len(train_ds), config.train.batch_size)
    trainer = Trainer(config, info, steps)
    state = jax.device_put(trainer.initial_state, trainer.replicated)

    manager = ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    first_epoch = 0
    if manager.latest_step() is not None:
        first_epoch = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(first_epoch, args=ocp.args.StandardRestore(abstract))

    sample_batch = trainer.shard(next(data.train_batches(train_ds, config.train.batch_size, seed=config.seed, epoch=0)))
    # Compiled once ahead of time: the executable gives XLA's memory analysis and runs every step.
    train_step = trainer.train_step.lower(state, sample_batch).compile()
    peak_bytes = trainer.peak_memory_bytes(train_step)

    metrics_path = workdir / "metrics.jsonl"
    records = []
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        records = [r for r in records if r["epoch"] < first_epoch]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    try:
        for epoch in range(first_epoch, config.train.num_epochs):
            epoch_start = time.perf_counter()
            totals = None
            bar = tqdm.tqdm(
                data.train_batches(train_ds, config.train.batch_size, seed=config.seed, epoch=epoch),
                total=steps,
                desc=f"epoch {epoch + 1}/{config.train.num_epochs}",
                disable=not config.train.progress,
                leave=False,
            )
            for i, batch in enumerate(bar):
                state, metrics = train_step(state, trainer.shard(batch))
                totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
                if (i + 1) % config.train.log_every_steps == 0 or i + 1 == steps:
                    host = jax.device_get(totals)
                    _stop_if_nonfinite(state, epoch, steps)
                    seen = host["count"]
                    bar.set_postfix(
                        loss=f"{host['loss_sum'] / seen:.4f}",
                        acc=f"{host['correct'] / seen:.4f}",
                        img_s=f"{seen / (time.perf_counter() - epoch_start):.0f}",
                    )
            bar.close()
            host = jax.device_get(totals)
            _stop_if_nonfinite(state, epoch, steps)
            train_seconds = time.perf_counter() - epoch_start
            test = evaluate(trainer, state, test_ds, config.train.eval_batch_size)
            record = {
                "stage": None,
                "epoch": epoch,
                "train_loss": float(host["loss_sum"] / host["count"]),
                "train_accuracy": float(host["correct"] / host["count"]),
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "images_per_second": float(host["count"] / train_seconds),
                "seconds": time.perf_counter() - epoch_start,
                "learning_rate": float(trainer.schedule(int(state["step"]) - 1)),
            }
            records.append(record)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"epoch {epoch + 1}/{config.train.num_epochs}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_accuracy']:.4f} | test loss {record['test_loss']:.4f} "
                f"acc {record['test_accuracy']:.4f} | {record['images_per_second']:.0f} img/s"
            )
            if config.train.checkpoint:
                manager.save(epoch + 1, args=ocp.args.StandardSave(state))
    finally:
        # Finish writing the last good checkpoint even when the run stops on an error.
        manager.wait_until_finished()
        manager.close()

    final = records[-1] if records else evaluate(trainer, state, test_ds, config.train.eval_batch_size)
    summary = {
        "test_accuracy": final["test_accuracy"],
        "stage_accuracies": None,
        "wall_seconds": time.perf_counter() - start,
        "train_step_peak_bytes": peak_bytes,
        "num_epochs": config.train.num_epochs,
        "devices": [str(d) for d in jax.devices()],
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stop_if_nonfinite(state: dict, epoch: int, steps_per_epoch: int) -> None:
    bad_step = int(state["nonfinite_step"])
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"the training loss became NaN/Inf at stage end_to_end, epoch {epoch + 1}, "
            f"step {bad_step - epoch * steps_per_epoch + 1} of that epoch (global step {bad_step + 1}); "
            "the state was not updated from that step on and the last good checkpoint is kept"
        )
