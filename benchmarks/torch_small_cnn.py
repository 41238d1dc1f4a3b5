"""PyTorch reference for ``python -m benchmarks.cpu_speed``: the `cpu` small CNN trained on random data.

Run it with a Python that has PyTorch installed (PyTorch is never a dependency of dibjax):

    python benchmarks/torch_small_cnn.py --steps 10 --rounds 3

The network is dibjax's `cpu` small CNN (conv 3×3 → BatchNorm → ReLU → max-pool 2×2 with 32/64/128/256 channels,
then a linear layer), in channels-last memory format, trained with SGD (Nesterov momentum 0.9, weight decay 5e-4)
on one batch of random images, with two threads. Prints one line with the median images per second.
"""

import argparse
import statistics
import time

import torch
from torch import nn


def unit(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = nn.Sequential(*unit(3, 32), *unit(32, 64), *unit(64, 128), *unit(128, 256), nn.Flatten(), nn.Linear(1024, 10))
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()

    for _ in range(3):
        step()
    rates = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    print(f"torch {torch.__version__} small_cnn: {statistics.median(rates):.0f} img/s")


if __name__ == "__main__":
    main()
