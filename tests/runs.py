"""Helpers for tests that train: the smoke configuration on the ``tiny_data`` fixture's data set."""

import pathlib
import sys

from dibjax import config_lib, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dibjax.main"]


def smoke_args(data_dir, workdir, *extra, eval_batch_size=16):
    """Command-line arguments of ``configs/cifar10.py:smoke,sgd`` on the tiny npz data set, then ``extra``."""
    return [
        "--config=configs/cifar10.py:smoke,sgd",
        f"--workdir={workdir}",
        "--config.data.source=npz",
        f"--config.data.dir={data_dir}",
        "--config.data.image_size=16",
        "--config.train.batch_size=16",
        f"--config.train.eval_batch_size={eval_batch_size}",
        *extra,
    ]


def smoke_config(data_dir, method="sgd", **overrides):
    """``configs/cifar10.py:smoke,<method>`` on the tiny npz data set, with ``{"a.b": value}`` overrides."""
    config = config_lib.get_config("cifar10", f"smoke,{method}")
    config.data.source = "npz"
    config.data.dir = str(data_dir)
    config.data.image_size = 16
    config.train.batch_size = 16
    config.train.eval_batch_size = 16
    config.train.progress = False
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def stop_at_evaluation(monkeypatch, call, action=None):
    """Makes the ``call``-th evaluation of the next runs do ``action`` (default: raise KeyboardInterrupt)."""
    calls = {"n": 0}
    real_evaluate = trainer.Trainer.evaluate

    def evaluate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            if action is None:
                raise KeyboardInterrupt
            action()
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate)
    return lambda: monkeypatch.setattr(trainer.Trainer, "evaluate", real_evaluate)
