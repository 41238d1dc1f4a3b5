"""The training loop: ``train_and_evaluate(config, workdir)``.

``config.scheduler`` says how the stages are trained (:mod:`dibjax.schedulers`: ``sequential`` greedy
layer-wise, ``simultaneous`` decoupled, or ``end_to_end`` backpropagation) and ``config.objective`` with what
per-stage loss (:mod:`dibjax.objectives`); :class:`~dibjax.trainer.Trainer` compiles the steps and
:class:`~dibjax.workdir.Workdir` holds the files.

Epochs count from 1 everywhere a user reads them (the console, ``metrics.jsonl``, checkpoints, the analysis);
checkpoint ``e`` is the state after ``e`` epochs of the run and ``0`` the initial state. A sequential run counts
its epochs over the whole run (stage 2 of 4 stages of 17 epochs starts at epoch 18) and also within its stage
(``phase_epoch``); stages count from 1 in files and on the console.

What a rerun of the same command does: a finished run (``summary.json`` present) prints its summary and returns
it without loading data or compiling; an unfinished one resumes from its newest intact checkpoint and continues
exactly as an uninterrupted run would, inside any stage.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import threadpoolctl
import tqdm

from dibjax import analysis, config_lib, data, distributed, schedulers
from dibjax.checkpoints import Checkpoints
from dibjax.errors import ConfigError, NonFiniteLossError, RunInterrupted, WorkdirError
from dibjax.trainer import Trainer
from dibjax.workdir import ANALYSIS_FILE, GRADIENT_FILE, METRICS_FILE, Workdir

__all__ = ["epoch_records", "single_threaded_blas", "train_and_evaluate"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains as ``config`` says (its scheduler's phases in order), evaluating every epoch; returns the summary.

    Resumes from the newest intact checkpoint in ``workdir``; returns a finished run's summary at once.

    Raises:
        dibjax.errors.RunError: for a bad configuration, data, workdir or checkpoint, and when the loss becomes
            NaN/Inf; the message says what to do.
        dibjax.errors.RunInterrupted: on SIGINT or SIGTERM (honoured at the next training step), after the last
            checkpoint is written; the message says from which epoch a rerun resumes.
    """
    with single_threaded_blas(), _StopRequests() as stop:
        return _train_and_evaluate(config, Workdir(workdir), stop)


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """On CPU, limits the BLAS/LAPACK libraries loaded in the process to one thread while the context is open.

    XLA:CPU calls LAPACK (OpenBLAS) for the eigendecompositions of the entropy terms. OpenBLAS's worker threads
    keep spinning after a call and take the cores from XLA's own thread pool, which slows a step with an
    information term far more than its arithmetic costs (docs/benchmarks.md). On other backends nothing is
    changed.
    """
    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    # threadpoolctl reaches only libraries already loaded; JAX's CPU LAPACK kernels come from SciPy's OpenBLAS,
    # which is otherwise loaded at the first compilation that needs it.
    import scipy.linalg.cython_lapack  # noqa: F401

    return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def _print(*args) -> None:
    """``print`` in the primary process only: the processes of a run would each print the same line."""
    if distributed.is_primary():
        print(*args, flush=True)


