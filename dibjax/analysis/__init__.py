"""Information-theoretic analysis of a training run, on a fixed probe batch, at the epochs of its checkpoints.

For every analysed epoch ``e`` and every unit (layer) ``k`` of the network, with ``T_k`` the unit's output on the
probe images (every BatchNorm in inference mode), ``X`` the normalised probe images and ``Y`` their labels:

* the **mutual-information matrix** ``M_ij = I_α(Z_i; Z_j)`` over ``Z = (X, T_1, ..., T_L, Y)``, from one batched
  call of :func:`dibjax.entropy.mutual_information_matrix` (diagonal: ``S_α(Z_i)``), as in Yu, Wickstrøm, Jenssen &
  Príncipe, "Understanding Convolutional Neural Networks With Information Theory: An Initial Exploration", IEEE
  TNNLS 32(1), 2021;
* the **information plane** ``(I(X; T_k), I(T_k; Y))``, read off ``M`` (Shwartz-Ziv & Tishby, "Opening the Black
  Box of Deep Neural Networks via Information", 2017);
* the **data-processing inequality** along the chain ``X → T_1 → … → T_L``: for ``a < b < c`` on the chain
  ``I(Z_a; Z_c) ≤ min(I(Z_a; Z_b), I(Z_b; Z_c))``, and ``I(T_k; Y) ≤ I(T_{k-1}; Y)`` (``T_0 = X``), since ``Y → X →
  T_1 → …``; every violation larger than a tolerance is listed (the estimator is not bound to obey it);
* the **similarity of T_k at epoch e to T_k at the end of training**, two ways: the normalised mutual information
  ``I_α(A; F) / sqrt(I_α(A; A) I_α(F; F))``, every term from the same Hadamard-product estimator, so that a
  representation compared with itself scores exactly 1; and linear CKA (Kornblith, Norouzi, Lee & Hinton,
  "Similarity of Neural Network Representations Revisited", ICML 2019). A unit's **convergence epoch** is the first
  analysed epoch from which its similarity to the final representation stays at or above a threshold;
* per-step gradient norms of every unit, recorded by the training loop (``gradient_norms.jsonl``).

Conventions are those of :mod:`dibjax.entropy`: Gaussian kernel ``exp(-||x - x'||² / (2σ²))`` on the flattened
samples with σ from a width rule (median heuristic by default) for ``X`` and every ``T_k``, the label kernel for
``Y``, Gram matrices normalised to unit trace, α = 1.01, entropies in bits, every eigenvalue computed exactly
(``eigh``). The probe batch is a fixed, seeded sample of the training images, without augmentation.

:func:`analyze_run` runs it on a workdir's checkpoints; the training loop calls it when ``config.analysis.enabled``
(and then keeps the checkpoints of the analysed epochs, epoch 0 being the initialisation), and
``python -m dibjax.analysis --workdir=DIR`` (:func:`analyze_workdir`) calls it on a run's folder.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dibjax import data, entropy, streams
from dibjax.checkpoints import Checkpoints
from dibjax.errors import CheckpointError, ConfigError, WorkdirError
from dibjax.workdir import ANALYSIS_FILE, CONFIG_FILE, GRADIENT_FILE, METRICS_FILE, write_text


def analysis_epochs(epochs: Sequence[int], total_epochs: int) -> tuple[int, ...]:
    """The checkpoint steps (epochs completed) to analyse: ``epochs`` if given, else ``0 .. total_epochs``.

    Epoch 0 is the initialisation; the last epoch is always included, since every similarity is taken to it.
    """
    if not epochs:
        return tuple(range(total_epochs + 1))
    bad = [e for e in epochs if not isinstance(e, int | np.integer) or not 0 <= e <= total_epochs]
    if bad:
        raise ConfigError(f"analysis.epochs {tuple(epochs)} holds {bad}: epochs must be integers in 0..{total_epochs}")
    return tuple(sorted(set(int(e) for e in epochs) | {total_epochs}))


def probe_indices(num_examples: int, size: int, seed: int) -> np.ndarray:
    """A fixed sample of ``size`` training indices (sorted), the same for every epoch of a run."""
    if not 2 <= size <= num_examples:
        raise ConfigError(f"analysis.probe_size={size} must be between 2 and the {num_examples} training images")
    return np.sort(streams.probe_rng(seed).choice(num_examples, size, replace=False))


def linear_cka(K: jax.Array, L: jax.Array) -> jax.Array:
    """Linear CKA of two linear-kernel Gram matrices ``K = X Xᵀ`` and ``L = Y Yᵀ`` of one batch.

    ``CKA = ⟨HKH, HLH⟩_F / (‖HKH‖_F ‖HLH‖_F)`` with ``H = I - 11ᵀ/n`` (Kornblith et al. 2019, Eq. 4 with the linear
    kernel); 1 for representations equal up to an orthogonal transform and isotropic scaling.
    """
    Kc, Lc = _double_center(K), _double_center(L)
    return jnp.sum(Kc * Lc) / jnp.sqrt(jnp.sum(Kc * Kc) * jnp.sum(Lc * Lc))


def _double_center(K: jax.Array) -> jax.Array:
    return K - K.mean(0, keepdims=True) - K.mean(1, keepdims=True) + K.mean()


def dpi_violations(mi: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Checks the data-processing inequality on a mutual-information matrix over ``(X, T_1, ..., T_L, Y)``.

    Returns the number of inequalities ``checked``, the ``violations`` larger than ``tolerance`` (bits), each as
    ``{"inequality": text, "excess": bits}``, ``holds`` (no violation) and the ``largest_excess`` over all of them
    (negative when every inequality holds with room to spare).
    """
    mi = np.asarray(mi, dtype=np.float64)
    last = mi.shape[0] - 1  # Y
    names = ["X"] + [f"T{k}" for k in range(1, last)] + ["Y"]
    checks = []
    for a, b, c in itertools.combinations(range(last), 3):
        checks.append((f"I({names[a]};{names[c]}) <= I({names[a]};{names[b]})", mi[a, c] - mi[a, b]))
        checks.append((f"I({names[a]};{names[c]}) <= I({names[b]};{names[c]})", mi[a, c] - mi[b, c]))
    for k in range(1, last):
        checks.append((f"I({names[k]};Y) <= I({names[k - 1]};Y)", mi[k, last] - mi[k - 1, last]))
    violations = [{"inequality": text, "excess": float(excess)} for text, excess in checks if excess > tolerance]
    return {
        "checked": len(checks),
        "violations": violations,
        "holds": not violations,
        "largest_excess": float(max(excess for _, excess in checks)) if checks else 0.0,
    }


