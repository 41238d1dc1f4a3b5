"""Several processes, one run: JAX's multi-controller runtime, each process's share of a batch, one writer.

dibjax runs as JAX's multi-controller programs do: the same command on every host (one process per host, or
one per GPU), each process driving its local devices, the processes joined by :func:`initialize`. Every process
holds the data set in host memory, takes from each global batch only the rows its devices hold
(:func:`local_rows`) and builds the global array with ``jax.make_array_from_process_local_data``. Every process
computes and saves checkpoints (orbax coordinates them); only the primary process (``jax.process_index() == 0``)
writes the run's other files and prints.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from dibjax.errors import ConfigError

__all__ = ["any_process", "initialize", "is_primary", "local_rows", "synchronize"]


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins this process to the run's other processes, before any JAX computation.

    With ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and ``process_id`` given, they are
    used. Without them, JAX's cluster detection is tried: it recognises Cloud TPU pod slices, SLURM and Open MPI
    jobs from their environment; elsewhere the run is a single process and nothing is done.

    Raises:
        ConfigError: when only some of the three values are given, or they are out of range.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(value is not None for value in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ConfigError(
                f"--{' and --'.join(missing)} missing: give --coordinator_address, --num_processes and --process_id "
                "together (or none of them on a TPU pod slice, a SLURM or an Open MPI job)"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process_id={process_id} must lie in [0, --num_processes={num_processes}) and --num_processes ≥ 1"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    if _cluster_detected():
        jax.distributed.initialize()


def _cluster_detected() -> bool:
    """Whether this is one of several processes of a job JAX's cluster detection knows (SLURM, Open MPI, TPU VM)."""
    if "SLURM_JOB_ID" in os.environ:
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        return int(os.environ["OMPI_COMM_WORLD_SIZE"]) > 1
    try:
        from jax._src import clusters  # no public API says whether JAX's detection would succeed
    except ImportError:
        return False
    # On a Cloud TPU VM, JAX's detection reads the slice's hosts from its metadata (one host works too).
    return any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types if "Tpu" in c.__name__)


def is_primary() -> bool:
    """Whether this process writes the run's files and prints (process 0)."""
    return jax.process_index() == 0


def synchronize(name: str) -> None:
    """Waits until every process reaches the point named ``name`` (nothing with a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process (collective: every process must call it at the same point)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def local_rows(sharding: jax.sharding.Sharding, global_size: int) -> slice:
    """The rows of a global batch of ``global_size`` that this process's devices hold under ``sharding``.

    The process's devices must hold one contiguous block of rows (as the 1-D data meshes of
    ``jax.make_mesh`` give); the rows are what this process passes to ``jax.make_array_from_process_local_data``.
    """
    indices = sharding.addressable_devices_indices_map((global_size,)).values()
    starts = sorted({index[0].indices(global_size)[0] for index in indices})
    stops = sorted({index[0].indices(global_size)[1] for index in indices})
    rows = slice(starts[0], stops[-1])
    held = sum(stop - start for start, stop in zip(starts, stops, strict=True))
    if held != rows.stop - rows.start:
        raise ValueError(f"the devices of process {jax.process_index()} hold scattered rows of the batch: {indices}")
    return rows
