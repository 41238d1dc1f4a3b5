"""The schedulers' isolation guarantees, on a tiny staged network."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dibjax import models, objectives, schedulers
from dibjax.errors import ConfigError

NUM_STAGES = 4
DIB = objectives.DIB(beta=0.05, gamma=0.05, compression="mi_prev", pool=2)


def tiny_network(num_groups=NUM_STAGES, head="conv"):
    config = {"name": "small_cnn", "width": 4, "split": "groups", "num_groups": num_groups, "head": head}
    config["head_width"] = 4
    model = models.build_model(config, 5, nnx.Rngs(0, params=jax.random.key(0, impl="rbg")))
    return schedulers.FunctionalModel(model)


def tiny_batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, n), jnp.int32)
    return x, labels


def initial_state(net, scheduler, optimizer, stages_trained=True):
    groups = schedulers.num_groups(scheduler, net.num_stages)
    params = net.initial_params
    return schedulers.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=net.initial_batch_stats,
        opt_states=schedulers.init_optimizer_states(
            scheduler, [optimizer] * groups, params, stages_trained=stages_trained
        ),
        augment_key=jax.random.key_data(jax.random.key(0)),
        nonfinite_step=-jnp.ones((), jnp.int32),
    )


def everything(net):
    """One 'group' holding every stage and head, so a gradient is taken with respect to all parameters."""
    return {0: schedulers.select(net.initial_params, range(net.num_stages), range(net.num_stages))}


def global_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))))


def gradient_norms(grads, kind):
    return [global_norm(grads[0][kind][k]) for k in range(NUM_STAGES)]


@pytest.fixture(scope="module")
def net():
    return tiny_network()


def test_phases_of_each_scheduler():
    assert [p.stage for p in schedulers.make_phases("sequential", 3, 2)] == [0, 1, 2]
    assert [p.num_epochs for p in schedulers.make_phases("sequential", 3, (1, 2, 3))] == [1, 2, 3]
    (phase,) = schedulers.make_phases("simultaneous", 3, 4)
    assert (phase.stage, phase.num_epochs, phase.scheduler) == (None, 4, "simultaneous")
    assert schedulers.make_phases("end_to_end", 3, 4)[0].scheduler == "end_to_end"
    with pytest.raises(ConfigError, match="unknown scheduler 'greedy'; accepted: sequential, simultaneous, end_to_end"):
        schedulers.make_phases("greedy", 3, 1)
    with pytest.raises(ValueError, match=r"got 2 per-stage epoch counts \(1, 2\) for 3 stages"):
        schedulers.make_phases("sequential", 3, (1, 2))
    with pytest.raises(ValueError, match="epoch counts must be >= 1"):
        schedulers.make_phases("sequential", 2, (1, 0))


@pytest.mark.parametrize("k", [0, 2])
def test_sequential_gradient_reaches_only_the_trained_stage(net, k):
    x, labels = tiny_batch()
    phase = schedulers.Phase("sequential", k, 1)
    loss_fn = functools.partial(schedulers.phase_loss, net, DIB, phase)
    grads = jax.grad(lambda t: loss_fn(t, net.initial_params, net.initial_batch_stats, x, labels)[0])(everything(net))
    stage_norms, head_norms = gradient_norms(grads, "stages"), gradient_norms(grads, "heads")
    for j in range(NUM_STAGES):
        assert (stage_norms[j] > 0) == (j == k), stage_norms
        assert (head_norms[j] > 0) == (j == k), head_norms


def test_simultaneous_stage_loss_does_not_reach_earlier_stages(net):
    x, labels = tiny_batch(1)
    phase = schedulers.Phase("simultaneous", None, 1)

    def stage_loss(trainable, k):
        _, (outputs, _) = schedulers.phase_loss(
            net, DIB, phase, trainable, net.initial_params, net.initial_batch_stats, x, labels
        )
        return outputs[k]["loss"]

    for k in (1, 3):
        grads = jax.grad(stage_loss)(everything(net), k)
        norms = gradient_norms(grads, "stages")
        assert norms[:k] == [0.0] * k, norms
        assert norms[k] > 0
        assert norms[k + 1 :] == [0.0] * (NUM_STAGES - k - 1)


def test_end_to_end_gradient_reaches_every_stage_and_only_the_last_head(net):
    x, labels = tiny_batch(2)
    phase = schedulers.Phase("end_to_end", None, 1)
    loss = objectives.CrossEntropy()
    grads = jax.grad(
        lambda t: schedulers.phase_loss(net, loss, phase, t, net.initial_params, net.initial_batch_stats, x, labels)[0]
    )(everything(net))
    assert min(gradient_norms(grads, "stages")) > 0
    assert gradient_norms(grads, "heads") == [0.0, 0.0, 0.0, pytest.approx(gradient_norms(grads, "heads")[3])]
    assert gradient_norms(grads, "heads")[3] > 0


def test_hsic_head_cross_entropy_does_not_reach_the_stage(net):
    x, labels = tiny_batch(3)
    phase = schedulers.Phase("sequential", 1, 1)
    hsic_free = objectives.UnnormalizedHSIC(lam=0.0)  # what is left: HSIC(T, X) and the head's CE

    def ce_only(trainable):
        _, (outputs, _) = schedulers.phase_loss(
            net, hsic_free, phase, trainable, net.initial_params, net.initial_batch_stats, x, labels
        )
        return outputs[1]["terms"]["ce"]

    grads = jax.grad(ce_only)(everything(net))
    assert gradient_norms(grads, "stages")[1] == 0.0
    assert gradient_norms(grads, "heads")[1] > 0


def leaves_equal(a, b):
    return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_sequential_training_leaves_other_stages_bit_identical(net):
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = initial_state(net, "sequential", optimizer)
    before = jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    phase = schedulers.Phase("sequential", 2, 1)
    step = jax.jit(lambda state, x, y: schedulers.train_step(net, DIB, [optimizer] * NUM_STAGES, phase, state, x, y))
    for seed in range(3):
        state, metrics = step(state, *tiny_batch(seed))
    for kind in ("stages", "heads"):
        for j in range(NUM_STAGES):
            for part in ("params", "batch_stats"):
                same = leaves_equal(before[part][kind][j], getattr(state, part)[kind][j])
                has_leaves = bool(jax.tree.leaves(before[part][kind][j]))
                assert same == (j != 2 or not has_leaves), (part, kind, j)
    # BatchNorm statistics of the trained stage moved; the frozen stages' did not (checked above).
    assert not leaves_equal(before["batch_stats"]["stages"][2], state.batch_stats["stages"][2])
    assert float(metrics["grad_norm"][2]) > 0 and float(metrics["grad_norm"][0]) == 0.0
    assert set(metrics) == {"loss", "correct", "grad_norm", "count", "ce", "H_T", "I_prev", "I_TY", "unit_grad_norm"}
    # Only the trained stage's units have a gradient (one unit per stage here).
    np.testing.assert_array_equal(np.asarray(metrics["unit_grad_norm"]) > 0, np.arange(NUM_STAGES) == 2)


def test_simultaneous_training_updates_every_stage_with_its_own_optimizer_state(net):
    optimizer = optax.sgd(0.05, momentum=0.9)
    state = initial_state(net, "simultaneous", optimizer)
    assert len(state.opt_states) == NUM_STAGES
    phase = schedulers.Phase("simultaneous", None, 1)
    new_state, metrics = jax.jit(
        lambda s, x, y: schedulers.train_step(net, objectives.CrossEntropy(), [optimizer] * NUM_STAGES, phase, s, x, y)
    )(state, *tiny_batch(4))
    for j in range(NUM_STAGES):
        assert not leaves_equal(state.params["stages"][j], new_state.params["stages"][j])
        assert not leaves_equal(state.opt_states[j], new_state.opt_states[j])
    assert bool(jnp.all(metrics["grad_norm"] > 0))


def test_head_only_training_keeps_the_stages_as_initialised(net):
    # Weight decay and momentum would move a stage whose gradient is zero: the stages must not be in any group.
    optimizer = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    state = initial_state(net, "simultaneous", optimizer, stages_trained=False)
    phase = schedulers.Phase("simultaneous", None, 1)
    head_only = objectives.HeadOnly()
    step = jax.jit(lambda s, x, y: schedulers.train_step(net, head_only, [optimizer] * NUM_STAGES, phase, s, x, y))
    new_state, metrics = step(state, *tiny_batch(6))
    new_state, metrics = step(new_state, *tiny_batch(7))
    for j in range(NUM_STAGES):
        assert leaves_equal(state.params["stages"][j], new_state.params["stages"][j])
        assert not leaves_equal(state.params["heads"][j], new_state.params["heads"][j])
        # The stages' BatchNorm statistics follow the data, so their inference mode matches what the heads saw.
        assert not leaves_equal(state.batch_stats["stages"][j], new_state.batch_stats["stages"][j])
    assert float(jnp.max(metrics["grad_norm"])) == 0.0
    assert bool(jnp.all(metrics["correct"] >= 0)) and bool(jnp.all(metrics["ce"] > 0))


@pytest.mark.parametrize("factor", [0.0, 0.25, 1.0])
def test_scale_gradient_keeps_the_value_and_scales_the_gradient(factor):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7,)), jnp.float32)
    np.testing.assert_array_equal(schedulers.scale_gradient(x, factor), x)
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(schedulers.scale_gradient(x, factor))))(x)
    np.testing.assert_allclose(grad, factor * jnp.cos(x), rtol=1e-6)


def test_predsim_gradients_are_those_its_authors_adam_gives():
    """Stage: (1 − β)∇CE + β∇sim; head classifier: ∇CE; similarity convolution: β∇sim (PredSim's docstring)."""
    config = {"name": "small_cnn", "width": 4, "split": "layer", "head": "prediction", "image_size": 16}
    config |= {"head_features": 8, "head_extras": ("similarity",)}
    net = schedulers.FunctionalModel(models.build_model(config, 5, nnx.Rngs(1, params=jax.random.key(1, impl="rbg"))))
    beta = 0.75
    objective = objectives.PredSim(beta=beta)
    x, labels = tiny_batch(8)
    params, stats = net.initial_params, net.initial_batch_stats
    # The classifier's weights start at zero, which would hide the CE's path into the stage: move them.
    kernel = params["heads"][1]["classifier"]["linear"]["kernel"]
    kernel[...] = jnp.asarray(np.random.default_rng(0).normal(size=kernel.shape), jnp.float32)
    phase = schedulers.Phase("sequential", 1, 1)
    trainable = {0: schedulers.select(params, [1], [1])}
    grads = jax.grad(lambda t: schedulers.phase_loss(net, objective, phase, t, params, stats, x, labels)[0])(trainable)

    h = jax.lax.stop_gradient(net.frozen_forward(0, params, stats, x))
    target = objectives.similarity_matrix(jax.nn.one_hot(labels, 5))

    def parts(stage_params, head_params):
        t, _ = net.apply("stages", 1, {**params, "stages": [params["stages"][0], stage_params]}, stats, h, train=True)
        head = nnx.merge(net.train_defs["heads"][1], head_params, stats["heads"][1], copy=True)
        ce = jnp.mean(objectives.cross_entropy(head.classifier(t), labels))
        sim = jnp.mean((objectives.similarity_matrix(head.extras["similarity"](t)) - target) ** 2)
        return ce, sim

    def stage_loss(stage_params):
        ce, sim = parts(stage_params, params["heads"][1])
        return (1 - beta) * ce + beta * sim

    def head_loss(head_params):
        ce, sim = parts(params["stages"][1], head_params)
        return ce + beta * sim

    expected_stage = jax.grad(stage_loss)(params["stages"][1])
    expected_head = jax.grad(head_loss)(params["heads"][1])
    for got, expected in ((grads[0]["stages"][1], expected_stage), (grads[0]["heads"][1], expected_head)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
    # Both parts reach the stage: neither alone gives its gradient.
    only_sim = jax.grad(lambda p: beta * parts(p, params["heads"][1])[1])(params["stages"][1])
    assert global_norm(jax.tree.map(jnp.subtract, expected_stage, only_sim)) > 1e-3 * global_norm(only_sim)


def test_channel_dropout_drops_whole_channels_and_keeps_the_mean():
    x = jnp.ones((64, 3, 3, 16), jnp.float32)
    y = np.asarray(schedulers.channel_dropout(x, 0.25, jax.random.key(0)))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert (y == y[:, :1, :1, :]).all()  # one draw per sample and channel
    assert abs(float((y[:, 0, 0, :] == 0).mean()) - 0.25) < 0.05
    np.testing.assert_array_equal(schedulers.channel_dropout(x, 0.0, jax.random.key(0)), x)


def test_dropout_reaches_the_next_stage_but_not_the_objective(net):
    x, labels = tiny_batch(9)
    phase = schedulers.Phase("simultaneous", None, 1)
    params, stats = net.initial_params, net.initial_batch_stats
    run = functools.partial(schedulers.phase_loss, net, objectives.CrossEntropy(), phase, {}, params, stats, x, labels)
    _, (plain, _) = run()
    _, (dropped, _) = run(dropout_rate=0.5, dropout_key=jax.random.key(3))
    # The first stage sees the images as they are; later stages see their input with channels dropped.
    np.testing.assert_array_equal(plain[0]["logits"], dropped[0]["logits"])
    assert not np.array_equal(plain[1]["logits"], dropped[1]["logits"])


def test_single_stage_sequential_ce_equals_end_to_end():
    net = tiny_network(num_groups=1)
    optimizer = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
    ce = objectives.CrossEntropy(label_smoothing=0.1)
    states = {}
    for name in ("sequential", "end_to_end"):
        phase = schedulers.make_phases(name, 1, 1)[0]
        step = jax.jit(lambda s, x, y, phase=phase: schedulers.train_step(net, ce, [optimizer], phase, s, x, y))
        state = initial_state(net, name, optimizer)
        for seed in range(3):
            state, metrics = step(state, *tiny_batch(seed))
        states[name] = (state, metrics)
    (seq, seq_metrics), (e2e, e2e_metrics) = states["sequential"], states["end_to_end"]
    assert leaves_equal(seq.params, e2e.params)
    assert leaves_equal(seq.batch_stats, e2e.batch_stats)
    np.testing.assert_array_equal(seq_metrics["loss"], e2e_metrics["loss"])


def test_a_nonfinite_loss_leaves_the_state_unchanged(net):
    optimizer = optax.sgd(0.1)
    state = initial_state(net, "sequential", optimizer)
    phase = schedulers.Phase("sequential", 0, 1)
    x, labels = tiny_batch(5)
    new_state, _ = schedulers.train_step(net, DIB, [optimizer] * NUM_STAGES, phase, state, x.at[0].set(jnp.nan), labels)
    assert int(new_state.nonfinite_step) == 0
    assert leaves_equal(state.params, new_state.params)
    assert leaves_equal(state.batch_stats, new_state.batch_stats)


def test_eval_logits_run_stages_only_as_far_as_the_highest_head(net):
    x, _ = tiny_batch(6)
    state = initial_state(net, "sequential", optax.sgd(0.1))
    logits = schedulers.eval_logits(net, state, x, (1,))
    assert set(logits) == {1} and logits[1].shape == (16, 5)
    all_logits = schedulers.eval_logits(net, state, x, (0, 1, 3))
    np.testing.assert_allclose(all_logits[1], logits[1], rtol=1e-6)
    # Inference mode: a sample's logits do not depend on the rest of the batch.
    np.testing.assert_allclose(schedulers.eval_logits(net, state, x[:4], (3,))[3], all_logits[3][:4], rtol=1e-5)


def frozen_prefix_peaks(monkeypatch, materialized: bool) -> list[int]:
    """Compiled memory of the sequential steps of ResNet-32's first-group blocks 2-5 (identical blocks, one per
    stage, linear heads): each step runs 1-4 frozen blocks before the trained one."""
    if not materialized:
        monkeypatch.setattr(models, "materialize", lambda x, guard=None: x)
    config = {"name": "resnet32", "width": 4, "split": "block", "head": "linear"}
    net = schedulers.FunctionalModel(models.build_model(config, 5, nnx.Rngs(0, params=jax.random.key(0, impl="rbg"))))
    optimizer = optax.sgd(0.1)
    state = jax.eval_shape(lambda: initial_state(net, "sequential", optimizer))
    images = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((64,), jnp.int32)
    peaks = []
    for phase in schedulers.make_phases("sequential", net.num_stages, 1)[1:5]:
        step = functools.partial(
            schedulers.train_step, net, objectives.CrossEntropy(), [optimizer] * net.num_stages, phase
        )
        with models.native_convolutions():
            compiled = jax.jit(step).lower(state, images, labels).compile()
        analysis = compiled.memory_analysis()
        peaks.append(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)
    return peaks


def test_a_frozen_prefix_holds_no_memory_of_its_depth(monkeypatch):
    peaks = frozen_prefix_peaks(monkeypatch, materialized=True)
    assert max(peaks) <= 1.02 * min(peaks), peaks
    # The same steps without materialised unit outputs: XLA recomputes the residual chain and its memory grows.
    unmaterialized = frozen_prefix_peaks(monkeypatch, materialized=False)
    assert unmaterialized[-1] > 1.1 * unmaterialized[0], unmaterialized