def convergence_epoch(epochs: Sequence[int], similarity: Sequence[float], threshold: float) -> int | None:
    """The first of ``epochs`` from which ``similarity`` stays at or above ``threshold`` up to the end."""
    result = None
    for epoch, value in zip(reversed(list(epochs)), reversed(list(similarity)), strict=True):
        if not value >= threshold:
            break
        result = epoch
    return result


class ProbeAnalysis:
    """The compiled computations of the analysis for one network, probe batch and estimator setting.

    The probe batch is passed to the compiled functions as an argument (a constant would be folded into the
    program at compile time, which is slow), and the Gram matrices of ``X`` and ``Y``, the same at every epoch,
    are computed once. An epoch is three compiled steps: the units' Gram matrices, the MI matrix, the
    similarities to the final representations.
    """

    def __init__(
        self, net, info: data.DatasetInfo, images: np.ndarray, labels: np.ndarray, *, alpha: float, width: str
    ):
        self.net = net
        self.info = info
        self.alpha = alpha
        self.width = width
        self.images = jnp.asarray(images)
        self._grams = jax.jit(self._grams_fn)
        self._mi_matrix = jax.jit(
            lambda grams: entropy.mutual_information_matrix(grams, alpha=self.alpha, method="eigh")
        )
        self._spectra = jax.jit(self._spectra_fn)
        self._similarity = jax.jit(self._similarity_fn)
        x = data.normalize(self.images, info)
        label = entropy.label_gram(jnp.asarray(labels), info.num_classes)
        self.input_grams = jax.jit(lambda x, label: jnp.stack([self._rbf(x), entropy.normalize_gram(label)]))(x, label)

    def _rbf(self, z):
        return entropy.normalize_gram(entropy.gram_matrix(z, width=self.width))

    def _linear(self, z):
        z = z.reshape(z.shape[0], -1)
        return jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)

    def _entropy(self, A):
        return entropy.renyi_entropy(A, alpha=self.alpha, method="eigh")

    def _self_information(self, A):
        # I(A; A) under the Hadamard joint estimator: 2 S(A) - S(A ∘ A / tr).
        return 2 * self._entropy(A) - entropy.joint_entropy(A, A, alpha=self.alpha, method="eigh")

    def _grams_fn(self, params, batch_stats, images):
        outputs = self.net.unit_outputs(params, batch_stats, data.normalize(images, self.info))
        # Every quantity is estimated in float32, whatever precision the network computed in.
        outputs = [t.astype(jnp.float32) for t in outputs]
        return {
            "rbf": jnp.stack([self._rbf(t) for t in outputs]),
            "linear": jnp.stack([self._linear(t) for t in outputs]),
        }

    def _spectra_fn(self, rbf):
        return {"entropy": jax.vmap(self._entropy)(rbf), "self_mi": jax.vmap(self._self_information)(rbf)}

    def _similarity_fn(self, grams, entropies, reference):
        def to_final(A, F, entropy_a, entropy_f, self_f):
            cross = entropy_a + entropy_f - entropy.joint_entropy(A, F, alpha=self.alpha, method="eigh")
            return cross / jnp.sqrt(self._self_information(A) * self_f)

        final = reference["grams"]
        nmi = jax.vmap(to_final)(
            grams["rbf"], final["rbf"], entropies, reference["spectra"]["entropy"], reference["spectra"]["self_mi"]
        )
        cka = jax.vmap(linear_cka)(grams["linear"], final["linear"])
        return {"normalized_mi": nmi, "cka": cka}

    def reference(self, params, batch_stats) -> dict:
        """The final representations' Gram matrices and entropies, to which every epoch is compared."""
        grams = self._grams(params, batch_stats, self.images)
        return {"grams": grams, "spectra": self._spectra(grams["rbf"])}

    def epoch(self, params, batch_stats, reference) -> dict:
        """The MI matrix over (X, T_1, ..., T_L, Y) and every unit's similarity to ``reference``."""
        grams = self._grams(params, batch_stats, self.images)
        stack = jnp.concatenate([self.input_grams[:1], grams["rbf"], self.input_grams[1:]])
        mi = self._mi_matrix(stack)
        similarity = self._similarity(grams, jnp.diagonal(mi)[1:-1], reference)
        return {"mi": mi, **similarity}


