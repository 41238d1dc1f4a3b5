import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dibjax import models as M

NUM_CLASSES = 10
WIDTH = 4  # one tiny width everywhere, so every parameter shape and eager op compiles once
BATCH = 2

# (stages for split="layer", stages for split="block") of each model.
EXPECTED_STAGES = {
    "small_cnn": (4, 4),
    "vgg11": (8, 5),
    "vgg13": (10, 5),
    "vgg16": (13, 5),
    "resnet18": (8, 8),
    "resnet20": (9, 9),
    "resnet32": (15, 15),
    "resnet56": (27, 27),
    "resnet110": (54, 54),
}


def rngs(seed=0):
    # The rbg generator compiles its per-shape initialisers several times faster than the default threefry on CPU,
    # and a model has many parameter shapes.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def config(**fields):
    return ml_collections.ConfigDict({"width": WIDTH, **fields})


@functools.cache
def shared_model(name, split):
    """One model per (name, split), built once and shared by the tests that only read it (training-mode BatchNorm)."""
    return M.build_model(config(name=name, split=split, num_groups=3), NUM_CLASSES, rngs())


def images(seed=0, batch=BATCH, size=32):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), dtype=jnp.float32)


def bn_layers(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]


def test_models_tuple_matches_expectations():
    assert set(M.MODELS) == set(EXPECTED_STAGES)
    assert set(M.DEFAULT_WIDTHS) == set(M.MODELS)


# ----------------------------------------------------------------------------- shapes, stages, composition


# ResNet-110 is ResNet-56's code with twice the blocks, eagerly a minute and a half here: run with -m slow.
COMPOSED = [pytest.param(name, marks=pytest.mark.slow) if name == "resnet110" else name for name in M.MODELS]


# split="activations" builds its stages as "groups" does, only with other cut points (covered below, abstractly).
@pytest.mark.parametrize("split", ["layer", "block", "groups"])
@pytest.mark.parametrize("name", COMPOSED)
def test_stages_compose_to_the_network(name, split):
    model = shared_model(name, split)
    expected = {"layer": EXPECTED_STAGES[name][0], "block": EXPECTED_STAGES[name][1], "groups": 3}[split]
    assert model.num_stages == expected == len(model.stages) == len(model.heads)

    x = images()
    logits = model(x)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))

    feats = model.features(x)
    assert len(feats) == model.num_stages
    t = x
    for k, f in enumerate(feats):
        t = model.stage_forward(k, t)
        np.testing.assert_array_equal(t, f)
        assert f.dtype == jnp.float32
        assert model.head_forward(k, f).shape == (BATCH, NUM_CLASSES)
    np.testing.assert_array_equal(model.head_forward(model.num_stages - 1, feats[-1]), logits)


def abstract_model(**fields):
    # eval_shape builds the model without initialising any parameter: enough to inspect its structure
    return nnx.eval_shape(lambda: M.build_model(config(**fields), NUM_CLASSES, rngs()))


def test_resnets_in_infopros_local_modules():
    # Residual blocks per module, read off the cut points of InfoPro's networks/configs.py (the stem in module 1).
    published = {
        ("resnet32", 2): (7, 8),
        ("resnet32", 3): (5, 5, 5),
        ("resnet32", 4): (3, 4, 4, 4),
        ("resnet32", 8): (1, 2, 2, 2, 2, 2, 2, 2),
        ("resnet110", 2): (27, 27),
        ("resnet110", 3): (18, 18, 18),
        ("resnet110", 4): (12, 14, 14, 14),
        ("resnet110", 8): (5, 7, 7, 7, 7, 7, 7, 7),
        ("resnet110", 16): (2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4),
    }
    for (name, modules), blocks in published.items():
        assert M.stage_sizes(config(name=name, split="groups", num_groups=modules)) == blocks, (name, modules)
    model = abstract_model(name="resnet110", split="groups", num_groups=4)
    assert [len(units) for units in model.stage_units] == [12, 14, 14, 14]
    assert model.stage_units[0][0] == "stem+block1_1" and model.stage_units[-1][-1] == "block3_18"
    # Splits InfoPro does not publish are as even as possible, the earlier groups taking the extra units.
    assert M.stage_sizes(config(name="resnet110", split="groups", num_groups=5)) == (11, 11, 11, 11, 10)
    with pytest.raises(ValueError, match="stem alone"):
        M.stage_sizes(config(name="resnet32", split="groups", num_groups=16))


