"""The staged-model abstraction: a network cut into stages, each with its own auxiliary classifier."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import jax
from flax import nnx

from dibjax.errors import ConfigError


class StagedModel(nnx.Module):
    """A feed-forward network written as a sequence of stages, with one classifier head per stage.

    A stage is the unit a greedy layer-wise trainer optimises at a time. Stages and heads are indexed from 0: stage
    ``k`` maps the output of stage ``k - 1`` (the image batch for ``k = 0``) to its representation, and head ``k``
    maps that representation to class logits; :meth:`features` returns the representations ``[T_1, ..., T_L]``.
    The head of the last stage is the network's own classifier, so ``model(x)`` is the ordinary end-to-end network
    and the other heads are auxiliary classifiers used only during training.

    BatchNorm layers are created in training mode (batch statistics, running averages updated on every call);
    ``model.eval()`` switches every BatchNorm in the stages and heads to its running averages and ``model.train()``
    switches back. ``nnx.state(model, nnx.Param)`` holds the trainable parameters and
    ``nnx.state(model, nnx.BatchStat)`` the running statistics.

    Attributes:
      stages: ``nnx.List`` of the stage modules.
      heads: ``nnx.List`` of the head modules, one per stage.
      stage_units: for each stage, the names of the architectural units it contains (for logging).
      unit_layers: for each stage, how many of its consecutive layers (``stage.layers`` of a
        :class:`~dibjax.models.layers.Chain`) make up each of its units; one layer per unit unless given.
    """

    def __init__(
        self,
        stages: Sequence[nnx.Module],
        heads: Sequence[nnx.Module],
        *,
        stage_units: Sequence[Sequence[str]] | None = None,
        unit_layers: Sequence[Sequence[int]] | None = None,
    ):
        if len(stages) == 0:
            raise ValueError("a StagedModel needs at least one stage, got 0")
        if len(heads) != len(stages):
            raise ValueError(f"a StagedModel needs one head per stage, got {len(stages)} stages and {len(heads)} heads")
        if stage_units is None:
            stage_units = [(f"stage{k}",) for k in range(len(stages))]
        if len(stage_units) != len(stages):
            raise ValueError(f"stage_units has {len(stage_units)} entries for {len(stages)} stages")
        self.stages = nnx.List(stages)
        self.heads = nnx.List(heads)
        self.stage_units: tuple[tuple[str, ...], ...] = tuple(tuple(names) for names in stage_units)
        if unit_layers is None:
            unit_layers = [(1,) * len(names) for names in self.stage_units]
        unit_layers = tuple(tuple(int(c) for c in counts) for counts in unit_layers)
        if [len(c) for c in unit_layers] != [len(names) for names in self.stage_units]:
            raise ValueError(f"unit_layers {unit_layers} does not give one layer count per unit of {self.stage_units}")
        self.unit_layers: tuple[tuple[int, ...], ...] = unit_layers

    @property
    def num_stages(self) -> int:
        """The number of stages (and of heads)."""
        return len(self.stages)

    def _check_index(self, k: int) -> int:
        try:
            k = operator.index(k)
        except TypeError:
            raise TypeError(f"stage index must be an int, got {type(k).__name__}") from None
        if not 0 <= k < self.num_stages:
            last = self.num_stages - 1
            raise IndexError(f"stage index {k} is out of range for a model with {self.num_stages} stages (0..{last})")
        return k

    def stage_forward(self, k: int, x: jax.Array) -> jax.Array:
        """Applies stage ``k`` alone to ``x``, the output of stage ``k - 1`` (the image batch for ``k = 0``)."""
        return self.stages[self._check_index(k)](x)

    def head_forward(self, k: int, t: jax.Array) -> jax.Array:
        """Applies head ``k`` to ``t``, the output of stage ``k``, giving logits of shape (batch, num_classes)."""
        return self.heads[self._check_index(k)](t)

    def features(self, x: jax.Array, *, stop_gradient: bool = False) -> list[jax.Array]:
        """Returns the representations ``[T_1, ..., T_L]``, the outputs of every stage in order.

        With ``stop_gradient=True`` no gradient flows from a stage back into the stages before it, so a loss on
        every ``T_k`` trains each stage only through its own term, as in decoupled greedy training.
        """
        outputs = []
        for stage in self.stages:
            if stop_gradient and outputs:
                x = jax.lax.stop_gradient(x)
            x = stage(x)
            outputs.append(x)
        return outputs

    def __call__(self, x: jax.Array) -> jax.Array:
        """The end-to-end network: every stage in order, then the last head. Returns (batch, num_classes) logits."""
        for stage in self.stages:
            x = stage(x)
        return self.heads[-1](x)


def _checked_num_groups(num_groups, num_units: int) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise ConfigError(f"num_groups must be an int between 1 and {num_units}, got {num_groups!r}")
    if not 1 <= num_groups <= num_units:
        raise ConfigError(
            f"num_groups={num_groups} is out of range: this model has {num_units} units, "
            f"so num_groups must be between 1 and {num_units}"
        )
    return int(num_groups)


def split_evenly(num_units: int, num_groups: int) -> tuple[int, ...]:
    """Sizes of ``num_groups`` contiguous groups covering ``num_units`` units as evenly as possible.

    Sizes differ by at most one; the earlier groups take the extra units (as ``numpy.array_split`` does), so
    ``split_evenly(8, 3) == (3, 3, 2)``.
    """
    num_groups = _checked_num_groups(num_groups, num_units)
    base, extra = divmod(num_units, num_groups)
    return tuple(base + 1 if g < extra else base for g in range(num_groups))


def split_balanced(sizes: Sequence[float], num_groups: int) -> tuple[int, ...]:
    """Unit counts of ``num_groups`` contiguous groups of units whose largest total ``sizes`` is as small as possible.

    The linear partition problem, solved exactly by dynamic programming over the prefix sums (O(K·n²) for n units
    and K groups). The smallest largest total rarely fixes the split alone, so among the splits that reach it the one
    with the least sum of squared group totals (the most even) is taken, and among those the one whose earlier
    groups are longest. With equal sizes it gives :func:`split_evenly`'s groups; with the units' activation sizes
    (:func:`dibjax.models.architectures.unit_activation_sizes`) it balances the stages' memory rather than their
    depth, so a ResNet's first module, whose blocks work at the largest resolution, gets fewer of them.
    """
    num_units = len(sizes)
    num_groups = _checked_num_groups(num_groups, num_units)
    prefix = [0.0]
    for size in sizes:
        prefix.append(prefix[-1] + float(size))

    def best_split(cost_of_groups, limit):
        # cost[k][j]: the least cost of the first j units cut into k groups none above `limit`; cut[k][j]: where the
        # last of them starts. Cut points are scanned from the right and replaced only when strictly better, so the
        # last group is the shortest among equally good splits, and by induction the earlier groups the longest.
        inf = float("inf")
        cost = [[inf] * (num_units + 1) for _ in range(num_groups + 1)]
        cut = [[0] * (num_units + 1) for _ in range(num_groups + 1)]
        cost[0][0] = 0.0
        for k in range(1, num_groups + 1):
            for j in range(k, num_units - (num_groups - k) + 1):
                for i in range(j - 1, k - 2, -1):
                    total = prefix[j] - prefix[i]
                    if total > limit:
                        break  # longer last groups only grow
                    candidate = cost_of_groups(cost[k - 1][i], total)
                    if candidate < cost[k][j]:
                        cost[k][j], cut[k][j] = candidate, i
        groups, end = [], num_units
        for k in range(num_groups, 0, -1):
            groups.append(end - cut[k][end])
            end = cut[k][end]
        return cost[num_groups][num_units], tuple(reversed(groups))

    largest, _ = best_split(max, float("inf"))
    _, groups = best_split(lambda before, total: before + total * total, largest)
    return groups


def count_params(module: nnx.Module, *filters: nnx.filterlib.Filter) -> int:
    """The number of scalar entries in a module's trainable parameters (``nnx.Param``; BatchNorm statistics excluded).

    For a :class:`StagedModel` the count includes every auxiliary head; ``count_params(model.stages)`` counts the
    stages alone. Other variable types are counted by passing filters, e.g. ``count_params(model, nnx.BatchStat)``.
    Works on the abstract models of ``nnx.eval_shape`` too.
    """
    state = nnx.state(module, *(filters or (nnx.Param,)))
    return sum(leaf.size for leaf in jax.tree.leaves(state))
