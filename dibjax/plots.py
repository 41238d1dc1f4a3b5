"""Figures of the analysis (:mod:`dibjax.analysis`): information plane, MI matrices, convergence, gradient norms.

Each ``*_axes`` function draws on a given Matplotlib axes, so figures can be combined (for example a greedy run's
information plane next to an end-to-end run's); each other function writes one PNG and returns its path. Figures are
built with Matplotlib's object API (``matplotlib.figure.Figure``), without pyplot's global state or a display.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

FIGURES_DIR = "figures"


def _layer_colors(num_layers: int) -> list:
    cmap = colormaps["viridis"]
    return [cmap(0.9 * k / max(num_layers - 1, 1)) for k in range(num_layers)]


def _save(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def information_plane_axes(ax, result: Mapping, title: str | None = None) -> None:
    """Trajectories ``(I(X;T_k), I(T_k;Y))`` over the analysed epochs, one colour per layer, light to dark in time."""
    ixt, ity = np.asarray(result["I_XT"]), np.asarray(result["I_TY"])
    epochs = result["epochs"]
    for k, (name, color) in enumerate(zip(result["layers"], _layer_colors(ixt.shape[1]), strict=True)):
        ax.plot(ixt[:, k], ity[:, k], "-", color=color, alpha=0.5, lw=1)
        sizes, alphas = np.linspace(6, 36, len(epochs)), np.linspace(0.3, 1, len(epochs))
        ax.scatter(ixt[:, k], ity[:, k], c=[color], s=sizes, alpha=alphas)
        ax.annotate(f"{name}", (ixt[-1, k], ity[-1, k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.annotate(f"e{epochs[0]}", (ixt[0, k], ity[0, k]), fontsize=6, color="gray")
    ax.set_xlabel("I(X; T) [bits]")
    ax.set_ylabel("I(T; Y) [bits]")
    ax.set_title(title or f"information plane, epochs {epochs[0]}–{epochs[-1]}")
    ax.grid(alpha=0.3)


def information_plane(result: Mapping, path: str | pathlib.Path, title: str | None = None) -> pathlib.Path:
    fig = Figure(figsize=(5.5, 4.5))
    information_plane_axes(fig.add_subplot(), result, title)
    return _save(fig, path)


def information_planes(results: Mapping[str, Mapping], path: str | pathlib.Path) -> pathlib.Path:
    """Several runs' information planes side by side, on shared axes (e.g. greedy DIB next to end-to-end)."""
    fig = Figure(figsize=(5 * len(results), 4.3))
    axes = fig.subplots(1, len(results), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (label, result) in zip(axes, results.items(), strict=True):
        information_plane_axes(ax, result, label)
    return _save(fig, path)


def mi_matrices(result: Mapping, path: str | pathlib.Path, epochs: Sequence[int] = ()) -> pathlib.Path:
    """Heatmaps of the mutual-information matrix over (X, T_1, ..., T_L, Y) at ``epochs`` (default: first, middle,
    last analysed), on one colour scale."""
    available = result["epochs"]
    if not epochs:
        epochs = sorted({available[0], available[len(available) // 2], available[-1]})
    missing = [e for e in epochs if e not in available]
    if missing:
        raise ValueError(f"no analysis for epochs {missing}; analysed epochs: {available}")
    matrices = [np.asarray(result["mi_matrices"][available.index(e)]) for e in epochs]
    names = ["X", *result["layers"], "Y"]
    vmax = max(float(m.max()) for m in matrices)
    fig = Figure(figsize=(4.2 * len(epochs) + 0.8, 4))
    axes = fig.subplots(1, len(epochs), squeeze=False)[0]
    for ax, epoch, matrix in zip(axes, epochs, matrices, strict=True):
        image = ax.imshow(matrix, vmin=0, vmax=vmax, cmap="magma")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        # Row names only on the first panel: the panels share them, and repeated labels run into the neighbour.
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [], fontsize=7)
        ax.set_title(f"I_α between layers, epoch {epoch}", fontsize=9)
    fig.colorbar(image, ax=list(axes), label="bits", shrink=0.8)
    return _save(fig, path)


def convergence(result: Mapping, path: str | pathlib.Path) -> pathlib.Path:
    """Similarity of every layer to its final representation over epochs, and the convergence epoch per layer."""
    epochs, layers = result["epochs"], result["layers"]
    nmi, cka = np.asarray(result["normalized_mi_to_final"]), np.asarray(result["cka_to_final"])
    colors = _layer_colors(len(layers))
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for k, (name, color) in enumerate(zip(layers, colors, strict=True)):
        left.plot(epochs, nmi[:, k], "-", color=color, label=f"{name} (nI_α)")
        left.plot(epochs, cka[:, k], "--", color=color, label=f"{name} (CKA)")
    left.axhline(result["threshold"], color="gray", lw=0.8, ls=":")
    left.set_xlabel("epoch")
    left.set_ylabel("similarity to the final representation")
    left.legend(fontsize=6, ncol=2)
    left.grid(alpha=0.3)
    x = np.arange(len(layers))
    measures = (("normalized_mi", "normalised I_α"), ("cka", "linear CKA"))
    for offset, (name, label) in zip((-0.2, 0.2), measures, strict=True):
        epochs_reached = result["convergence_epoch"][name]
        bars = right.bar(x + offset, [np.nan if e is None else e for e in epochs_reached], width=0.4, label=label)
        # Written out, so that a layer similar from epoch 0 (a bar of height 0) or never (no bar) is still visible.
        right.bar_label(bars, ["" if e is None else str(e) for e in epochs_reached], fontsize=7)
        for k in (k for k, e in enumerate(epochs_reached) if e is None):
            right.text(k + offset, 0, "never", ha="center", va="bottom", fontsize=7)
    right.set_xticks(x, layers, rotation=45, fontsize=7, ha="right")
    right.set_ylabel(f"convergence epoch (similarity ≥ {result['threshold']})")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _steps_and_norms(records: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    norms = np.concatenate([np.asarray(r["norms"], dtype=np.float64) for r in records])
    return np.arange(1, len(norms) + 1), norms


def gradient_norms_axes(
    ax,
    records: Sequence[Mapping],
    layers: Sequence[str],
    units: Sequence[int] | None = None,
    label: str = "",
    own_steps: bool = False,
) -> None:
    """Per-step gradient norms of ``units`` (default: all) on a log scale; steps not training a unit are left out.

    With ``own_steps`` each layer is drawn against the count of steps that trained it, so that in a greedy run the
    last layer's first step lines up with the first layer's (end to end, every step trains every layer).
    """
    steps, norms = _steps_and_norms(records)
    units = range(norms.shape[1]) if units is None else units
    colors = _layer_colors(norms.shape[1])
    for u in units:
        u = u % norms.shape[1]
        trained = norms[:, u] > 0
        if own_steps:
            x, values = np.arange(1, trained.sum() + 1), norms[trained, u]
        else:
            x, values = steps, np.where(trained, norms[:, u], np.nan)
        ax.plot(x, values, lw=0.6, color=colors[u], label=f"{label}{layers[u]}")
    ax.set_yscale("log")
    ax.set_xlabel("steps that trained the layer" if own_steps else "training step")
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def gradient_norms(records: Sequence[Mapping], layers: Sequence[str], path: str | pathlib.Path) -> pathlib.Path:
    fig = Figure(figsize=(7, 4))
    gradient_norms_axes(fig.add_subplot(), records, layers)
    return _save(fig, path)


def gradient_norms_comparison(
    runs: Mapping[str, tuple[Sequence[Mapping], Sequence[str]]],
    path: str | pathlib.Path,
    units: Sequence[int] = (0, -1),
) -> pathlib.Path:
    """First and last layers' gradient norms for several runs (``{label: (records, layer names)}``), each layer
    against the steps that trained it, on shared axes."""
    fig = Figure(figsize=(5.5 * len(runs), 4))
    axes = fig.subplots(1, len(runs), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (label, (records, layers)) in zip(axes, runs.items(), strict=True):
        gradient_norms_axes(ax, records, layers, units, own_steps=True)
        ax.set_title(label)
    return _save(fig, path)


def run_figures(
    workdir: str | pathlib.Path,
    result: Mapping,
    gradient_records: Sequence[Mapping],
    heatmap_epochs: Sequence[int] = (),
) -> list[pathlib.Path]:
    """Every figure of one run's analysis, written to ``workdir/figures``.

    The convergence figure needs the analysed epochs to start at the initialisation, the gradient-norm figure a
    run trained with ``analysis.enabled``; each is left out otherwise.
    """
    out = pathlib.Path(workdir) / FIGURES_DIR
    paths = [
        information_plane(result, out / "information_plane.png"),
        mi_matrices(result, out / "mi_matrices.png", heatmap_epochs),
    ]
    if result["convergence_epoch"] is not None:
        paths.append(convergence(result, out / "convergence.png"))
    if gradient_records:
        paths.append(gradient_norms(gradient_records, result["layers"], out / "gradient_norms.png"))
    return paths