def test_stage_units_cover_the_network_in_order():
    for name in M.MODELS:
        by_layer = abstract_model(name=name, split="layer").stage_units
        assert all(len(units) == 1 for units in by_layer)
        for split in ("block", "groups"):
            staged = abstract_model(name=name, split=split, num_groups=3).stage_units
            assert list(itertools.chain(*staged)) == list(itertools.chain(*by_layer)), (name, split)
        staged = abstract_model(name=name, split="activations", num_groups=3).stage_units
        assert list(itertools.chain(*staged)) == list(itertools.chain(*by_layer)), (name, "activations")


def test_block_boundaries():
    vgg16 = abstract_model(name="vgg16", split="block")
    assert [len(u) for u in vgg16.stage_units] == [2, 2, 3, 3, 3]
    assert all(units[-1].endswith("+pool") for units in vgg16.stage_units)
    resnet20 = abstract_model(name="resnet20", split="block")
    assert resnet20.stage_units[0] == ("stem+block1_1",)
    resnet20_groups = abstract_model(name="resnet20", split="groups", num_groups=3)
    # three even groups of a ResNet-20 are exactly its three resolutions, as InfoPro's K = 3
    assert [units[0] for units in resnet20_groups.stage_units] == ["stem+block1_1", "block2_1", "block3_1"]


def test_feature_shapes():
    x = images()
    small = M.build_model(config(name="small_cnn"), NUM_CLASSES, rngs())
    assert [f.shape for f in small.features(x)] == [(2, 16, 16, 4), (2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 32)]
    vgg11 = M.build_model(config(name="vgg11", split="block"), NUM_CLASSES, rngs())
    assert [f.shape for f in vgg11.features(x)] == [
        (2, 16, 16, 4),
        (2, 8, 8, 8),
        (2, 4, 4, 16),
        (2, 2, 2, 32),
        (2, 1, 1, 32),
    ]
    resnet20 = M.build_model(config(name="resnet20"), NUM_CLASSES, rngs())
    shapes = [f.shape for f in resnet20.features(x)]
    assert shapes == [(2, 32, 32, 4)] * 3 + [(2, 16, 16, 8)] * 3 + [(2, 8, 8, 16)] * 3
    resnet18 = M.build_model(config(name="resnet18"), NUM_CLASSES, rngs())
    shapes = [f.shape for f in resnet18.features(x)]
    assert shapes == [(2, 32, 32, 4)] * 2 + [(2, 16, 16, 8)] * 2 + [(2, 8, 8, 16)] * 2 + [(2, 4, 4, 32)] * 2


def test_split_evenly():
    assert M.split_evenly(8, 3) == (3, 3, 2)
    assert M.split_evenly(9, 3) == (3, 3, 3)
    assert M.split_evenly(27, 4) == (7, 7, 7, 6)
    assert M.split_evenly(5, 5) == (1,) * 5
    assert M.split_evenly(5, 1) == (5,)


def test_groups_stage_sizes():
    assert [len(u) for u in abstract_model(name="vgg11", split="groups", num_groups=3).stage_units] == [3, 3, 2]
    assert abstract_model(name="vgg11", split="groups", num_groups=8).num_stages == 8
    assert abstract_model(name="small_cnn", split="groups", num_groups=np.int64(1)).num_stages == 1


