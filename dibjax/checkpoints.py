"""A run's checkpoints: one orbax checkpoint per epoch, each verified against a fingerprint when restored.

Checkpoint ``e`` is the training state after ``e`` epochs (``0``: the initial state). With every checkpoint,
:class:`Checkpoints` records in orbax's step metadata a fingerprint of its arrays: for every leaf of the state,
two 32-bit sums of its bit patterns weighted by odd per-position constants (:func:`fingerprint`), computed on
the devices with integer arithmetic, so the same arrays give the same fingerprint on any device count or
backend, and any change of one element changes both sums. A restored checkpoint must match its fingerprint and
hold only finite floats; one that does not, or cannot be read at all, is moved aside to
``<workdir>/corrupted_checkpoints/`` with a warning that names it, and the newest intact one is used instead
(:meth:`Checkpoints.restore_latest`).

A save that fails (a full disk, a folder made read-only) raises :class:`~dibjax.errors.WorkdirError` naming the
folder and the epoch; orbax writes each checkpoint into a temporary folder and renames it only when complete, so
the previous checkpoint stays intact and a rerun resumes from it (the temporary folder is removed then).
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dibjax import distributed
from dibjax.errors import CheckpointError, WorkdirError

FINGERPRINT_KEY = "dibjax_fingerprint"
QUARANTINE = "corrupted_checkpoints"

# Two odd multipliers (golden-ratio and a prime): weights 2i+1 times each are odd, hence invertible modulo 2^32.
_MULTIPLIERS = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA77))


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bit patterns of ``x``'s elements as uint32 (64-bit elements give two words each)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _leaf_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    bits = _as_uint32(x)
    odd = jnp.arange(bits.size, dtype=jnp.uint32) * np.uint32(2) + np.uint32(1)
    sums = tuple(jnp.sum(bits * (odd * m), dtype=jnp.uint32) for m in _MULTIPLIERS)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
    return sums[0], sums[1], finite


@jax.jit
def _fingerprints(tree: Any) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    return [_leaf_fingerprint(leaf) for leaf in jax.tree.leaves(tree)]


def fingerprint(tree: Any) -> tuple[dict[str, str], list[str]]:
    """Per-leaf fingerprints of ``tree`` and the paths of its leaves holding NaN or Inf.

    Returns:
        ``({leaf path: "xxxxxxxx-xxxxxxxx"}, [paths of non-finite leaves])``; leaf paths as
        ``jax.tree_util.keystr`` writes them.
    """
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    values = jax.device_get(_fingerprints(tree))
    digests = {path: f"{int(a):08x}-{int(b):08x}" for path, (a, b, _) in zip(paths, values, strict=True)}
    nonfinite = [path for path, (_, _, finite) in zip(paths, values, strict=True) if not finite]
    return digests, nonfinite


def failure_reason(error: BaseException) -> str:
    """A short reason for a failed write: the OS's words where the error carries them."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno is not None:
            return os.strerror(e.errno)
    text = " ".join(str(e) for e in _chain(error))
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        if os.strerror(code) in text:
            return os.strerror(code)
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return first[:300]


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged: unreadable, not matching its fingerprint, or holding NaN/Inf."""


class Checkpoints:
    """The checkpoints in ``<workdir>/checkpoints``: save, verify, restore, fall back.

    Args:
        workdir: the run's folder.
        keep_latest: how many of the latest checkpoints to keep.
        keep_epochs: checkpoints kept in any case (the analysed epochs).
        create: create the folder if absent (False for read-only use, such as the analysis).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep_latest: int = 2,
        keep_epochs: Collection[int] = (),
        create: bool = True,
    ):
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / "checkpoints"
        policies = ocp.checkpoint_managers.preservation_policy
        policy = policies.LatestN(keep_latest)
        if keep_epochs:
            policy = policies.AnyPreservationPolicy([policy, policies.CustomSteps(sorted(keep_epochs))])
        options = ocp.CheckpointManagerOptions(
            create=create, preservation_policy=policy, cleanup_tmp_directories=create
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
            )
        except OSError as e:
            raise WorkdirError(f"cannot create the checkpoint folder {self.directory}: {failure_reason(e)}") from e
        self._pending: int | None = None  # the epoch whose save may still be running
        self._failed = False  # a failed save was reported; orbax would raise it again on every call

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, in increasing order."""
        return sorted(self._manager.all_steps())

    def save(self, epoch: int, state: Any) -> None:
        """Starts saving ``state`` as the checkpoint of ``epoch`` (asynchronously), with its fingerprint.

        The previous save is completed first (orbax would wait for it too), so that its failure names its epoch.
        """
        self.wait()
        digests, nonfinite = fingerprint(state)
        if nonfinite:
            raise CheckpointError(
                f"refusing to save a state with NaN/Inf in {', '.join(nonfinite[:3])} as the checkpoint of epoch "
                f"{epoch} in {self.directory}"
            )
        try:
            self._manager.save(
                epoch, args=ocp.args.StandardSave(state), custom_metadata={FINGERPRINT_KEY: digests}, force=True
            )
        except Exception as e:  # orbax reports a failed write as OSError or as a wrapped tensorstore error
            raise self._save_error(epoch, e) from e
        self._pending = epoch

    def check(self) -> None:
        """Raises :class:`~dibjax.errors.WorkdirError` if a save started earlier has failed; does not wait."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise self._save_error(self._pending, e) from e

    def wait(self) -> None:
        """Waits for the save in progress, raising :class:`~dibjax.errors.WorkdirError` if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._pending, e) from e
        self._pending = None

    def close(self) -> None:
        """Waits for the save in progress and releases orbax's threads; errors are raised as in :meth:`wait`."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:
                    raise

    def resume_note(self, before: int | None = None) -> str:
        """What a rerun resumes from: the newest checkpoint (older than epoch ``before``, if given)."""
        kept = [e for e in self.epochs() if before is None or e < before]
        if not kept:
            return "no checkpoint was written yet: a rerun starts over"
        return f"the checkpoint of epoch {kept[-1]} is intact: rerunning the same command resumes from it"

    def _save_error(self, epoch: int | None, error: BaseException) -> WorkdirError:
        self._failed = True
        return WorkdirError(
            f"saving the checkpoint of epoch {epoch} in {self.directory} failed ({failure_reason(error)}); "
            f"{self.resume_note(before=epoch)} once the cause is fixed"
        )

    def restore(self, epoch: int, abstract_state: Any) -> Any:
        """The checkpoint of ``epoch``, verified against its fingerprint.

        Args:
            epoch: a checkpointed epoch (:meth:`epochs`).
            abstract_state: the state's structure, shapes, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves).

        Raises:
            CorruptCheckpointError: when it cannot be read, does not match its fingerprint or holds NaN/Inf.
            CheckpointError: when it holds another layout of state than ``abstract_state`` (another model or
                another version of dibjax wrote it).
        """
        where = self.directory / str(epoch)
        try:
            recorded = self._manager.metadata(epoch).custom_metadata or {}
        except Exception as e:  # a damaged metadata file fails in orbax or in JSON decoding
            raise CorruptCheckpointError(f"checkpoint {where} cannot be read ({_first_line(e)})") from e
        expected = recorded.get(FINGERPRINT_KEY)
        paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]]
        if expected is None or set(expected) != set(paths):
            found = "no fingerprint" if expected is None else f"{len(expected)} arrays"
            raise CheckpointError(
                f"checkpoint {where} holds another layout of training state ({found}; this run's has {len(paths)} "
                "arrays): another model or another version of dibjax wrote it. Use another workdir, or pass "
                "--config.train.overwrite=True to start over"
            )
        try:
            state = self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # damaged array files fail in tensorstore, with messages of its own
            raise CorruptCheckpointError(f"checkpoint {where} cannot be read ({_first_line(e)})") from e
        digests, nonfinite = fingerprint(state)
        changed = [path for path in paths if expected[path] != digests[path]]
        if changed:
            raise CorruptCheckpointError(
                f"checkpoint {where} does not match its fingerprint: {len(changed)} of its {len(paths)} arrays "
                f"differ from what was saved ({', '.join(changed[:3])})"
            )
        if nonfinite:
            raise CorruptCheckpointError(f"checkpoint {where} holds NaN/Inf in {', '.join(nonfinite[:3])}")
        return state

    def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any]:
        """The newest intact checkpoint as ``(epoch, state)``; ``(None, None)`` when there is none at all.

        A damaged checkpoint (:class:`CorruptCheckpointError`) is moved to ``<workdir>/corrupted_checkpoints/``
        with a warning that names it, and the next older one is tried.

        Raises:
            CheckpointError: naming the workdir, when checkpoints exist but none is intact, or when the newest one
                holds another layout of state.
        """
        epochs = self.epochs()
        failures = []
        for epoch in reversed(epochs):
            try:
                return epoch, self.restore(epoch, abstract_state)
            except CorruptCheckpointError as e:
                moved = self._quarantine(epoch)
                failures.append(str(e))
                warnings.warn(f"{e}; moved it to {moved} and trying the previous checkpoint", stacklevel=2)
        if not epochs:
            return None, None
        raise CheckpointError(
            f"no intact checkpoint in {self.workdir}: {'; '.join(failures)}. Delete the workdir (or pass "
            "--config.train.overwrite=True) to start over"
        )

    def _quarantine(self, epoch: int) -> epath.Path:
        # Every process found the same damage (they read the same files); the primary one moves the folder.
        target = self.workdir / QUARANTINE / f"{epoch}-{time.strftime('%Y%m%d-%H%M%S')}"
        if distributed.is_primary():
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(epoch)).rename(target)
        distributed.synchronize(f"checkpoint {epoch} moved aside")
        self._manager.reload()
        return target


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
