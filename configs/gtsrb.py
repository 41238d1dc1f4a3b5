"""Runs on gtsrb: the argument picks a size and a method (e.g. `:cpu,sgd`); see dibjax.config_lib."""

from dibjax import config_lib


def get_config(arg: str | None = None):
    return config_lib.get_config("gtsrb", arg)