def _analysis_options(config) -> dict:
    options = config.get("analysis") if hasattr(config, "get") else None
    defaults = default_options()
    if options is None:
        return defaults
    return {name: options.get(name, value) for name, value in defaults.items()}


def default_options() -> dict:
    """The ``config.analysis`` fields and their defaults.

    * ``enabled``: analyse the run at its end; the checkpoints of the analysed epochs are then kept and every
      step's per-unit gradient norms are written to ``gradient_norms.jsonl``.
    * ``probe_size``: training images in the fixed probe batch; every entropy is computed exactly on them.
    * ``epochs``: epochs to analyse (0: the initialisation); ``()`` every epoch; the last always.
    * ``alpha``, ``width``: Rényi order and kernel-width rule of the estimator.
    * ``threshold``: similarity to the final representation that counts as converged.
    * ``dpi_tolerance``: bits by which an inequality may be broken before it is reported.
    * ``heatmap_epochs``: MI-matrix heatmaps at these epochs; ``()`` first, middle and last.
    * ``figures``: write ``figures/*.png``.
    """
    return {
        "enabled": False,
        "probe_size": 512,
        "epochs": (),
        "alpha": 1.01,
        "width": "median",
        "threshold": 0.9,
        "dpi_tolerance": 0.0,
        "heatmap_epochs": (),
        "figures": True,
    }


def check_options(options: dict) -> None:
    """Refuses bad ``config.analysis`` values before any training starts."""
    if options["width"] not in entropy.WIDTH_RULES:
        raise ConfigError(f"unknown analysis.width {options['width']!r}; accepted: {', '.join(entropy.WIDTH_RULES)}")
    if not (isinstance(options["alpha"], int | float) and options["alpha"] > 0 and options["alpha"] != 1):
        raise ConfigError(f"analysis.alpha must be a number > 0 other than 1, got {options['alpha']!r}")
    if not isinstance(options["probe_size"], int) or options["probe_size"] < 2:
        raise ConfigError(f"analysis.probe_size must be an integer >= 2, got {options['probe_size']!r}")
    if not 0 < options["threshold"] <= 1:
        raise ConfigError(f"analysis.threshold must lie in (0, 1], got {options['threshold']!r}")


