"""Analyse a run's checkpoints: ``python -m dibjax.analyze --workdir=DIR``.

Reads the run's ``config.json``, loads its training data (``--data_dir`` if the data moved), and runs
:func:`dibjax.analysis.analyze_run` on every checkpoint in ``DIR/checkpoints`` (or on ``--epochs``), writing
``DIR/analysis.json`` and the figures in ``DIR/figures``. A run trained with ``--config.analysis.enabled=True``
keeps the checkpoint of every analysed epoch; any other run keeps its last two.

    python -m dibjax.analyze --workdir=runs/c10 --epochs=0,1,5,17 --probe_size=256
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging

from dibjax import analysis, data, train

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of a run (config.json and checkpoints/).")
_EPOCHS = flags.DEFINE_list("epochs", [], "Epochs to analyse (0: the initialisation); every checkpoint if empty.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data folder, if not the one the run was trained from.")
_PROBE_SIZE = flags.DEFINE_integer("probe_size", None, "Probe images (default: the run's analysis.probe_size).")
_ALPHA = flags.DEFINE_float("alpha", None, "Rényi order α (default: the run's analysis.alpha).")
_WIDTH = flags.DEFINE_string("width", None, "Kernel-width rule (default: the run's analysis.width).")
_FIGURES = flags.DEFINE_boolean("figures", True, "Write the figures to WORKDIR/figures.")
flags.mark_flags_as_required(["workdir"])


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The configuration a run was trained with, with every analysis field present."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the workdir must be the folder of a dibjax run")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config.analysis = ml_collections.ConfigDict({**analysis.default_options(), **config.get("analysis", {})})
    return config


def analyze_workdir(
    workdir: str | pathlib.Path,
    *,
    epochs: Sequence[int] | None = None,
    data_dir: str | None = None,
    figures: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Analyses a finished (or interrupted) run from its folder alone: config, data, checkpoints.

    ``options`` override the run's ``config.analysis`` fields (``probe_size``, ``alpha``, ``width``, ``threshold``,
    ...); ``data_dir`` replaces ``config.data.dir`` when the data moved. Returns the result written to
    ``analysis.json`` (see :func:`dibjax.analysis.analyze_run`).
    """
    config = load_run_config(workdir)
    unknown = sorted(set(options) - set(analysis.default_options()))
    if unknown:
        raise ValueError(f"unknown analysis option(s) {unknown}; accepted: {sorted(analysis.default_options())}")
    config.analysis.update({name: value for name, value in options.items() if value is not None})
    analysis.check_options(config.analysis.to_dict())
    if data_dir:
        config.data.dir = data_dir
    train_ds, _, info = data.load(config.data)
    trainer = train.Trainer(config, info, data.steps_per_epoch(len(train_ds), config.train.batch_size))
    return analysis.analyze_run(workdir, trainer, train_ds, epochs=epochs, figures=figures)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        epochs = [int(e) for e in _EPOCHS.value]
    except ValueError:
        raise app.UsageError(f"--epochs must be a comma-separated list of integers, got {_EPOCHS.value}") from None
    workdir = pathlib.Path(_WORKDIR.value)
    result = analyze_workdir(
        workdir,
        epochs=epochs or None,
        data_dir=_DATA_DIR.value,
        figures=_FIGURES.value,
        probe_size=_PROBE_SIZE.value,
        alpha=_ALPHA.value,
        width=_WIDTH.value,
    )

    print(f"analysed epochs {result['epochs']} of {workdir} on {result['probe_size']} probe images")
    for name, epochs_ in result["convergence_epoch"].items():
        per_layer = dict(zip(result["layers"], epochs_, strict=True))
        print(f"convergence epoch per layer ({name}, similarity ≥ {result['threshold']}): {per_layer}")
    final_dpi = result["dpi"][-1]
    print(
        f"data-processing inequality at the last epoch: {final_dpi['checked'] - len(final_dpi['violations'])}"
        f"/{final_dpi['checked']} hold (largest excess {final_dpi['largest_excess']:.4f} bits)"
    )
    seconds = result["seconds"]
    print(f"analysis: {seconds['steady_per_epoch']:.2f} s per epoch; written to {workdir / analysis.ANALYSIS_FILE}")


if __name__ == "__main__":
    app.run(main)