def test_split_balanced_is_the_best_contiguous_split():
    # every contiguous split, enumerated: the dynamic programme must find the smallest largest group
    generator = np.random.default_rng(0)
    for num_units in range(1, 8):
        for num_groups in range(1, num_units + 1):
            sizes = generator.integers(1, 20, num_units).tolist()
            groups = M.split_balanced(sizes, num_groups)
            assert len(groups) == num_groups and sum(groups) == num_units and min(groups) >= 1
            best = min(
                max(sum(sizes[i:j]) for i, j in zip((0, *cuts), (*cuts, num_units), strict=True))
                for cuts in itertools.combinations(range(1, num_units), num_groups - 1)
            )
            bounds = np.cumsum((0, *groups))
            assert max(sum(sizes[i:j]) for i, j in itertools.pairwise(bounds)) == best, (sizes, num_groups)


def test_split_balanced_with_equal_sizes_is_split_evenly():
    for num_units in range(1, 30):
        for num_groups in range(1, num_units + 1):
            assert M.split_balanced([3] * num_units, num_groups) == M.split_evenly(num_units, num_groups)


def test_unit_activation_sizes_count_every_convolution_output():
    # Recorded from the networks themselves: every nnx.Conv's output channels × pixels, unit by unit, at width 1.
    recorded = []
    original = nnx.Conv.__call__

    def recording(self, x):
        y = original(self, x)
        recorded[-1] += int(np.prod(y.shape[1:]))
        return y

    def run(name):
        arch = M.architecture_for(name, 1, batchnorm=True, rngs=rngs())
        x = jnp.zeros((1, 32, 32, 3))
        for unit in arch.units:
            recorded.append(0)
            for layer in unit.layers:
                x = layer(x)

    for name in M.MODELS:
        recorded.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(nnx.Conv, "__call__", recording)
            nnx.eval_shape(lambda name=name: run(name))
        assert tuple(recorded) == M.architectures.unit_activation_sizes(name), name


def test_resnet110_in_k_modules_balanced_by_activations():
    sizes = M.architectures.unit_activation_sizes("resnet110")
    total = sum(sizes)
    for modules, expected in ((2, (16, 38)), (4, (8, 8, 14, 24))):
        blocks = M.stage_sizes(config(name="resnet110", split="activations", num_groups=modules))
        assert blocks == expected
        bounds = np.cumsum((0, *blocks))
        share = max(sum(sizes[i:j]) for i, j in itertools.pairwise(bounds)) / total
        by_blocks = np.cumsum((0, *M.split_evenly(54, modules)))
        share_by_blocks = max(sum(sizes[i:j]) for i, j in itertools.pairwise(by_blocks)) / total
        # A contiguous split can always keep every module within one unit of total / K; the first module of a
        # block-balanced split holds 71% (K = 2) and 44% (K = 4) of the activations.
        assert share <= 1 / modules + max(sizes) / total < share_by_blocks, (modules, share, share_by_blocks)
    model = abstract_model(name="resnet110", split="activations", num_groups=4)
    assert model.stage_units[0][-1] == "block1_8" and model.stage_units[-1][-1] == "block3_18"


# ----------------------------------------------------------------------------- published sizes


@pytest.mark.parametrize(
    ("name", "backbone_params"),
    [
        # He et al. (2016), Table 6: 0.27M, 0.85M and 1.7M; the 18-layer network and VGG-11/16 with BatchNorm and the
        # single linear classifier of the usual CIFAR versions (no convolution biases, as BatchNorm follows).
        ("resnet20", 269_722),
        ("resnet56", 853_018),
        ("resnet110", 1_727_962),  # 464 stem + 84,096 + 329,472 + 1,313,280 in the groups + 650 classifier
        ("resnet18", 11_173_962),
        ("vgg11", 9_228_362),
        ("vgg16", 14_724_042),
    ],
)
def test_published_parameter_counts(name, backbone_params):
    model = abstract_model(name=name, width=None)
    auxiliary = M.count_params(model.heads) - M.count_params(model.heads[-1])
    assert M.count_params(model) - auxiliary == backbone_params