class _StopRequests:
    """Turns the first SIGINT/SIGTERM into a request that the loop honours at the next step.

    A second SIGINT raises ``KeyboardInterrupt`` at once. Handlers can only be set from the main thread; elsewhere
    the process's own handling applies.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        del frame
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def raise_if_requested(self, *, every_process: bool = False) -> None:
        """Raises ``KeyboardInterrupt`` if a stop was requested: here, or with ``every_process`` in any process.

        With several processes, every process must stop after the same step, or the others would wait for it in
        the next step's collectives: they agree at the points where all call this with ``every_process=True``.
        """
        if jax.process_count() > 1:
            if every_process and distributed.any_process(self.signal_number is not None):
                self.signal_number = self.signal_number or signal.SIGTERM
                raise KeyboardInterrupt
        elif self.signal_number is not None:
            raise KeyboardInterrupt


def _position(trainer: Trainer, phase: schedulers.Phase, phase_epoch: int, epoch: int, total: int) -> str:
    """Where a run is, for people: ``epoch 3/17``, or ``stage 2/4 epoch 3/17 (epoch 20/68 of the run)``."""
    if phase.stage is None:
        return f"epoch {epoch}/{total}"
    stage = f"stage {phase.stage + 1}/{trainer.num_stages}"
    return f"{stage} epoch {phase_epoch}/{phase.num_epochs} (epoch {epoch}/{total} of the run)"


def _percent(accuracy: float) -> str:
    return f"{100 * accuracy:.2f}%"


def _scored_on(config: ml_collections.ConfigDict) -> str:
    """The images a run is scored on: the held-out validation split when it has one, else the test set."""
    return "validation" if config.data.get("validation_size") else "test"


def _finished_line(summary: dict[str, Any], path, scored_on: str) -> str:
    heads = summary.get("stage_accuracies")
    per_stage = f" (heads: {' / '.join(f'{100 * a:.1f}' for a in heads)}%)" if heads else ""
    return (
        f"{scored_on} accuracy {_percent(summary['test_accuracy'])}{per_stage} after {summary['num_epochs']} epochs, "
        f"{summary['wall_seconds']:.0f} s of training; summary: {path}"
    )


def _header(config: ml_collections.ConfigDict, workdir: Workdir, trainer: Trainer, train_ds, test_ds) -> None:
    devices = jax.devices()
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    evaluated = _scored_on(config)
    where = f"{config.data.source} {config.data.dir}" if config.data.dir else config.data.source
    if config.data.get("label_noise"):
        where += f", {config.data.label_noise:.0%} of training labels noisy"
    _print(
        f"dibjax: {config.data.name} {config.get('variant', '')} · scheduler {config.scheduler}, objective "
        f"{config.objective.name}, {config.model.name} in {trainer.num_stages} stages · workdir {workdir.path}"
    )
    _print(
        f"devices: {len(devices)} × {devices[0].device_kind}{processes} (JAX {jax.__version__}) · "
        f"data: {len(train_ds):,} training / {len(test_ds):,} {evaluated} images ({where})"
    )


def epoch_records(
    trainer: Trainer,
    phase: schedulers.Phase,
    epoch: int,
    phase_epoch: int,
    totals: dict,
    test: dict | None,
    timing: dict[str, float],
) -> list[dict]:
    """The ``metrics.jsonl`` records of one epoch: one per head the phase evaluates (one end to end).

    Fields of a record:

    * ``stage``: the stage (from 1) whose head the record scores; ``null`` end to end (the network's classifier).
    * ``epoch``: the epoch of the run (from 1); ``phase_epoch``: the epoch within the stage's phase (from 1;
      equal to ``epoch`` except for the sequential scheduler and the format phase); ``format_phase``: whether the
      epoch belongs to the format phase (``train.format_epochs``: the heads alone trained on the frozen stages).
    * ``train_loss``: the stage's objective averaged over the epoch's steps; ``train_accuracy``: its head's accuracy
      on the (augmented) training batches.
    * ``test_loss``, ``test_accuracy``: cross-entropy and accuracy on the evaluation split (the test set, or the
      held-out validation images with ``data.validation_size``) of the network up to the stage, with its head;
      ``null`` for an epoch not evaluated (``train.eval_every_epochs``; a phase's last epoch always is).
    * ``images_per_second``: training images per second of the epoch's steps; ``seconds``: the epoch's wall time,
      evaluation included; ``elapsed_seconds``: wall time of the run so far, over every invocation that
      contributed a kept epoch.
    * ``learning_rate``: the rate of the epoch's last step.
    * ``grad_norm``: the norm of the gradient of the stage's parameters (head excluded), averaged over the
      epoch's steps; end to end, ``grad_norms`` lists it for every stage.
    * ``train_step_bytes``: XLA's estimate of the compiled training step's memory (:meth:`Trainer.peak_memory_bytes`).
    * one field per term of the objective, averaged over the epoch's steps: ``ce`` (cross-entropy, nats), and
      as configured ``H_T``, ``I_XT``, ``I_prev``, ``I_TY`` (bits), ``sim``, ``hsic_x``, ``hsic_y``, ``recon``,
      ``contrast``.
    """
    steps = trainer.steps_per_epoch
    terms = [name for name in totals if name not in ("loss", "correct", "count", "grad_norm", "unit_grad_norm")]
    records = []
    for k in schedulers.evaluated_heads(phase, trainer.num_stages):
        # The optimizer of the stage's parameter group (the last group holds every head in the format phase).
        group = trainer.num_stages if phase.format else 0 if phase.scheduler == "end_to_end" else k
        record = {
            "stage": None if phase.scheduler == "end_to_end" else k + 1,
            "epoch": epoch,
            "phase_epoch": phase_epoch,
            "format_phase": phase.format,
            "train_loss": float(totals["loss"][k] / steps),
            "train_accuracy": float(totals["correct"][k] / totals["count"]),
            "test_loss": None if test is None else test[k]["loss"],
            "test_accuracy": None if test is None else test[k]["accuracy"],
            "images_per_second": float(totals["count"] / timing["train_seconds"]),
            "seconds": timing["seconds"],
            "learning_rate": float(trainer.lr_schedules[group](phase_epoch * steps - 1)),
        }
        if phase.scheduler == "end_to_end":
            record["grad_norms"] = [float(v / steps) for v in totals["grad_norm"]]
        else:
            record["grad_norm"] = float(totals["grad_norm"][k] / steps)
        for name in terms:
            record[name] = float(totals[name][k] / steps)
        record["elapsed_seconds"] = timing["elapsed_seconds"]
        record["train_step_bytes"] = timing["train_step_bytes"]
        records.append(record)
    return records


def _summary(trainer: Trainer, records: list[dict], num_epochs: int, wall_seconds: float) -> dict[str, Any]:
    """Final accuracy of the classifier (the last stage's head) and, for layer-wise runs, of every head."""
    by_stage: dict[int | None, dict] = {}
    for r in records:
        by_stage[r["stage"]] = r  # the latest record of each stage
    end_to_end = trainer.config.scheduler == "end_to_end"
    final = by_stage[None] if end_to_end else by_stage[trainer.num_stages]
    # One compiled training step per phase: per stage for the sequential scheduler, else one for the run; then
    # one for the format phase, if any.
    training = [r for r in records if not r.get("format_phase")]
    if trainer.config.scheduler == "sequential":
        last_of_stage = {r["stage"]: r for r in training}
        phase_bytes = [last_of_stage[k]["train_step_bytes"] for k in range(1, trainer.num_stages + 1)]
    else:
        phase_bytes = [training[-1]["train_step_bytes"]]
    phase_bytes += [r["train_step_bytes"] for r in records[-1:] if r.get("format_phase")]
    heads = [by_stage[k]["test_accuracy"] for k in range(1, trainer.num_stages + 1)] if not end_to_end else None
    return {
        "test_accuracy": final["test_accuracy"],
        "stage_accuracies": heads,
        "scheduler": trainer.config.scheduler,
        "objective": trainer.config.objective.name,
        "num_epochs": num_epochs,
        "wall_seconds": wall_seconds,
        "train_step_peak_bytes": max((b for b in phase_bytes if b is not None), default=None),
        "phase_peak_bytes": phase_bytes,
        "devices": [str(d) for d in jax.devices()],
    }


def _resume_note(checkpoints: Checkpoints | None) -> str:
    if checkpoints is None:
        return "checkpoints are off (train.checkpoint=False): a rerun starts over"
    return checkpoints.resume_note()


def _check_finite(state, where: str, steps_per_epoch: int, epoch: int) -> None:
    bad_step = int(state.nonfinite_step)
    if bad_step < 0:
        return
    raise NonFiniteLossError(
        f"the training loss became NaN/Inf in {where}, step {bad_step - (epoch - 1) * steps_per_epoch + 1} of that "
        f"epoch (global step {bad_step + 1}); the state was not updated from that step on. A rerun of this "
        "configuration repeats it: lower optimizer.learning_rate or the objective's weights, and start over with "
        "--config.train.overwrite=True"
    )


def _interrupted(stop: _StopRequests, checkpoints: Checkpoints | None, where: str) -> RunInterrupted:
    number = stop.signal_number or signal.SIGINT
    return RunInterrupted(f"stopped by {signal.Signals(number).name} in {where}; {_resume_note(checkpoints)}", number)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Workdir, stop: _StopRequests) -> dict[str, Any]:
    start = time.perf_counter()
    config_lib.check_config(config)
    workdir.check(config)
    analyse = bool(config.analysis.enabled)
    finished = workdir.finished_summary(config)
    if finished is not None and not (analyse and not workdir.file(ANALYSIS_FILE).exists()):
        line = _finished_line(finished, workdir.file("summary.json"), _scored_on(config))
        _print(f"{workdir.path} holds this finished run: {line}")
        return finished

    if analyse and jax.process_count() > 1:
        raise ConfigError(
            "analysis.enabled=True runs in a single process; train without it and analyse the checkpoints "
            "afterwards with python -m dibjax.analysis"
        )
    train_ds, test_ds, info = data.load(config.data)
    config_lib.check_batch_sizes(config, len(train_ds), jax.device_count())
    # Every process has read the folder before the primary one writes to it.
    distributed.synchronize("workdir checked")
    workdir.claim(config)
    distributed.synchronize("workdir claimed")
    trainer = Trainer(config, info, data.steps_per_epoch(len(train_ds), config.train.batch_size))
    total_epochs = sum(phase.num_epochs for phase in trainer.phases)
    if finished is not None:
        return _analyse(workdir, trainer, train_ds, finished)

    _header(config, workdir, trainer, train_ds, test_ds)
    # The analysis reads the checkpoints of its epochs (0: the initial state), so those are kept.
    kept = set(analysis.analysis_epochs(config.analysis.epochs, total_epochs)) if analyse else set()
    checkpoints = Checkpoints(workdir.path, keep_epochs=kept) if config.train.checkpoint else None
    try:
        records, elapsed_before = _train(config, workdir, trainer, checkpoints, stop, train_ds, test_ds, start, kept)
    finally:
        if checkpoints is not None:
            checkpoints.close()

    summary = _summary(trainer, records, total_epochs, elapsed_before + time.perf_counter() - start)
    path = workdir.write_summary(summary)
    if analyse:
        summary = _analyse(workdir, trainer, train_ds, summary)
    _print(f"finished: {_finished_line(summary, path, _scored_on(config))}")
    return summary


def _train(
    config: ml_collections.ConfigDict,
    workdir: Workdir,
    trainer: Trainer,
    checkpoints: Checkpoints | None,
    stop: _StopRequests,
    train_ds: data.ArrayDataset,
    test_ds: data.ArrayDataset,
    start: float,
    kept: set[int],
) -> tuple[list[dict], float]:
    """Trains from the newest intact checkpoint to the end.

    Returns:
        Every epoch's records, and the wall time of the earlier invocations that contributed kept epochs.
    """
    total_epochs = sum(phase.num_epochs for phase in trainer.phases)
    analyse = bool(config.analysis.enabled)
    completed, state = (None, None) if checkpoints is None else checkpoints.restore_latest(trainer.abstract_state())
    completed = completed or 0
    if state is None:
        state = trainer.create_state()
        if 0 in kept:
            checkpoints.save(0, state)
    else:
        _print(f"resuming after epoch {completed}/{total_epochs}, from its checkpoint")

    records = workdir.read_records(METRICS_FILE, before_epoch=completed + 1)
    workdir.read_records(GRADIENT_FILE, before_epoch=completed + 1)
    # Wall time counts every invocation that contributed a kept epoch (not the work an interruption lost).
    elapsed_before = records[-1]["elapsed_seconds"] if records else 0.0
    show_bars = bool(config.train.progress) and sys.stderr.isatty() and distributed.is_primary()
    batch_size = config.train.batch_size
    eval_batch_size = config_lib.eval_batch_size(config, jax.device_count())
    rows = trainer.local_rows(batch_size)
    sample_batch = None
    epoch, where = 0, "the run's set-up"
    try:
        for phase_index, phase in enumerate(trainer.phases):
            if epoch + phase.num_epochs <= completed:
                epoch += phase.num_epochs
                continue
            if sample_batch is None:
                first = data.train_batches(train_ds, batch_size, seed=config.seed, epoch=1, rows=rows)
                sample_batch = trainer.shard(next(first), batch_size)
            what = "the network" if phase.stage is None else f"stage {phase.stage + 1}/{trainer.num_stages}"
            if phase.format:
                what = "the format phase (heads on the frozen stages)"
            where = f"the compilation of {what}'s training step"
            _print(f"compiling {what}'s training step …")
            compile_start = time.perf_counter()
            zero_totals = trainer.zero_totals(phase_index, state, sample_batch)
            # Compiled once ahead of time: the executable gives XLA's memory analysis and runs every step.
            train_step = trainer.train_steps[phase_index].lower(state, zero_totals, sample_batch).compile()
            step_bytes = trainer.peak_memory_bytes(train_step)
            memory = f"; XLA's estimate of its memory: {step_bytes / 2**20:.0f} MiB" if step_bytes else ""
            _print(f"compiled in {time.perf_counter() - compile_start:.1f} s{memory}")
            head = schedulers.evaluated_heads(phase, trainer.num_stages)[-1]
            for phase_epoch in range(1, phase.num_epochs + 1):
                epoch += 1
                if epoch <= completed:
                    continue
                where = _position(trainer, phase, phase_epoch, epoch, total_epochs)
                epoch_start = time.perf_counter()
                totals, unit_grad_norms = trainer.zero_totals(phase_index, state, sample_batch), []
                host_batches = data.train_batches(train_ds, batch_size, seed=config.seed, epoch=epoch, rows=rows)
                batches = data.prefetch((trainer.shard(b, batch_size) for b in host_batches), size=2)
                bar = tqdm.tqdm(batches, total=trainer.steps_per_epoch, desc=where, disable=not show_bars, leave=False)
                for i, batch in enumerate(bar):
                    state, totals, unit_grad_norm = train_step(state, totals, batch)
                    if analyse:
                        unit_grad_norms.append(unit_grad_norm)
                    stop.raise_if_requested()
                    if (i + 1) % config.train.log_every_steps == 0:
                        stop.raise_if_requested(every_process=True)
                        _check_finite(state, where, trainer.steps_per_epoch, epoch)
                        if checkpoints is not None:
                            checkpoints.check()
                        if show_bars:
                            host = jax.device_get(totals)
                            bar.set_postfix(
                                loss=f"{host['loss'][head] / (i + 1):.4f}",
                                acc=f"{host['correct'][head] / host['count']:.4f}",
                                img_s=f"{host['count'] / (time.perf_counter() - epoch_start):.0f}",
                            )
                bar.close()
                host = jax.device_get(totals)
                _check_finite(state, where, trainer.steps_per_epoch, epoch)
                train_seconds = time.perf_counter() - epoch_start
                evaluated = (
                    phase_epoch == phase.num_epochs or phase_epoch % config.train.get("eval_every_epochs", 1) == 0
                )
                test = trainer.evaluate(phase_index, state, test_ds, eval_batch_size) if evaluated else None
                stop.raise_if_requested(every_process=True)
                timing = {
                    "train_seconds": train_seconds,
                    "seconds": time.perf_counter() - epoch_start,
                    "elapsed_seconds": elapsed_before + time.perf_counter() - start,
                    "train_step_bytes": step_bytes,
                }
                new_records = epoch_records(trainer, phase, epoch, phase_epoch, host, test, timing)
                records.extend(new_records)
                try:
                    workdir.append_records(METRICS_FILE, new_records)
                    if analyse:
                        norms = np.stack(jax.device_get(unit_grad_norms)).tolist()
                        stage = None if phase.stage is None else phase.stage + 1
                        workdir.append_records(GRADIENT_FILE, [{"epoch": epoch, "stage": stage, "norms": norms}])
                except WorkdirError as e:
                    raise WorkdirError(
                        f"{e}, after {where}; {_resume_note(checkpoints)} once the cause is fixed"
                    ) from e
                for r in new_records:
                    shown = where if r["stage"] is None or phase.stage is not None else f"head {r['stage']}, {where}"
                    scored = (
                        f"{_scored_on(config)} loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f}"
                        if test
                        else "not evaluated"
                    )
                    _print(
                        f"{shown}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f} | {scored} | "
                        f"{r['images_per_second']:.0f} img/s"
                    )
                if checkpoints is not None:
                    checkpoints.save(epoch, state)
    except KeyboardInterrupt:
        if checkpoints is not None:
            checkpoints.wait()  # the last checkpoint is complete before the run stops
        raise _interrupted(stop, checkpoints, where) from None
    return records, elapsed_before


def _analyse(workdir: Workdir, trainer: Trainer, train_ds: data.ArrayDataset, summary: dict) -> dict:
    analysis_start = time.perf_counter()
    _print("analysing the run's checkpoints …")
    analysis.analyze_run(workdir.path, trainer, train_ds)
    summary = dict(summary, analysis_seconds=time.perf_counter() - analysis_start)
    workdir.write_summary(summary)
    return summary
