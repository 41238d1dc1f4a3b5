"""Analyse a run's checkpoints: ``python -m dibjax.analysis --workdir=DIR``.

Reads the run's ``config.json``, loads its training data (``--data_dir`` if the data moved), and runs
:func:`dibjax.analysis.analyze_workdir`, writing ``DIR/analysis.json`` and the figures in ``DIR/figures``. A run
trained with ``--config.analysis.enabled=True`` keeps the initial state and every analysed epoch; any other run
keeps its last two checkpoints, which can be analysed only when named with ``--epochs``.

    python -m dibjax.analysis --workdir=runs/c10 --epochs=0,1,5,17 --probe_size=256
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from dibjax import analysis, cli
from dibjax.workdir import ANALYSIS_FILE, GRADIENT_FILE

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of a run (config.json and checkpoints/).")
_EPOCHS = flags.DEFINE_list("epochs", [], "Epochs to analyse (0: the initialisation); every checkpoint if empty.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data folder, if not the one the run was trained from.")
_PROBE_SIZE = flags.DEFINE_integer("probe_size", None, "Probe images (default: the run's analysis.probe_size).")
_ALPHA = flags.DEFINE_float("alpha", None, "Rényi order α (default: the run's analysis.alpha).")
_WIDTH = flags.DEFINE_string("width", None, "Kernel-width rule (default: the run's analysis.width).")
_FIGURES = flags.DEFINE_boolean("figures", True, "Write the figures to WORKDIR/figures.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        epochs = [int(e) for e in _EPOCHS.value]
    except ValueError:
        raise app.UsageError(f"--epochs must be a comma-separated list of integers, got {_EPOCHS.value}") from None
    workdir = pathlib.Path(_WORKDIR.value)
    result = analysis.analyze_workdir(
        workdir,
        epochs=epochs or None,
        data_dir=_DATA_DIR.value,
        figures=_FIGURES.value,
        probe_size=_PROBE_SIZE.value,
        alpha=_ALPHA.value,
        width=_WIDTH.value,
    )

    print(f"analysed epochs {result['epochs']} of {workdir} on {result['probe_size']} probe images")
    if result["convergence_epoch"] is None:
        print(
            f"convergence epochs: not determined (the analysed epochs start at {result['epochs'][0]}, "
            "not at the initialisation, epoch 0)"
        )
    else:
        for name, epochs_ in result["convergence_epoch"].items():
            per_layer = dict(zip(result["layers"], epochs_, strict=True))
            print(f"convergence epoch per layer ({name}, similarity ≥ {result['threshold']}): {per_layer}")
    final_dpi = result["dpi"][-1]
    print(
        f"data-processing inequality at the last epoch: {final_dpi['checked'] - len(final_dpi['violations'])}"
        f"/{final_dpi['checked']} hold (largest excess {final_dpi['largest_excess']:.4f} bits)"
    )
    if not (workdir / GRADIENT_FILE).exists():
        print("per-step gradient norms: none recorded (the run was trained without --config.analysis.enabled=True)")
    seconds = result["seconds"]
    print(f"analysis: {seconds['steady_per_epoch']:.2f} s per epoch; written to {workdir / ANALYSIS_FILE}")


if __name__ == "__main__":
    cli.run(main)