def test_count_params_small_cnn():
    model = M.build_model(config(name="small_cnn"), NUM_CLASSES, rngs())
    convs = 3 * 3 * (3 * 4 + 4 * 8 + 8 * 16 + 16 * 32)  # no bias: BatchNorm follows
    bn = 2 * (4 + 8 + 16 + 32)
    heads = (4 + 8 + 16 + 32) * NUM_CLASSES + 4 * NUM_CLASSES
    assert M.count_params(model) == convs + bn + heads
    assert M.count_params(model, nnx.BatchStat) == bn


# ----------------------------------------------------------------------------- BatchNorm modes


def test_eval_mode_is_per_example_and_train_mode_updates_statistics():
    model = M.build_model(config(name="small_cnn", head="conv", head_width=8), NUM_CLASSES, rngs())
    x = images(0)
    y = x.at[1:].set(images(1)[1:])  # same first image, a different companion

    stats0 = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    out_x, out_y = model(x), model(y)
    # training mode normalises with batch statistics: an output depends on the rest of the batch...
    assert not np.allclose(out_x[0], out_y[0])
    # ...and every running mean and variance on the path moves (the auxiliary heads are not on it)
    stats1 = nnx.state(model, nnx.BatchStat)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), stats0, stats1)
    assert all(jax.tree.leaves(moved["stages"])) and all(jax.tree.leaves(moved["heads"][3]))
    assert not any(jax.tree.leaves(moved["heads"][0]))

    model.eval()
    assert all(bn.use_running_average for bn in bn_layers(model))
    stats1 = jax.tree.map(np.array, stats1)
    np.testing.assert_allclose(model(x)[0], model(y)[0], rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, stats1, jax.tree.map(np.array, nnx.state(model, nnx.BatchStat)))

    model.train()
    assert not any(bn.use_running_average for bn in bn_layers(model))


# ----------------------------------------------------------------------------- heads and plain networks


@pytest.mark.parametrize("name", ["small_cnn", "vgg11", "resnet20"])
@pytest.mark.parametrize("head_hidden", [0, 6])
def test_conv_head(name, head_hidden):
    cfg = config(name=name, split="block", head="conv", head_width=8, head_hidden=head_hidden)
    model = M.build_model(cfg, NUM_CLASSES, rngs())
    assert all(isinstance(h, M.ConvHead) for h in model.heads)
    assert all((h.hidden is not None) == (head_hidden > 0) for h in model.heads)
    logits = model(images())
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert np.all(np.isfinite(logits))


def test_conv_head_sized_to_its_stage():
    model = M.build_model(config(name="small_cnn", head="conv", head_width=0), NUM_CLASSES, rngs())
    stage_channels = [WIDTH * m for m in (1, 2, 4, 8)]
    assert [h.conv.out_features for h in model.heads] == stage_channels
    assert [h.conv.in_features for h in model.heads] == stage_channels


def test_conv_head_pools_large_maps_before_its_convolution():
    t = jax.random.normal(jax.random.key(1), (BATCH, 16, 16, 6))
    pooled = M.ConvHead(6, NUM_CLASSES, width=5, pool=4, rngs=rngs())
    plain = M.ConvHead(6, NUM_CLASSES, width=5, pool=0, rngs=rngs())  # the same parameters
    np.testing.assert_allclose(pooled(t), plain(t.reshape(BATCH, 4, 4, 4, 4, 6).mean(axis=(2, 4))), rtol=1e-5)
    small = t[:, :4, :4]  # no larger than the pool: left as it is
    np.testing.assert_array_equal(pooled(small), plain(small))


def test_conv_heads_pool_to_8x8_by_default():
    model = abstract_model(name="resnet20", head="conv")
    assert [h.pool for h in model.heads] == [8] * 9
    assert [h.pool for h in abstract_model(name="resnet20", head="conv", head_pool=0).heads] == [0] * 9


