import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dibjax import analysis, config_lib, data, errors, models, plots, schedulers, train, trainer
from tests import reference as ref
from tests.runs import ROOT, smoke_config

ALPHA = 1.01


def numpy_cka(x, y):
    """Linear CKA from centred features (Kornblith et al. 2019, Eq. 5), float64."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_matches_the_feature_space_formula_and_its_invariances(x64):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 12)), rng.normal(size=(40, 7)) + 0.5 * rng.normal(size=(40, 1))
    gram = lambda z: jnp.asarray(z @ z.T)  # noqa: E731
    np.testing.assert_allclose(analysis.linear_cka(gram(x), gram(y)), numpy_cka(x, y), rtol=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    np.testing.assert_allclose(analysis.linear_cka(gram(x), gram(3.0 * x @ q + 2.0)), 1.0, rtol=1e-10)
    assert float(analysis.linear_cka(gram(x), gram(y))) < 0.9


def test_dpi_check_names_exactly_the_broken_inequalities():
    # A chain X, T1, T2, Y whose information decays along the chain: every inequality holds.
    mi = np.array(
        [
            [8.0, 6.0, 4.0, 2.0],
            [6.0, 7.0, 5.0, 1.5],
            [4.0, 5.0, 6.0, 1.0],
            [2.0, 1.5, 1.0, 3.3],
        ]
    )
    result = analysis.dpi_violations(mi, tolerance=0.0)
    assert result["holds"] and result["violations"] == []
    assert result["checked"] == 2 * 1 + 2  # one triple (X, T1, T2) gives two; I(T1;Y), I(T2;Y) one each
    assert result["largest_excess"] == pytest.approx(-0.5)

    broken = mi.copy()
    broken[0, 2] = broken[2, 0] = 6.5  # I(X;T2) above I(X;T1) = 6 and above I(T1;T2) = 5
    broken[2, 3] = broken[3, 2] = 1.75  # I(T2;Y) above I(T1;Y) = 1.5
    result = analysis.dpi_violations(broken, tolerance=0.0)
    found = {v["inequality"]: v["excess"] for v in result["violations"]}
    assert found == pytest.approx({"I(X;T2) <= I(X;T1)": 0.5, "I(X;T2) <= I(T1;T2)": 1.5, "I(T2;Y) <= I(T1;Y)": 0.25})
    assert not result["holds"]
    assert analysis.dpi_violations(broken, tolerance=2.0)["holds"]


def test_dpi_check_counts_every_triple():
    layers = 5
    result = analysis.dpi_violations(np.zeros((layers + 2, layers + 2)), tolerance=0.0)
    assert result["checked"] == 2 * len(list(itertools.combinations(range(layers + 1), 3))) + layers


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.1, 0.95, 0.5, 0.92, 1.0], 3),
        ([0.95, 0.96, 0.99, 1.0, 1.0], 0),
        ([0.1, 0.2, 0.3, 0.4, 0.5], None),
        ([0.1, 0.2, 0.3, 0.4, float("nan")], None),
    ],
)
def test_convergence_epoch_is_where_the_similarity_stays_above_the_threshold(values, expected):
    epochs = [0, 2, 4, 6, 8]
    got = analysis.convergence_epoch(epochs, values, 0.9)
    assert got == (None if expected is None else epochs[expected])


def test_analysis_epochs_and_probe_indices():
    assert analysis.analysis_epochs((), 3) == (0, 1, 2, 3)
    assert analysis.analysis_epochs((2, 0, 2), 5) == (0, 2, 5)
    with pytest.raises(ValueError, match=r"0\.\.5"):
        analysis.analysis_epochs((7,), 5)
    first, again = analysis.probe_indices(100, 20, seed=3), analysis.probe_indices(100, 20, seed=3)
    np.testing.assert_array_equal(first, again)
    assert len(np.unique(first)) == 20 and np.all(np.diff(first) > 0)
    with pytest.raises(ValueError, match="probe_size=200"):
        analysis.probe_indices(100, 200, seed=0)


@pytest.fixture(scope="module")
def probe_setup():
    """A 4-unit small CNN (one of them two units in a stage) and a probe batch of 24 images."""
    config = config_lib.get_config("cifar10", "smoke,sgd")
    model_config = config_lib.model_fields(config)
    model_config.update(split="groups", num_groups=3)
    model = models.build_model(model_config, 10, nnx.Rngs(0))
    net = schedulers.FunctionalModel(model)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 24)
    images = (rng.integers(0, 80, (24, 16, 16, 3)) + 15 * labels[:, None, None, None]).astype(np.uint8)
    info = data.DATASETS["cifar10"]
    probe = analysis.ProbeAnalysis(net, info, images, labels, alpha=ALPHA, width="median")
    return model, net, probe, images, labels, info


def test_unit_outputs_are_the_layers_of_the_eval_model(probe_setup):
    model, net, _, images, _, info = probe_setup
    assert net.unit_names == ("conv1+pool", "conv2+pool", "conv3+pool", "conv4+pool")
    x = data.normalize(jnp.asarray(images), info)
    outputs = net.unit_outputs(net.initial_params, net.initial_batch_stats, x)
    model.eval()
    h, expected = x, []
    for stage in model.stages:
        for layer in stage.layers:
            h = layer(h)
            expected.append(h)
    model.train()
    assert len(outputs) == 4
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mi_matrix_and_similarities_match_numpy_float64(probe_setup):
    _, net, probe, images, labels, info = probe_setup
    params, batch_stats = net.initial_params, net.initial_batch_stats
    reference = probe.reference(params, batch_stats)
    out = jax.device_get(probe.epoch(params, batch_stats, reference))

    x = np.asarray(data.normalize(jnp.asarray(images), info), np.float64)
    units = [np.asarray(t, np.float64) for t in net.unit_outputs(params, batch_stats, jnp.asarray(x, jnp.float32))]
    grams = [ref.normalize(ref.gaussian_gram(z, ref.median_sigma(z))) for z in [x, *units]]
    grams.append(ref.normalize((labels[:, None] == labels[None, :]).astype(np.float64)))
    expected = np.array(
        [
            [
                ref.entropy(a, ALPHA, tol_dtype=np.float32)
                if i == j
                else ref.mutual_information(a, b, ALPHA, tol_dtype=np.float32)
                for j, b in enumerate(grams)
            ]
            for i, a in enumerate(grams)
        ]
    )
    np.testing.assert_allclose(out["mi"], expected, atol=2e-3)
    # Every unit compared with itself (the reference is the same state): exactly similar under both measures.
    np.testing.assert_allclose(out["normalized_mi"], 1.0, atol=1e-4)
    np.testing.assert_allclose(out["cka"], 1.0, atol=1e-5)


def test_similarity_to_another_state_matches_numpy_float64(probe_setup):
    _, net, probe, images, _, info = probe_setup
    params, batch_stats = net.initial_params, net.initial_batch_stats
    other = jax.tree.map(lambda a: a * 1.5 + 0.1 if a.ndim == 4 else a, params)  # rescaled conv kernels
    reference = probe.reference(other, batch_stats)
    out = jax.device_get(probe.epoch(params, batch_stats, reference))
    x = data.normalize(jnp.asarray(images), info)
    now = [np.asarray(t, np.float64) for t in net.unit_outputs(params, batch_stats, x)]
    final = [np.asarray(t, np.float64) for t in net.unit_outputs(other, batch_stats, x)]
    for k, (a_feat, f_feat) in enumerate(zip(now, final, strict=True)):
        a = ref.normalize(ref.gaussian_gram(a_feat, ref.median_sigma(a_feat)))
        f = ref.normalize(ref.gaussian_gram(f_feat, ref.median_sigma(f_feat)))
        mi = lambda p, q: ref.mutual_information(p, q, ALPHA, tol_dtype=np.float32)  # noqa: E731
        np.testing.assert_allclose(out["normalized_mi"][k], mi(a, f) / np.sqrt(mi(a, a) * mi(f, f)), atol=2e-3)
        np.testing.assert_allclose(out["cka"][k], numpy_cka(a_feat, f_feat), rtol=1e-4)
    assert np.all(out["cka"] < 1 - 1e-4)


def test_unit_gradient_norms_split_each_stage_norm(tiny_data, tmp_path):
    config = smoke_config(tiny_data, **{"model.split": "groups", "model.num_groups": 2})
    info = data.DATASETS["cifar10"]
    run_trainer = trainer.Trainer(config, info, steps_per_epoch=1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (16, 16, 16, 3)).astype(np.uint8),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    state, batch = run_trainer.create_state(), run_trainer.shard(batch, 16)
    _, totals, unit_grad_norm = run_trainer.train_steps[0](state, run_trainer.zero_totals(0, state, batch), batch)
    units, stages = np.asarray(unit_grad_norm), np.asarray(totals["grad_norm"])
    assert units.shape == (4,) and np.all(units > 0)
    np.testing.assert_allclose([np.hypot(*units[:2]), np.hypot(*units[2:])], stages, rtol=1e-5)


def test_run_with_analysis_keeps_its_checkpoints_and_writes_results_and_figures(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    config = smoke_config(tiny_data, **{"train.num_epochs": 2, "analysis.enabled": True, "analysis.probe_size": 24})
    summary = train.train_and_evaluate(config, workdir)
    assert summary["analysis_seconds"] > 0
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [0, 1, 2]

    result = json.loads((workdir / "analysis.json").read_text())
    assert result["epochs"] == [0, 1, 2]
    assert result["layers"] == ["conv1+pool", "conv2+pool", "conv3+pool", "conv4+pool"]
    mi = np.asarray(result["mi_matrices"])
    assert mi.shape == (3, 6, 6)
    np.testing.assert_allclose(mi, np.swapaxes(mi, 1, 2))
    np.testing.assert_allclose(result["I_XT"], mi[:, 0, 1:5])
    np.testing.assert_allclose(result["I_TY"], mi[:, 1:5, 5])
    np.testing.assert_allclose(result["normalized_mi_to_final"][-1], 1.0, atol=1e-4)
    np.testing.assert_allclose(result["cka_to_final"][-1], 1.0, atol=1e-5)
    assert all(e in (0, 1, 2) for e in result["convergence_epoch"]["cka"])
    assert len(result["dpi"]) == 3 and result["dpi"][0]["checked"] == 2 * 10 + 4
    assert result["seconds"]["analysis_over_training"] > 0

    gradients = analysis.read_gradient_norms(workdir)
    assert [g["epoch"] for g in gradients] == [1, 2]
    steps = data.steps_per_epoch(96, 16)
    assert all(np.asarray(g["norms"]).shape == (steps, 4) for g in gradients)
    assert np.all(np.asarray(gradients[0]["norms"]) > 0)

    names = {p.name for p in (workdir / "figures").iterdir()}
    assert names == {"information_plane.png", "mi_matrices.png", "convergence.png", "gradient_norms.png"}
    assert all((workdir / "figures" / n).read_bytes()[:4] == b"\x89PNG" for n in names)

    # The command line re-analyses the finished run to the same numbers.
    (workdir / "analysis.json").unlink()
    command = [sys.executable, "-m", "dibjax.analysis", f"--workdir={workdir}", "--epochs=0,2", "--nofigures"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((workdir / "analysis.json").read_text())
    assert again["epochs"] == [0, 2]
    # Another process, without the test suite's x64 mode: the same float32 estimates up to rounding.
    np.testing.assert_allclose(again["mi_matrices"], mi[[0, 2]], rtol=1e-4, atol=1e-4)
    assert "convergence epoch per layer" in out.stdout


def test_bad_analysis_settings_are_refused_before_training(tiny_data, tmp_path):
    for field, value, message in (
        ("analysis.width", "widest", "unknown analysis.width 'widest'"),
        ("analysis.alpha", 1.0, "analysis.alpha"),
        ("analysis.threshold", 1.5, "analysis.threshold"),
    ):
        with pytest.raises(ValueError, match=message):
            train.train_and_evaluate(smoke_config(tiny_data, **{field: value}), tmp_path / "bad")
        assert not (tmp_path / "bad" / "checkpoints").exists()
    config = smoke_config(tiny_data, **{"analysis.enabled": True, "train.checkpoint": False})
    with pytest.raises(ValueError, match="needs train.checkpoint=True"):
        train.train_and_evaluate(config, tmp_path / "bad")


def test_gradient_comparison_figure_is_written(tmp_path):
    records = [{"epoch": 0, "stage": None, "norms": [[1.0, 0.5], [0.8, 0.0]]}]
    path = plots.gradient_norms_comparison(
        {"a": (records, ["l1", "l2"]), "b": (records, ["l1", "l2"])}, tmp_path / "g.png"
    )
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_gradient_curves_skip_untrained_steps_and_align_layers_by_their_own_steps():
    from matplotlib.figure import Figure

    # A greedy run of two stages: layer 1 trains in epoch 0 (norms of layer 2 are 0), layer 2 in epoch 1.
    records = [
        {"epoch": 0, "stage": 0, "norms": [[1.0, 0.0], [2.0, 0.0]]},
        {"epoch": 1, "stage": 1, "norms": [[0.0, 3.0], [0.0, 4.0], [0.0, 5.0]]},
    ]
    for own_steps, expected_x in ((False, {0: [1, 2, 3, 4, 5], 1: [1, 2, 3, 4, 5]}), (True, {0: [1, 2], 1: [1, 2, 3]})):
        ax = Figure().add_subplot()
        plots.gradient_norms_axes(ax, records, ["l1", "l2"], own_steps=own_steps)
        lines = ax.get_lines()
        for unit, values in ((0, [1.0, 2.0]), (1, [3.0, 4.0, 5.0])):
            np.testing.assert_array_equal(lines[unit].get_xdata(), expected_x[unit])
            y = np.asarray(lines[unit].get_ydata(), np.float64)
            np.testing.assert_array_equal(y[~np.isnan(y)], values)  # untrained steps are gaps, never zeros


def test_a_run_without_the_analysis_is_analysed_only_as_far_as_it_can_be(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(smoke_config(tiny_data, **{"train.num_epochs": 3}), workdir)
    with pytest.raises(errors.CheckpointError) as refused:
        analysis.analyze_workdir(workdir)
    assert str(refused.value) == (
        f"{workdir} kept the checkpoints of epochs 2,3 only: a run keeps its last two unless trained with "
        "--config.analysis.enabled=True, which keeps the initial state and every analysed epoch, as layer "
        "convergence and information-plane trajectories need. Retrain with it, or pass --epochs=2,3 to analyse "
        "just these epochs"
    )
    command = [sys.executable, "-m", "dibjax.analysis", f"--workdir={workdir}", "--epochs=2,3", "--probe_size=24"]
    chosen = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    assert (
        "convergence epochs: not determined (the analysed epochs start at 2, not at the initialisation" in chosen.stdout
    )
    assert "per-step gradient norms: none recorded" in chosen.stdout
    result = json.loads((workdir / "analysis.json").read_text())
    assert result["epochs"] == [2, 3] and result["convergence_epoch"] is None
    assert {p.name for p in (workdir / "figures").iterdir()} == {"information_plane.png", "mi_matrices.png"}
