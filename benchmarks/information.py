"""The analysis experiments: layer convergence and the DPI under SGD, the information plane of greedy DIB against
end-to-end training, and gradient health in a deep plain network.

    python -m benchmarks.information --data ../shared/data/cifar10
    python -m benchmarks.information --data ../shared/data/cifar10 --only plain

Runs (each a ``dibjax.main`` configuration with ``analysis.enabled``, kept in ``--workdir`` and not rerun once
finished, so the script can be stopped and continued):

* ``sgd``: the ``cpu`` small CNN trained end to end (17 epochs), analysed at every epoch on 512 probe images;
* ``greedy_dib``: the same network trained greedily with DIB (17 epochs per stage), analysed every 4 epochs;
* ``plain_sgd`` / ``plain_greedy``: VGG-16 without BatchNorm (13 convolutional layers and a linear classifier, no
  residuals) at width 16, learning rate 0.01, trained end to end for ``--plain-epochs`` epochs and greedily
  (``greedy_ce``) for as many epochs per stage; only their per-step gradient norms are used.

Prints the convergence epoch of every layer, the data-processing check at every epoch, the analysis cost against
the training time, and the first and last layers' gradient norms; writes the comparison figures to ``--figures``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from dibjax import analysis, cli, config_lib, plots, train
from dibjax.workdir import ANALYSIS_FILE


def configure(name: str, data_dir: str, plain_epochs: int):
    if name in ("sgd", "greedy_dib"):
        config = config_lib.get_config("cifar10", f"cpu,{name}")
        if name == "greedy_dib":
            config.analysis.epochs = tuple(range(0, 4 * 17 + 1, 4))
    else:
        config = config_lib.get_config("cifar10", "cpu,sgd" if name == "plain_sgd" else "cpu,greedy_ce")
        config.model.name = "vgg16"
        config.model.width = 16
        config.model.batchnorm = False
        config.optimizer.learning_rate = 0.01
        config.train.num_epochs = plain_epochs
        config.analysis.epochs = (plain_epochs if name == "plain_sgd" else 13 * plain_epochs,)
        config.analysis.probe_size = 256
    config.data.source = "npz"
    config.data.dir = data_dir
    config.train.progress = False
    config.analysis.enabled = True
    return config


def run(name: str, data_dir: str, workdir: pathlib.Path, plain_epochs: int) -> dict:
    if not (workdir / ANALYSIS_FILE).exists():
        train.train_and_evaluate(configure(name, data_dir, plain_epochs), workdir)
    return json.loads((workdir / ANALYSIS_FILE).read_text())


def gradient_summary(records: list[dict], unit: int) -> tuple[float, float]:
    """Median gradient norm of a unit over the first and over the last epoch that trained it."""
    epochs = [np.asarray(r["norms"])[:, unit] for r in records]
    trained = [e for e in epochs if np.any(e > 0)]
    return float(np.median(trained[0])), float(np.median(trained[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 npz folder")
    parser.add_argument("--workdir", default="runs/information")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--plain-epochs", type=int, default=4)
    parser.add_argument("--only", nargs="+", choices=("sgd", "greedy", "plain"), default=("sgd", "greedy", "plain"))
    args = parser.parse_args()
    root, figures = pathlib.Path(args.workdir), pathlib.Path(args.figures)

    results = {}
    names = {"sgd": ["sgd"], "greedy": ["sgd", "greedy_dib"], "plain": ["plain_sgd", "plain_greedy"]}
    for group in args.only:
        for name in names[group]:
            if name not in results:
                results[name] = run(name, args.data, root / name, args.plain_epochs)

    if "sgd" in results:
        result = results["sgd"]
        print("\nEnd-to-end SGD, small CNN, CIFAR-10: convergence epoch of every layer")
        print("| measure | " + " | ".join(result["layers"]) + " |")
        print("|---|" + "---:|" * len(result["layers"]))
        for measure, epochs in result["convergence_epoch"].items():
            print(f"| {measure} (≥ {result['threshold']}) | " + " | ".join(str(e) for e in epochs) + " |")
        print("\nData-processing inequality along X → T1 → … → TL (and I(T;Y) non-increasing), per epoch")
        print("| epoch | inequalities holding | largest excess (bits) | broken |")
        print("|---:|---:|---:|---|")
        for epoch, check in zip(result["epochs"], result["dpi"], strict=True):
            broken = "; ".join(f"{v['inequality']} (+{v['excess']:.3f})" for v in check["violations"][:3])
            held = check["checked"] - len(check["violations"])
            print(f"| {epoch} | {held}/{check['checked']} | {check['largest_excess']:.4f} | {broken} |")
        seconds = result["seconds"]
        print(
            f"\nAnalysis cost: {seconds['steady_per_epoch']:.2f} s per analysed epoch against "
            f"{seconds['training_per_epoch']:.1f} s of training per epoch "
            f"({100 * seconds['analysis_over_training']:.1f}%); compilation {seconds['per_epoch'][0]:.1f} s once"
        )
        plots.convergence(result, figures / "sgd_convergence.png")
        plots.mi_matrices(result, figures / "sgd_mi_matrices.png")
    if "greedy_dib" in results:
        plots.information_planes(
            {"end to end (sgd)": results["sgd"], "greedy DIB": results["greedy_dib"]},
            figures / "information_planes.png",
        )
    if "plain_sgd" in results:
        runs = {}
        print("\nVGG-16 without BatchNorm: median gradient norm over the first / last epoch that trained the layer")
        print("| training | first layer, first epoch | first layer, last | last layer, first | last layer, last |")
        print("|---|---:|---:|---:|---:|")
        for name, label in (("plain_sgd", "end to end"), ("plain_greedy", "greedy (CE)")):
            records = analysis.read_gradient_norms(root / name)
            layers = results[name]["layers"]
            runs[label] = (records, layers)
            first, last = gradient_summary(records, 0), gradient_summary(records, len(layers) - 1)
            print(f"| {label} | {first[0]:.3g} | {first[1]:.3g} | {last[0]:.3g} | {last[1]:.3g} |")
        plots.gradient_norms_comparison(runs, figures / "plain_vgg16_gradient_norms.png")
    print(f"\nfigures in {figures}/")


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