def analyze_run(
    workdir: str | pathlib.Path,
    trainer,
    train_ds: data.ArrayDataset,
    *,
    epochs: Sequence[int] | None = None,
    figures: bool | None = None,
) -> dict[str, Any]:
    """Analyses the checkpoints in ``workdir`` of the run ``trainer`` was built for; writes ``analysis.json``.

    Analyses the epochs ``epochs`` (or ``config.analysis.epochs``) when given, else every kept checkpoint, which
    must then include the initial state (epoch 0): a run keeps every analysed epoch only when trained with
    ``config.analysis.enabled``, and its last two otherwise, from which no convergence or trajectory can be read.
    The latest checkpoint is the reference "end of training" and is always analysed. Convergence epochs are
    determined only when the analysed epochs start at 0 (``convergence_epoch`` is None otherwise). Also writes
    the figures to ``workdir/figures`` unless told not to. Returns what it wrote.

    Raises:
        CheckpointError: when the run has no checkpoint, or (``epochs`` not given) not the initial state's.
        ConfigError: for requested epochs without a checkpoint.
    """
    workdir = pathlib.Path(workdir).absolute()
    config = trainer.config
    options = _analysis_options(config)
    check_options(options)
    chosen = tuple(epochs) if epochs is not None else tuple(options["epochs"])
    checkpoints = Checkpoints(workdir, create=False)
    available = checkpoints.epochs()
    abstract = trainer.abstract_state()

    def restore(epoch):
        state = checkpoints.restore(epoch, abstract)  # verified against its fingerprint
        return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})

    if not available:
        raise CheckpointError(f"no checkpoints in {checkpoints.directory}: nothing to analyse")
    final = available[-1]
    if chosen:
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise ConfigError(f"epochs {missing} have no checkpoint in {workdir}; checkpoints exist for {available}")
        steps = sorted(set(chosen) | {final})
    elif available[0] != 0:
        listed = ",".join(map(str, available))
        raise CheckpointError(
            f"{workdir} kept the checkpoints of epochs {listed} only: a run keeps its last two unless trained with "
            "--config.analysis.enabled=True, which keeps the initial state and every analysed epoch, as layer "
            f"convergence and information-plane trajectories need. Retrain with it, or pass --epochs={listed} to "
            "analyse just these epochs"
        )
    else:
        steps = available

    index = probe_indices(len(train_ds), options["probe_size"], config.seed)
    probe = ProbeAnalysis(
        trainer.net,
        trainer.info,
        train_ds.images[index],
        train_ds.labels[index],
        alpha=options["alpha"],
        width=options["width"],
    )
    start = time.perf_counter()
    final_state = restore(final)
    reference = jax.device_get(probe.reference(final_state["params"], final_state["batch_stats"]))
    reference_seconds = time.perf_counter() - start

    per_epoch, seconds = [], []
    for step in steps:
        start = time.perf_counter()
        state = restore(step)
        per_epoch.append(jax.device_get(probe.epoch(state["params"], state["batch_stats"], reference)))
        seconds.append(time.perf_counter() - start)

    epochs_done = list(steps)
    mi = [np.asarray(o["mi"], np.float64) for o in per_epoch]
    nmi = [np.asarray(o["normalized_mi"], np.float64) for o in per_epoch]
    cka = [np.asarray(o["cka"], np.float64) for o in per_epoch]
    num_units = len(trainer.net.unit_names)
    result = {
        "layers": list(trainer.net.unit_names),
        "epochs": epochs_done,
        "probe_size": options["probe_size"],
        "alpha": options["alpha"],
        "width": options["width"],
        "threshold": options["threshold"],
        "mi_matrices": [m.tolist() for m in mi],
        "I_XT": [m[0, 1 : num_units + 1].tolist() for m in mi],
        "I_TY": [m[1 : num_units + 1, -1].tolist() for m in mi],
        "H_T": [np.diagonal(m)[1 : num_units + 1].tolist() for m in mi],
        "normalized_mi_to_final": [v.tolist() for v in nmi],
        "cka_to_final": [v.tolist() for v in cka],
        # Undetermined unless the analysed epochs start at the initialisation.
        "convergence_epoch": None
        if epochs_done[0] != 0
        else {
            name: [
                convergence_epoch(epochs_done, [float(v[k]) for v in values], options["threshold"])
                for k in range(num_units)
            ]
            for name, values in (("normalized_mi", nmi), ("cka", cka))
        },
        "dpi": [dpi_violations(m, options["dpi_tolerance"]) for m in mi],
        "seconds": {
            "reference": reference_seconds,
            # The first epoch includes the compilation of the analysis.
            "per_epoch": seconds,
            "steady_per_epoch": float(np.median(seconds[1:])) if len(seconds) > 1 else seconds[0],
        },
    }
    training_seconds = _training_seconds_per_epoch(workdir)
    if training_seconds:
        result["seconds"]["training_per_epoch"] = training_seconds
        result["seconds"]["analysis_over_training"] = result["seconds"]["steady_per_epoch"] / training_seconds
    write_text(workdir / ANALYSIS_FILE, json.dumps(result, indent=1))
    if figures if figures is not None else options["figures"]:
        from dibjax import plots

        plots.run_figures(workdir, result, read_gradient_norms(workdir), options["heatmap_epochs"])
    return result


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The configuration a run was trained with (its ``config.json``), with every analysis field present.

    Raises:
        WorkdirError: when the folder holds no dibjax run, or one written by a version of dibjax with other fields.
    """
    from dibjax import config_lib  # imported here: config_lib imports this module

    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise WorkdirError(f"{path} not found: --workdir must be the folder of a dibjax run")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config.analysis = ml_collections.ConfigDict({**default_options(), **config.get("analysis", {})})
    try:
        expected = config_lib.get_config(config.data.name, config.variant)
    except (AttributeError, KeyError, ConfigError):
        expected = None
    missing = (
        [] if expected is None else sorted(set(_flat_keys(expected.to_dict())) - set(_flat_keys(config.to_dict())))
    )
    if expected is None or missing:
        shown = f" (missing: {', '.join(missing[:5])})" if missing else ""
        raise WorkdirError(f"{path} was written by another version of dibjax{shown}; retrain the run with this one")
    return config


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        keys.extend(_flat_keys(value, name + ".") if isinstance(value, dict) else [name])
    return keys


def analyze_workdir(
    workdir: str | pathlib.Path,
    *,
    epochs: Sequence[int] | None = None,
    data_dir: str | None = None,
    figures: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Analyses a finished (or interrupted) run from its folder alone: config, data, checkpoints.

    ``options`` override the run's ``config.analysis`` fields (``probe_size``, ``alpha``, ``width``, ``threshold``,
    ...); ``data_dir`` replaces ``config.data.dir`` when the data moved. Returns the result written to
    ``analysis.json`` (see :func:`analyze_run`, which says which epochs a run can be analysed at).
    """
    from dibjax.trainer import Trainer  # imported here: the trainer's modules import this one

    config = load_run_config(workdir)
    unknown = sorted(set(options) - set(default_options()))
    if unknown:
        raise ConfigError(f"unknown analysis option(s) {unknown}; accepted: {sorted(default_options())}")
    config.analysis.update({name: value for name, value in options.items() if value is not None})
    check_options(config.analysis.to_dict())
    if data_dir:
        config.data.dir = data_dir
    train_ds, _, info = data.load(config.data)
    trainer = Trainer(config, info, data.steps_per_epoch(len(train_ds), config.train.batch_size))
    return analyze_run(workdir, trainer, train_ds, epochs=epochs, figures=figures)


def _training_seconds_per_epoch(workdir: pathlib.Path) -> float | None:
    path = workdir / METRICS_FILE
    if not path.exists():
        return None
    seconds = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            seconds[record["epoch"]] = record["seconds"]  # one value per epoch, however many stages it trained
    return float(np.median(list(seconds.values()))) if seconds else None


def read_gradient_norms(workdir: str | pathlib.Path) -> list[dict]:
    """The per-step, per-unit gradient norms recorded by the training loop, one record per epoch (or [])."""
    path = pathlib.Path(workdir) / GRADIENT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "ProbeAnalysis",
    "analysis_epochs",
    "analyze_run",
    "analyze_workdir",
    "check_options",
    "convergence_epoch",
    "default_options",
    "dpi_violations",
    "linear_cka",
    "load_run_config",
    "probe_indices",
    "read_gradient_norms",
]
