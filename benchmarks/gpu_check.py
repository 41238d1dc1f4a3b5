"""A short accelerator check: VGG-11 and ResNet-18 trained with ``sgd`` and ``greedy_dib`` on a CIFAR-10 subset.

    python -m benchmarks.gpu_check --make-subset ../shared/data/cifar10 --out data-subset/cifar10   # on the host
    python -m benchmarks.gpu_check --data data-subset/cifar10                                       # on the device

The first command writes a class-balanced subset (``--train`` and ``--test`` images, default 8,000 and 2,000) in
the npz layout, small enough to travel with a working tree. The second trains each of ``--models`` with the
full-size recipe (``full``, warm-up included) end to end for ``--epochs`` epochs and greedily for
``--stage-epochs`` epochs per stage, and prints for each: the test accuracy after every epoch (after every stage
for ``greedy_dib``), training images/s (the mean over epochs after the first, which includes compilation), wall
time, the compiled peak memory of the training step and the device's own peak from
``jax.devices()[0].memory_stats()`` where it reports one. Then, per model, ``benchmarks.objective_cost`` times a
``dib`` stage step against a ``ce`` step of the same stage (stages 1, 4 and 8). ``--width`` narrows the networks
for a dry run on CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np

from dibjax import cli, config_lib, train


def make_subset(source: str, out: str, train_size: int, test_size: int) -> None:
    out_path = pathlib.Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("test", test_size)):
        with np.load(pathlib.Path(source) / f"{split}.npz") as npz:
            images, labels = npz["image"], npz["label"]
        rng = np.random.default_rng(0)
        per_class = size // 10
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
        np.savez(out_path / f"{split}.npz", image=images[np.sort(keep)], label=labels[np.sort(keep)])
        print(f"{out_path / split}.npz: {len(keep)} images")


WIDTHS = {"vgg11": 64, "resnet18": 64}


def run(model: str, width: int, method: str, data_dir: str, epochs: int, workdir: pathlib.Path) -> dict:
    config = config_lib.get_config("cifar10", f"full,{method}")
    config.model.name = model
    config.model.width = width
    config.data.source = "npz"
    config.data.dir = data_dir
    config.train.num_epochs = epochs
    config.train.progress = False
    summary = train.train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_second"] for r in records if r["phase_epoch"] > 1] or [records[-1]["images_per_second"]]
    stats = jax.devices()[0].memory_stats() or {}
    by_stage = {r["stage"]: r for r in records}  # greedy: the last record of each stage
    curve = (
        [r["test_accuracy"] for r in records] if method == "sgd" else [r["test_accuracy"] for r in by_stage.values()]
    )
    return {
        "model": model,
        "method": method,
        "accuracy_curve": curve,
        "test_accuracy": summary["test_accuracy"],
        "images_per_second": float(np.mean(speeds)),
        "wall_seconds": summary["wall_seconds"],
        "compiled_step_bytes": summary["train_step_peak_bytes"],
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-subset", metavar="SOURCE", help="npz folder to take the subset from")
    parser.add_argument("--out", default="data-subset/cifar10")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--data", help="npz folder to train on")
    parser.add_argument("--models", default="vgg11,resnet18")
    parser.add_argument("--width", type=int, help="narrow every network to this width (a dry run on CPU)")
    parser.add_argument("--model", help="with --method: the network (used internally)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the sgd run")
    parser.add_argument("--stage-epochs", type=int, default=2, help="epochs of every greedy stage")
    parser.add_argument("--method", help="run this method alone and print its JSON line (used internally)")
    parser.add_argument("--workdir", help="with --method: the run's folder")
    args = parser.parse_args()
    if args.make_subset:
        make_subset(args.make_subset, args.out, args.train, args.test)
        return
    if not args.data:
        parser.error("give --data (or --make-subset)")

    if args.method:
        epochs = args.epochs if args.method == "sgd" else args.stage_epochs
        width = args.width or WIDTHS[args.model]
        print(json.dumps(run(args.model, width, args.method, args.data, epochs, pathlib.Path(args.workdir))))
        return

    print(f"JAX {jax.__version__}, {jax.device_count()} × {jax.devices()[0].device_kind}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # One process per method: the device's peak-memory counter cannot be reset within a process.
        for model in args.models.split(","):
            for method in ("sgd", "greedy_dib"):
                command = [sys.executable, "-m", "benchmarks.gpu_check", "--data", args.data, "--model", model]
                command += ["--method", method, "--workdir", f"{tmp}/{model}-{method}"]
                command += ["--epochs", str(args.epochs), "--stage-epochs", str(args.stage_epochs)]
                command += ["--width", str(args.width)] if args.width else []
                out = subprocess.run(command, capture_output=True, text=True, check=False)
                if out.returncode:
                    sys.exit(f"{model} {method} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| model | method | test accuracy | per epoch (stage) | images/s | wall (s) | compiled step (MiB) | "
        "device peak (MiB) |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        device_peak = f"{r['device_peak_bytes'] / 2**20:.0f}" if r["device_peak_bytes"] else "—"
        curve = " ".join(f"{100 * a:.1f}" for a in r["accuracy_curve"])
        print(
            f"| {r['model']} | {r['method']} | {100 * r['test_accuracy']:.2f}% | {curve} | "
            f"{r['images_per_second']:.0f} | {r['wall_seconds']:.0f} | {r['compiled_step_bytes'] / 2**20:.0f} | "
            f"{device_peak} |",
            flush=True,
        )
    for model in args.models.split(","):
        width = args.width or WIDTHS[model]
        command = [sys.executable, "-m", "benchmarks.objective_cost", "--model", model, "--width", str(width)]
        command += ["--stages", "0", "3", "7"]  # the first, a middle and the last of the 8 stages
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        print(f"\n{model}: a dib stage step against a ce step of the same stage\n", flush=True)
        print(out.stdout if not out.returncode else f"failed:\n{out.stderr[-3000:]}", flush=True)


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