def test_prediction_pool_follows_the_authors_rule():
    # Kernels for VGG8b's blocks at --dim-in-decoder 2048, from the loop in anokland/local-loss's LocalLossBlockConv.
    table = {(128, 32): (8, 8), (256, 32): (16, 8), (256, 16): (8, 4), (512, 16): (8, 8), (512, 8): (4, 4)}
    table |= {(512, 4): (2, 2)}
    for (channels, size), kernel in table.items():
        assert M.layers.prediction_pool(channels, size, 2048) == (kernel, (0, 0))
    # A size the kernel does not divide: the padding centres the last window.
    assert M.layers.prediction_pool(4, 6, 24) == ((4, 2), (2, 0))


def np_avg_pool_including_padding(x, kernel, padding):
    """PyTorch's AvgPool2d(kernel, padding=padding) (stride = kernel, padded zeros counted), NHWC, in NumPy."""
    (kh, kw), (ph, pw) = kernel, padding
    x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // kh + 1, (x.shape[2] - kw) // kw + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            out[:, i, j] = x[:, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw].sum(axis=(1, 2)) / (kh * kw)
    return out


@pytest.mark.parametrize(("channels", "size", "max_features"), [(4, 6, 16), (8, 16, 32), (3, 4, 64)])
def test_prediction_head_pools_as_the_authors_then_applies_a_zero_initialised_linear_layer(
    channels, size, max_features
):
    head = M.PredictionHead(channels, size, NUM_CLASSES, max_features=max_features, rngs=rngs())
    assert float(jnp.max(jnp.abs(head.linear.kernel[...]))) == 0.0
    t = np.random.default_rng(3).normal(size=(BATCH, size, size, channels)).astype(np.float32)
    np.testing.assert_allclose(head(jnp.asarray(t)), jnp.broadcast_to(head.linear.bias[...], (BATCH, NUM_CLASSES)))
    head.linear.kernel[...] = jnp.asarray(np.random.default_rng(4).normal(size=head.linear.kernel.shape))
    pooled = np_avg_pool_including_padding(t, head.kernel, head.padding)
    assert pooled.shape[1] * pooled.shape[2] * channels <= max_features
    expected = pooled.reshape(BATCH, -1) @ np.asarray(head.linear.kernel[...]) + np.asarray(head.linear.bias[...])
    np.testing.assert_allclose(head(jnp.asarray(t)), expected, rtol=1e-4, atol=1e-5)


def test_heads_carry_the_similarity_convolution():
    model = M.build_model(config(name="small_cnn", head="prediction", head_extras=("similarity",)), NUM_CLASSES, rngs())
    x = images()
    features = model.features(x)
    for k, (head, t) in enumerate(zip(model.heads, features, strict=True)):
        assert isinstance(head, M.HeadWithExtras) and isinstance(head.classifier, M.PredictionHead)
        logits, extras = head.outputs(t, t)
        np.testing.assert_array_equal(logits, head(t))
        assert extras["similarity"].shape == t.shape, k
        assert head.extras["similarity"].bias is None
    assert model(x).shape == (BATCH, NUM_CLASSES)


def test_linear_head_is_default():
    model = M.build_model(ml_collections.ConfigDict({"name": "small_cnn", "width": WIDTH}), NUM_CLASSES, rngs())
    assert all(isinstance(h, M.LinearHead) for h in model.heads)
    assert model.num_stages == 4  # split="layer" by default


@pytest.mark.parametrize("name", ["small_cnn", "vgg11", "resnet18", "resnet20"])
@pytest.mark.parametrize("head", M.HEADS)
def test_batchnorm_false_builds_a_plain_network(name, head):
    model = M.build_model(config(name=name, head=head, head_width=8, batchnorm=False), NUM_CLASSES, rngs())
    assert bn_layers(model) == []
    assert jax.tree.leaves(nnx.state(model, nnx.BatchStat)) == []
    logits = model(images())
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert np.all(np.isfinite(logits))
    with_bn = M.build_model(config(name=name, head=head, head_width=8), NUM_CLASSES, rngs())
    assert len(bn_layers(with_bn)) > 0


