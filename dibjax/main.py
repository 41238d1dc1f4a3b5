"""Command-line entry point.

    python -m dibjax.main --config=configs/cifar10.py:cpu,sgd --workdir=runs/c10 \
        --config.data.source=npz --config.data.dir=../shared/data/cifar10
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dibjax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':variant'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and the summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax reports every checkpoint step at INFO level; the progress bar and epoch lines suffice.
    logging.set_verbosity(logging.WARNING)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
