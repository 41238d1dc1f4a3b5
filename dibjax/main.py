"""Command-line entry point: parses the flags and calls :func:`dibjax.train.train_and_evaluate`.

    python -m dibjax.main --config=configs/cifar10.py:cpu,sgd --workdir=runs/c10 \
        --config.data.source=npz --config.data.dir=../shared/data/cifar10

Several processes (one per host, or one per GPU) run the same command; on a TPU pod slice, a SLURM or an Open MPI
job they find each other by themselves, elsewhere pass ``--coordinator_address=HOST:PORT`` (process 0's),
``--num_processes`` and ``--process_id`` (:mod:`dibjax.distributed`).

A mistake in the configuration, the data or the workdir ends with a one-line message and exit status 1;
``--traceback`` shows the traceback too (:mod:`dibjax.cli`).
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from dibjax import cli, distributed, host_memory, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':variant'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and the summary (or gs://...).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for several processes outside TPU pods, SLURM and MPI."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    os.path.join("~", ".cache", "dibjax", "jax"),
    "JAX's persistent compilation cache: a rerun or resumed run loads its compiled steps from it. '' turns it off.",
)
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_freed_host_memory",
    True,
    "On CPU, keep the memory XLA frees after each step in the process instead of returning it to the kernel "
    "(dibjax.host_memory): faster steps, a resident heap as large as the largest step needed.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _KEEP_HOST_MEMORY.value and host_memory.runs_on_cpu():
        host_memory.keep_freed_memory()
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _CACHE.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
