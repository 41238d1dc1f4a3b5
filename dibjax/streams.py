"""Every random stream of a run, derived from its one seed.

``config.seed`` gives the root key ``jax.random.key(seed)`` and the NumPy entropy ``seed``; each use of
randomness folds in a tag of its own, so that no two uses share a stream, and neither do two seeds (seed ``s``'s
augmentation is not seed ``s + 1``'s initialisation):

* :func:`init_key`: parameter initialisation (the model's ``nnx.Rngs``);
* :func:`augment_key`: on-device augmentation; the training step folds in the global step;
* :func:`order_rng`: the order of the training images in an epoch, a NumPy generator on the host;
* :func:`probe_rng`: the probe images of the analysis.

Seed-independent draws are fixed on purpose and live elsewhere: the held-out validation split and the
``train_limit``/``test_limit`` subsets use seed 0, so that every run sees the same images.
"""

from __future__ import annotations

import jax
import numpy as np

# Tags: fixed forever, since changing one changes every run's results.
_INIT, _AUGMENT, _ORDER, _PROBE = 1, 2, 3, 4


def _root(seed: int) -> jax.Array:
    return jax.random.key(seed)


def init_key(seed: int) -> jax.Array:
    """The key of the model's parameter initialisation."""
    return jax.random.fold_in(_root(seed), _INIT)


def augment_key(seed: int) -> jax.Array:
    """The key of the augmentation stream (the training step folds in its global step)."""
    return jax.random.fold_in(_root(seed), _AUGMENT)


def order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch ``epoch``'s training order (epochs count from 1)."""
    return np.random.default_rng([_ORDER, seed, epoch])


def probe_rng(seed: int) -> np.random.Generator:
    """The generator of the analysis's probe images."""
    return np.random.default_rng([_PROBE, seed])