def test_adaptive_avg_pool():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    expected = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(M.adaptive_avg_pool(x, 2), expected)
    one = jnp.ones((2, 1, 1, 3), jnp.float32) * jnp.arange(3, dtype=jnp.float32)
    np.testing.assert_array_equal(M.adaptive_avg_pool(one, 2), jnp.broadcast_to(one, (2, 2, 2, 3)))
    # 3 → 2 uses the overlapping bins [0, 2) and [1, 3), as PyTorch does
    three = jnp.arange(9, dtype=jnp.float32).reshape(1, 3, 3, 1)
    np.testing.assert_allclose(M.adaptive_avg_pool(three, 2)[0, :, :, 0], [[2.0, 3.0], [5.0, 6.0]])


# ----------------------------------------------------------------------------- gradients between stages


def test_features_stop_gradient():
    model = M.build_model(config(name="small_cnn"), NUM_CLASSES, rngs())
    x = images()

    def grads(stop_gradient):
        def loss(m):
            return jnp.sum(m.features(x, stop_gradient=stop_gradient)[1] ** 2)

        return nnx.jit(nnx.grad(loss))(model)

    stopped, full = grads(True), grads(False)
    assert all(np.all(g == 0) for g in jax.tree.leaves(stopped["stages"][0]))
    assert any(np.any(g != 0) for g in jax.tree.leaves(full["stages"][0]))
    assert any(np.any(g != 0) for g in jax.tree.leaves(stopped["stages"][1]))


# ----------------------------------------------------------------------------- jit


def test_nnx_jit_forward_and_stage():
    model = M.build_model(config(name="small_cnn"), NUM_CLASSES, rngs())
    x = images()
    eager = model(x)
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(forward(model, x), eager, rtol=1e-5, atol=1e-5)

    stage = nnx.jit(lambda m, k, x: m.stage_forward(k, x), static_argnums=1)
    np.testing.assert_allclose(stage(model, 0, x), model.stage_forward(0, x), rtol=1e-5, atol=1e-5)

    # batch statistics updated inside the jitted call are written back to the model
    before = np.array(model.stages[0].layers[0].bn.mean[...])
    forward(model, x)
    assert not np.allclose(before, model.stages[0].layers[0].bn.mean[...])


def test_split_merge_jax_jit():
    model = M.build_model(config(name="small_cnn"), NUM_CLASSES, rngs())
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x = images()
    expected = model(x)
    stats0 = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))

    @jax.jit
    def apply(params, batch_stats, x):
        m = nnx.merge(graphdef, params, batch_stats)
        logits = m(x)
        return logits, nnx.state(m, nnx.BatchStat)

    logits, new_stats = apply(params, stats0, x)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
    assert not any(jax.tree.leaves(jax.tree.map(np.allclose, new_stats, stats0)))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("fields", "bad", "accepted"),
    [
        ({"name": "vgg19"}, "'vgg19'", "'resnet56'"),
        ({"name": "small_cnn", "split": "layers"}, "'layers'", "'groups'"),
        ({"name": "small_cnn", "head": "mlp"}, "'mlp'", "'conv'"),
        ({"name": "vgg11", "split": "groups", "num_groups": 9}, "9", "between 1 and 8"),
        ({"name": "vgg11", "split": "groups", "num_groups": 0}, "0", "between 1 and 8"),
        ({"name": "vgg11", "split": "groups"}, "num_groups", "between 1 and 8"),
        ({"name": "resnet20", "split": "groups", "num_groups": 10}, "10", "between 1 and 9"),
        ({"name": "resnet20", "split": "groups", "num_groups": 1.5}, "1.5", "between 1 and 9"),
        ({"name": "resnet20", "split": "activations", "num_groups": 10}, "10", "between 1 and 9"),
        ({"name": "resnet20", "split": "activations"}, "num_groups", "between 1 and 9"),
        ({"name": "small_cnn", "width": 0}, "0", ">= 1"),
        ({"name": "small_cnn", "width": 2.5}, "2.5", "int"),
        ({"name": "small_cnn", "batchnorm": "yes"}, "'yes'", "True or False"),
        ({"name": "small_cnn", "head": "conv", "head_hidden": -1}, "-1", ">= 0"),
        ({"name": "small_cnn", "head": "conv", "head_pool": -2}, "-2", ">= 0"),
        ({"name": "small_cnn", "head": "conv", "head_width": -1}, "-1", ">= 0"),
        ({"name": "small_cnn", "head_extras": ("reconstruction",)}, "reconstruction", "projection"),
        ({"name": "small_cnn", "head_extras": "similarity"}, "'similarity'", "a tuple"),
        ({"name": "small_cnn", "head": "prediction", "head_features": 0}, "0", ">= 1"),
    ],
)
def test_bad_config_raises(fields, bad, accepted):
    with pytest.raises(ValueError) as info:
        M.build_model(config(**fields), NUM_CLASSES, rngs())
    assert bad in str(info.value)
    assert accepted in str(info.value)


