"""The folder of a run: its configuration guard and the files the loop writes.

Files (every epoch count starts at 1; checkpoint and record ``e`` describe the state after ``e`` epochs):

* ``config.json``: the run's configuration. A later invocation in the same folder must match it, apart from the
  fields in :data:`RESUMABLE_FIELDS` and the ``analysis`` section, which do not change what is trained;
  ``config.train.overwrite=True`` starts over instead.
* ``metrics.jsonl``: one JSON record per epoch and evaluated stage (:func:`dibjax.train.epoch_records` documents
  every field).
* ``checkpoints/``: :mod:`dibjax.checkpoints`.
* ``summary.json``: written once the run is complete; its presence marks a finished run.
* with ``config.analysis.enabled``: ``gradient_norms.jsonl``, ``analysis.json`` and ``figures/``
  (:mod:`dibjax.analysis`).

Every write that fails (permissions, a full disk) raises :class:`~dibjax.errors.WorkdirError` naming the file.
Paths go through ``etils.epath``, so a workdir may be a local folder or a cloud bucket path such as
``gs://bucket/run`` (reading and writing buckets needs ``gcsfs``). With several processes only the primary one
(:func:`dibjax.distributed.is_primary`) writes; the others read.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections
from etils import epath

from dibjax import distributed
from dibjax.checkpoints import QUARANTINE, failure_reason
from dibjax.errors import WorkdirError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
GRADIENT_FILE = "gradient_norms.jsonl"
ANALYSIS_FILE = "analysis.json"
# Fields that do not change what a run computes, so that resuming may differ in them.
RESUMABLE_FIELDS = {
    ("train", "overwrite"),
    ("train", "progress"),
    ("train", "log_every_steps"),
    ("train", "eval_every_epochs"),
}
# Fields added after runs were first saved, each with the value that computes what runs saved before it computed:
# a saved config lacking one of them is read with this value, so that such runs can still be resumed.
ADDED_FIELDS = {
    ("data", "label_noise"): 0.0,
    ("objective", "dib", "beta_growth"): 1.0,
}
# What belongs to a run's results, removed when a run of another configuration starts over in the folder.
_RUN_FILES = ("checkpoints", QUARANTINE, METRICS_FILE, SUMMARY_FILE, GRADIENT_FILE, ANALYSIS_FILE, "figures")


def _flat(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: local paths made absolute (``~`` expanded), bucket paths (``gs://``) as given."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_text(path: epath.Path, text: str, *, append: bool = False) -> None:
    """Writes (or appends) ``text`` to ``path``; a failure raises :class:`WorkdirError` naming the file.

    Written to a temporary file and renamed, so that a failed write leaves the old file whole. Appending rewrites
    the file the same way (bucket storage cannot append; a run's record files stay small).
    """
    try:
        if append and path.exists():
            text = path.read_text() + text
        partial = path.parent / (path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    except OSError as e:
        raise WorkdirError(f"cannot write {path}: {failure_reason(e)}") from e


class Workdir:
    """A run's folder. Nothing is written until :meth:`claim`."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)

    def file(self, name: str) -> epath.Path:
        return self.path / name

    def config_differences(self, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
        """``{field: (saved, current)}`` for every field that differs from the folder's ``config.json`` (or {})."""
        saved_path = self.file(CONFIG_FILE)
        if not saved_path.exists():
            return {}
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, ValueError) as e:
            raise WorkdirError(f"cannot read {saved_path} ({e}); delete it or use another workdir") from e
        saved_flat, current_flat = _flat(saved), _flat(json.loads(config.to_json()))
        for field, value in ADDED_FIELDS.items():
            saved_flat.setdefault(field, value)
        return {
            ".".join(k): (saved_flat.get(k), current_flat.get(k))
            for k in sorted(set(saved_flat) | set(current_flat))
            if k not in RESUMABLE_FIELDS and k[0] != "analysis" and saved_flat.get(k) != current_flat.get(k)
        }

    def check(self, config: ml_collections.ConfigDict) -> None:
        """Refuses a folder holding a run of another configuration, unless ``train.overwrite``, and a path that
        orbax cannot checkpoint into; writes nothing."""
        # orbax merges each checkpoint's per-process OCDBT files by globbing the checkpoint's full path, so a
        # "[...]" in the path is read as a character class: nothing is merged, and every checkpoint saved there
        # is unreadable although its save reports success.
        if re.search(r"\[[^]]*\]", os.fspath(self.path)):
            raise WorkdirError(
                f"workdir {self.path}: a path holding '[...]' is read as a glob pattern by orbax, which then saves "
                "checkpoints that cannot be restored; use a path without square brackets"
            )
        differences = self.config_differences(config)
        if differences and not config.train.overwrite:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items())
            raise WorkdirError(
                f"workdir {self.path} holds a run with another configuration ({shown}); "
                "use another workdir, or pass --config.train.overwrite=True to start over"
            )

    def claim(self, config: ml_collections.ConfigDict) -> None:
        """Creates the folder, removes another configuration's results (``train.overwrite``), writes config.json.

        Only the primary process writes; call :func:`dibjax.distributed.synchronize` around it with several.
        """
        self.check(config)
        if not distributed.is_primary():
            return
        if self.config_differences(config):
            for name in _RUN_FILES:
                path = self.file(name)
                if path.is_dir():
                    path.rmtree()
                elif path.exists():
                    path.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"cannot create the workdir {self.path}: {failure_reason(e)}") from e
        if "://" not in os.fspath(self.path) and not os.access(self.path, os.W_OK):
            raise WorkdirError(f"the workdir {self.path} is not writable: {os.strerror(13)}")
        write_text(self.file(CONFIG_FILE), json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True))

    def finished_summary(self, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
        """The summary of a finished run of this configuration in the folder, or None."""
        path = self.file(SUMMARY_FILE)
        if not path.exists() or self.config_differences(config):
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # an unreadable summary is written again by finishing the run

    def read_records(self, name: str, before_epoch: int) -> list[dict]:
        """The JSON-lines records of ``name`` up to epoch ``before_epoch - 1``; the file keeps only those."""
        path = self.file(name)
        if not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r["epoch"] < before_epoch]
        if len(kept) != len(records) and distributed.is_primary():
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append_records(self, name: str, records: list[dict]) -> None:
        if distributed.is_primary():
            write_text(self.file(name), "".join(json.dumps(r) + "\n" for r in records), append=True)

    def write_summary(self, summary: dict[str, Any]) -> epath.Path:
        path = self.file(SUMMARY_FILE)
        if distributed.is_primary():
            write_text(path, json.dumps(summary, indent=2))
        return path
