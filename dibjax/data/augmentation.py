"""On-device augmentation and normalisation: pure JAX, run inside the jitted step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dibjax import errors
from dibjax.data.dataset import DatasetInfo

__all__ = ["augment", "normalize"]


def augment(images: jax.Array, key: jax.Array, *, crop_padding: int = 4, flip: bool = True) -> jax.Array:
    """Random crop with zero padding and, if ``flip``, random horizontal flip, per image.

    Each image is padded by ``crop_padding`` zero pixels on every side and an ``H×W``
    window is cut at an offset drawn uniformly from ``[0, 2 crop_padding]`` in each axis;
    then, if ``flip``, mirrored left-right with probability 1/2. Pass uint8 images (before
    :func:`normalize`) so the padding is black. Jit-able; ``crop_padding`` and ``flip``
    are static.

    Args:
        images: ``(B, H, W, C)``, any dtype (kept).
        key: a JAX PRNG key; the same key gives the same result.
        crop_padding: padding in pixels; 0 disables the crop.
        flip: whether to flip; False for data whose label a mirror changes (traffic signs).

    Returns:
        An array of the same shape and dtype as ``images``.

    Raises:
        errors.ConfigError: when ``crop_padding`` is negative.
        errors.DataError: when ``images`` is not of rank 4.
    """
    if crop_padding < 0:
        raise errors.ConfigError(f"crop_padding must be non-negative, got {crop_padding}")
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise errors.DataError(f"images must have shape (B, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1, dtype=jnp.int32)
        zero = jnp.zeros((), jnp.int32)

        def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], zero), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def normalize(images: jax.Array, info: DatasetInfo) -> jax.Array:
    """Maps uint8 images to float32 ``(x / 255 - mean) / std`` with ``info``'s per-channel constants."""
    mean = jnp.asarray(info.mean, dtype=jnp.float32)
    std = jnp.asarray(info.std, dtype=jnp.float32)
    return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std