def test_bad_num_classes_and_stage_index():
    with pytest.raises(ValueError, match="num_classes"):
        M.build_model({"name": "small_cnn", "width": WIDTH}, 0, rngs())
    model = M.build_model({"name": "small_cnn", "width": WIDTH}, NUM_CLASSES, rngs())
    with pytest.raises(IndexError, match="4 stages"):
        model.stage_forward(4, images())
    with pytest.raises(IndexError, match="-1"):
        model.head_forward(-1, images())


def test_cpu_convolution_path_equals_the_native_convolution():
    from dibjax.models import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=layers._NHWC_HWIO, precision="highest")

    def loss(conv, w, x):
        return jnp.sum(jnp.sin(conv(x, w, **args)))

    ours = jax.value_and_grad(lambda w, x: loss(layers.conv_general_dilated, w, x), argnums=(0, 1))(w, x)
    native = jax.value_and_grad(lambda w, x: loss(jax.lax.conv_general_dilated, w, x), argnums=(0, 1))(w, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours, native)
    jaxpr = str(jax.make_jaxpr(lambda w, x: layers.conv_general_dilated(x, w, **args))(w, x))
    assert "platform_index" in jaxpr  # the patches path is taken on CPU, the native one elsewhere


def test_max_pool_matches_reduce_window():
    from dibjax.models import layers

    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 6, 3)), jnp.float32)
    expected = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(layers.max_pool_2x2(x), expected)
    odd = x[:, :7, :5]
    np.testing.assert_array_equal(
        layers.max_pool_2x2(odd), nnx.max_pool(odd, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    )


def test_native_convolutions_context_selects_the_native_convolution_when_traced():
    from dibjax.models import layers

    x = jnp.ones((1, 4, 4, 2), jnp.float32)
    w = jnp.ones((3, 3, 2, 3), jnp.float32)
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=layers._NHWC_HWIO)
    with M.native_convolutions():
        inside = str(jax.make_jaxpr(lambda w, x: layers.conv_general_dilated(x, w, **args))(w, x))
    outside = str(jax.make_jaxpr(lambda w, x: layers.conv_general_dilated(x, w, **args))(w, x))
    assert "platform_index" not in inside and "conv_general_dilated" in inside
    assert "platform_index" in outside


def test_bfloat16_compute_keeps_float32_parameters_and_tracks_float32_outputs():
    fields = dict(name="small_cnn", head="conv", head_width=8)
    model32 = M.build_model(config(**fields), NUM_CLASSES, rngs())
    model16 = M.build_model(config(dtype="bfloat16", **fields), NUM_CLASSES, rngs())
    params32, params16 = nnx.state(model32, nnx.Param), nnx.state(model16, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float32)}
    jax.tree.map(np.testing.assert_array_equal, params32, params16)
    x = images()
    logits32, logits16 = model32(x), model16(x)
    assert logits16.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(logits32)))
    np.testing.assert_allclose(np.asarray(logits16, np.float32), logits32, atol=0.05 * scale)
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        M.build_model(config(dtype="float16", **fields), NUM_CLASSES, rngs())


