"""Command-line entry point: parses the flags and calls :func:`dibjax.train.train_and_evaluate`.

    python -m dibjax.main --config=configs/cifar10.py:cpu,sgd --workdir=runs/c10 \
        --config.data.source=npz --config.data.dir=../shared/data/cifar10

A mistake in the configuration, the data or the workdir ends with a one-line message and exit status 1;
``--traceback`` shows the traceback too (:mod:`dibjax.cli`).
"""

from absl import app, flags
from ml_collections import config_flags

from dibjax import cli, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':variant'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and the summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
