"""Pluggable importance criteria: which neurons of a layer to keep, and how to re-weight the rest.

Each criterion turns a `LayerView` (the layer's geometry plus a_i = beta_hat * ||p_i||) and a target
(a keep count or an epsilon budget) into a `Selection`. The driver (`driver.py`) does not care which
criterion it runs; the tensor cutting lives in `surgery.py`.

- `CoresetCriterion` (the paper): sensitivity sampling, Algorithm 2, unbiased re-weighting.
- `UniformCriterion`: the same sampling and re-weighting with q uniform (the paper's baseline).
- `TopKCriterion`: the k neurons of largest incoming-weight norm ||[W_l[i,:], b_l[i]]||, no re-weighting.
- `MagnitudeCriterion`: the k neurons of largest outgoing-weight norm ||W_{l+1}[:, i]|| (all kernel taps of
  a conv layer's channel), no re-weighting. Not the same as top-k: a neuron with large incoming weights
  may feed the next layer with tiny ones; magnitude ranks by how much the next layer listens.

Keep-count targets sample "until k distinct" (m is then a stopping time, and the bound pays a union
bound over all m: see theory.md); epsilon targets draw the fixed theory minimum m.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prunecert.errors import ConfigError
from prunecert.prune.bounds import min_sample_size, provable_epsilon
from prunecert.prune.coreset import MAX_DRAWS, Array, Counts, Indices, Sample, probabilities, sample_fixed, sample_until, sensitivities
from prunecert.core.surgery import LayerGeometry


@dataclass
class LayerView:
    """What a criterion sees of one hidden layer."""

    geom: LayerGeometry
    a: Array          # (n,) beta_hat * max(||p_i^f||, ||p_i^g||)
    beta_hat: float
    union: int             # point sets the guarantee covers at once (1, or 2: f's and g's rows)
    delta: float


@dataclass
class Target:
    """Per-layer target: keep exactly `keep` neurons, or meet the provable `epsilon`."""

    keep: int | None = None
    epsilon: float | None = None


@dataclass
class Selection:
    kept: Indices                        # sorted original indices
    scale: Array                    # factor on the next layer's column of each kept neuron
    counts: Counts | None = None         # draw counts (sampling criteria)
    q: Array | None = None          # sampling distribution over all n neurons
    t: float | None = None               # total sensitivity (coreset)
    m: int = 0                           # number of draws
    sequential: bool = False             # m is a stopping time
    eps: Array | None = None        # provable epsilon per next-layer neuron
    extra: dict[str, object] = field(default_factory=dict)


class Criterion:
    """Base class: subclasses implement `select`."""

    name = "criterion"
    provable = False

    def select(self, view: LayerView, target: Target, rng: np.random.Generator) -> Selection:
        raise NotImplementedError


class SamplingCriterion(Criterion):
    """Sampling i.i.d. from q with the unbiased re-weighting count_i / (m q_i)."""

    provable = True

    def probabilities(self, view: LayerView) -> tuple[Array, float | None]:
        raise NotImplementedError

    def select(self, view: LayerView, target: Target, rng: np.random.Generator) -> Selection:
        q, t = self.probabilities(view)
        n, coeffs = view.geom.n, view.geom.coeffs
        if target.epsilon is not None:
            m = min_sample_size(target.epsilon, view.delta, coeffs, view.a, q, union=view.union)
            if m > MAX_DRAWS:
                raise ConfigError(f"epsilon {target.epsilon:g} needs m = {m:,} draws in this layer (more than "
                                  f"{MAX_DRAWS:,}), which would keep all {n} neurons: give a larger epsilon, or "
                                  "--keep / --compression")
            sample = sample_fixed(q, m, rng)
        elif target.keep == n:  # keeping every neuron unchanged is exact: no sampling, eps = 0
            return Selection(np.arange(n), np.ones(n), np.zeros(n, dtype=np.int64), q, t, 0, False, np.zeros(view.geom.next_neurons))
        elif target.keep is not None:
            sample = sample_until(q, target.keep, rng)
        else:
            raise ConfigError("a layer target needs a keep count or an epsilon")
        eps = provable_epsilon(sample.m, view.delta, coeffs, view.a, q, union=view.union,
                               sequential=sample.sequential)
        kept, scale, counts = sample.kept, sample.scale(q), sample.counts
        if target.keep is not None and len(kept) < target.keep:
            kept, scale, counts = _fill_zero_probability(sample, q, scale, int(target.keep))
        return Selection(kept, scale, counts, q, t, sample.m, sample.sequential, eps)


def _fill_zero_probability(sample: Sample, q: Array, scale: Array, k: int
                           ) -> tuple[Indices, Array, Counts]:
    """Top up with neurons of q_i = 0 (they contribute nothing anywhere), kept unchanged (scale 1)."""
    extra = np.flatnonzero(q <= 0)[: k - len(sample.kept)]
    kept = np.concatenate([sample.kept, extra])
    order = np.argsort(kept)
    scale = np.concatenate([scale, np.ones(len(extra))])[order]
    counts = np.concatenate([sample.counts, np.zeros(len(extra), dtype=np.int64)])[order]
    return kept[order], scale, counts


class CoresetCriterion(SamplingCriterion):
    """Sensitivity sampling (Algorithm 2, normalised max over next-layer neurons)."""

    name = "coreset"

    def probabilities(self, view: LayerView) -> tuple[Array, float]:
        return probabilities(sensitivities(view.a, view.geom.coeffs))


class UniformCriterion(SamplingCriterion):
    """Uniform sampling with the same unbiased re-weighting (q_i = 1/n)."""

    name = "uniform"

    def probabilities(self, view: LayerView) -> tuple[Array, None]:
        n = view.geom.n
        return np.full(n, 1.0 / n), None


class TopKCriterion(Criterion):
    """The k neurons with the largest ||[W_l[i,:], b_l[i]]||; the kept ones are not re-weighted."""

    name = "topk"

    def select(self, view: LayerView, target: Target, rng: np.random.Generator) -> Selection:
        if target.keep is None:
            raise ConfigError("topk has no provable bound: give a keep count or a compression, not epsilon")
        norms = np.linalg.norm(view.geom.points, axis=1)
        order = np.argsort(-norms, kind="stable")  # ties: lower index first
        kept = np.sort(order[: int(target.keep)])
        return Selection(kept, np.ones(len(kept)))


class MagnitudeCriterion(Criterion):
    """The k neurons with the largest outgoing-weight norm ||W_{l+1}[:, i]||; no re-weighting."""

    name = "magnitude"

    def select(self, view: LayerView, target: Target, rng: np.random.Generator) -> Selection:
        if target.keep is None:
            raise ConfigError("magnitude has no provable bound: give a keep count or a compression, not epsilon")
        coeffs = np.asarray(view.geom.coeffs, dtype=np.float64)          # (K, n, R)
        norms = np.sqrt(np.square(coeffs).sum(axis=(0, 2)))
        order = np.argsort(-norms, kind="stable")  # ties: lower index first
        kept = np.sort(order[: int(target.keep)])
        return Selection(kept, np.ones(len(kept)))


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (CoresetCriterion, UniformCriterion, TopKCriterion,
                                                             MagnitudeCriterion)}


def criterion(method: str) -> Criterion:
    if method not in CRITERIA:
        raise ConfigError(f"unknown pruning method {method!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[method]()
