"""What InfoPro's decoder costs on CPU with each convolution: patches × kernel against XLA's native one.

    python -m benchmarks.decoder_speed                 # the stage outputs of the cpu small CNN and of ResNet-32

The decoder (``dibjax.models.layers.Decoder``) upsamples a stage's output to the image size and convolves it to 12
channels, then to 3. For each stage shape (batch × size × size × channels) the table gives the time of one
forward and backward pass (gradients of the parameters and of the input) with the convolutions as patches ×
kernel (dibjax's CPU form for the network's own layers) and with XLA's native convolution (what the decoder
uses); the two alternate in rounds and the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dibjax import cli
from dibjax.models import layers

# (channels, size) of stage outputs a decoder reads: the cpu small CNN's first three stages, then ResNet-32's groups.
SHAPES = ((32, 32), (64, 16), (128, 8), (16, 32), (32, 16), (64, 8))


def patches_forward(decoder: layers.Decoder, t: jax.Array) -> jax.Array:
    """``decoder(t)`` with the convolution form of the network's own layers (patches × kernel on CPU)."""
    rows = jnp.asarray(layers.bilinear_matrix(t.shape[1], decoder.image_size), t.dtype)
    cols = jnp.asarray(layers.bilinear_matrix(t.shape[2], decoder.image_size), t.dtype)
    y = decoder.conv1(jnp.einsum("oh,nhwc,pw->nopc", rows, t, cols))
    y = decoder.bn(y) if decoder.bn is not None else y
    return nnx.sigmoid(decoder.conv2(nnx.relu(y)))


def decoder_gradient(channels: int, native: bool):
    decoder = layers.Decoder(channels, 32, rngs=nnx.Rngs(0))
    graph, state = nnx.split(decoder)

    def loss(state, t):
        module = nnx.merge(graph, state)
        out = module(t) if native else patches_forward(module, t)
        return jnp.mean(jnp.square(out - 0.5))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch}; forward + backward in ms")
    print()
    print("| stage output | patches × kernel | native | native / patches |")
    print("|---|---:|---:|---:|")
    for channels, size in SHAPES:
        t = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, size, size, channels)), jnp.float32)
        steps = {native: decoder_gradient(channels, native) for native in (False, True)}
        times = {native: [] for native in steps}
        for step, state in steps.values():
            jax.block_until_ready(step(state, t))
        for _ in range(args.rounds):
            for native, (step, state) in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(step(state, t))
                times[native].append(time.perf_counter() - start)
        patches, native = (1e3 * statistics.median(times[k]) for k in (False, True))
        print(f"| {size}×{size}×{channels} | {patches:.0f} | {native:.0f} | {native / patches:.2f} |")


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