def test_materialize_is_the_identity():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    np.testing.assert_array_equal(jax.jit(M.materialize)(x), x)
    np.testing.assert_array_equal(M.materialize(x), x)
    np.testing.assert_array_equal(jax.jit(M.materialize)(x, jnp.ones(3)), x)
    poisoned = x.at[0, 0, 0, 0].set(jnp.nan)
    assert np.all(np.isnan(jax.jit(M.materialize)(poisoned)))  # the documented NaN branch, on CPU
    assert np.all(np.isnan(jax.jit(M.materialize)(x, jnp.full(3, jnp.nan))))


def test_bilinear_matrix_aligns_corners():
    np.testing.assert_allclose(
        M.layers.bilinear_matrix(2, 4), [[1, 0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0, 1]], rtol=1e-6, atol=1e-7
    )
    # Every row sums to 1; corners map to corners.
    m = M.layers.bilinear_matrix(8, 32)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
    assert m[0, 0] == 1.0 and m[-1, -1] == 1.0
    np.testing.assert_array_equal(M.layers.bilinear_matrix(1, 4), [[1], [1], [1], [1]])


def test_infopro_heads_follow_the_authors_widths_and_strides():
    # ResNet-32's stages: 16 channels at 32×32, 32 at 16×16 and 64 at 8×8 → convolutions 32/s2, 64/s2, 64/s1.
    model = abstract_model(name="resnet32", width=16, split="groups", num_groups=4, head="infopro")
    model_extras = abstract_model(
        name="resnet32", width=16, split="groups", num_groups=4, head="linear", head_extras=("decoder", "projection")
    )
    widths = [(h.conv.in_features, h.conv.out_features, h.conv.strides) for h in model.heads[:-1]]
    assert widths == [(16, 32, (2, 2)), (32, 64, (2, 2)), (64, 64, (1, 1))]
    assert isinstance(model.heads[-1], M.LinearHead)  # the last stage keeps the network's classifier
    assert all(h.linear.out_features == NUM_CLASSES for h in model.heads[:-1])
    for head in model_extras.heads[:-1]:
        assert set(head.extras) == {"decoder", "projection"}
        assert head.extras["projection"].linear.out_features == 128
    assert isinstance(model_extras.heads[-1], M.LinearHead)


def test_decoder_upsamples_to_the_image_and_outputs_probabilities():
    decoder = M.Decoder(6, 32, rngs=rngs())
    t = jax.random.normal(jax.random.key(2), (BATCH, 8, 8, 6))
    y = decoder(t)
    assert y.shape == (BATCH, 32, 32, 3)
    assert float(jnp.min(y)) > 0 and float(jnp.max(y)) < 1


def test_prediction_head_gradient_under_jit_is_the_adjoint_of_its_pool():
    # The head's pool is linear, so the gradient of <head(t), g> is its adjoint applied to W g; built here column by
    # column from the NumPy pool. Differentiating under jit is what training does.
    channels, size = 2, 6
    head = M.PredictionHead(channels, size, NUM_CLASSES, max_features=8, rngs=rngs())
    head.linear.kernel[...] = jnp.asarray(np.random.default_rng(5).normal(size=head.linear.kernel.shape))
    cotangent = np.random.default_rng(6).normal(size=(1, NUM_CLASSES))
    t = np.random.default_rng(7).normal(size=(1, size, size, channels)).astype(np.float32)
    gradient = jax.jit(jax.grad(lambda t: jnp.sum(head(t) * cotangent)))(jnp.asarray(t))
    basis = np.eye(size * size * channels).reshape(-1, 1, size, size, channels)
    pool_matrix = np.stack([np_avg_pool_including_padding(e, head.kernel, head.padding).ravel() for e in basis], 1)
    expected = pool_matrix.T @ (np.asarray(head.linear.kernel[...], np.float64) @ cotangent[0])
    np.testing.assert_allclose(gradient.reshape(-1), expected, rtol=1e-4, atol=1e-5)
