"""The paper's sampling (Mussay et al., ICLR 2020): Algorithm 1 (one neuron) and Algorithm 2 (a layer).

Algorithm 1, CORESET(P, w, m, phi, beta): pr(p) = |w(p)| phi(beta ||p||) / sum_q |w(q)| phi(beta ||q||);
draw m points i.i.d. from pr; u(p) += w(p) / (m pr(p)) per draw. For relu, phi(beta ||p||) = beta ||p||.

Algorithm 2, CORESET PER LAYER(P, w_1..w_K, m, phi, beta): one shared sample for all K next-layer
neurons, with the *normalised* sensitivity
    s(p) = max_j |w_j(p)| phi(beta ||p||) / sum_q |w_j(q)| phi(beta ||q||),   t = sum_p s(p),
pr = s / t; each next-layer neuron j keeps its own weights u_j(p) += w_j(p) / (m pr(p)).
Negative weights: |w| in the sensitivities, the sign kept in u (the estimator stays unbiased).

All functions are pure numpy on float64 arrays and take a `numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from prunecert.errors import ConfigError

Array = npt.NDArray[np.float64]
Indices = npt.NDArray[np.intp]   # neuron indices (kept, drawn)
Counts = npt.NDArray[np.int64]   # draw counts

MAX_DRAWS = 10 ** 8  # "draw until k distinct" gives up (with a clear error) after this many draws


def point_norms(points: Array) -> Array:
    norms: Array = np.linalg.norm(np.asarray(points, dtype=np.float64), axis=1)
    return norms


def neuron_probabilities(points: Array, weights: Array, beta: float) -> Array:
    """Algorithm 1's pr(p) for one next-layer neuron with weights w(p) (any sign)."""
    s = np.abs(np.asarray(weights, dtype=np.float64)) * beta * point_norms(points)
    total = s.sum()
    if total <= 0:
        raise ConfigError("all sensitivities are zero (zero weights or zero points): nothing to sample from")
    pr: Array = s / total
    return pr


def layer_sensitivities(points: Array, coeffs: Array, beta: float) -> Array:
    """Algorithm 2's normalised s(p) (shape (n,)); `coeffs` (K, n, R) are aggregated as sum_r |c|."""
    return sensitivities(beta * point_norms(points), coeffs)


def sensitivities(a: Array, coeffs: Array) -> Array:
    """s_i = max_j w_j(i) a_i / sum_q w_j(q) a_q with w_j(i) = sum_r |coeffs[j, i, r]|, a_i = phi(beta ||p_i||).

    A next-layer neuron whose total sum_q w_j(q) a_q is zero sees only zero terms and is skipped (its
    output does not depend on this layer).
    """
    w = np.abs(np.asarray(coeffs, dtype=np.float64)).sum(axis=2)  # (K, n)
    mass = w * np.asarray(a, dtype=np.float64)[None, :]
    totals = mass.sum(axis=1)
    live = totals > 0
    if not live.any():
        return np.zeros(w.shape[1])
    s: Array = (mass[live] / totals[live, None]).max(axis=0)
    return s


def probabilities(s: Array) -> tuple[Array, float]:
    """pr = s / t and t = sum s (uniform over all points when every s is zero: then nothing matters)."""
    t = float(np.sum(s))
    if t <= 0:
        return np.full(len(s), 1.0 / len(s)), 0.0
    return np.asarray(s, dtype=np.float64) / t, t


def layer_probabilities(points: Array, coeffs: Array, beta: float) -> tuple[Array, float]:
    """pr = s / t and t for Algorithm 2."""
    return probabilities(layer_sensitivities(points, coeffs, beta))


def draw(q: Array, size: int, rng: np.random.Generator) -> Indices:
    """`size` i.i.d. indices from q; an index with q_i = 0 is never drawn."""
    cdf = np.cumsum(q)
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, rng.random(size), side="right")
    last = int(np.flatnonzero(q > 0)[-1])
    return np.minimum(idx, last)


def reweight(weights: Array, counts: npt.NDArray[np.integer], q: Array, m: int) -> Array:
    """u(p) = w(p) * count(p) / (m pr(p)) (0 where count is 0); works on (n,) or (K, n, ...) arrays."""
    n_drawn = np.asarray(counts, dtype=np.float64)
    factor = np.divide(n_drawn, m * q, out=np.zeros_like(n_drawn), where=n_drawn > 0)
    w = np.asarray(weights, dtype=np.float64)
    shape = [1] * w.ndim
    shape[0 if w.ndim == 1 else 1] = -1
    return w * factor.reshape(shape)


def coreset_neuron(points: Array, weights: Array, m: int, beta: float, rng: np.random.Generator
                   ) -> tuple[Indices, Array]:
    """Algorithm 1: the coreset (sorted distinct indices C) and its weights u (shape (n,), 0 off C)."""
    q = neuron_probabilities(points, weights, beta)
    counts = np.bincount(draw(q, int(m), rng), minlength=len(q))
    return np.flatnonzero(counts), reweight(weights, counts, q, int(m))


def coreset_layer(points: Array, coeffs: Array, m: int, beta: float, rng: np.random.Generator
                  ) -> tuple[Indices, Array]:
    """Algorithm 2 with a fixed m: kept indices C and the re-weighted coefficients u (K, n, R)."""
    q, _ = layer_probabilities(points, coeffs, beta)
    counts = np.bincount(draw(q, int(m), rng), minlength=len(q))
    return np.flatnonzero(counts), reweight(coeffs, counts, q, int(m))


@dataclass
class Sample:
    """The outcome of sampling one layer: kept = distinct draws (sorted), their counts, m draws."""

    kept: Indices
    counts: Counts       # aligned with kept
    m: int
    sequential: bool     # True: m is a stopping time ("until k distinct")

    def scale(self, q: Array) -> Array:
        """count_i / (m q_i) for each kept i: the factor on the next layer's column i."""
        return self.counts / (self.m * q[self.kept])


def sample_fixed(q: Array, m: int, rng: np.random.Generator) -> Sample:
    """m i.i.d. draws (m fixed before sampling); kept = distinct draws."""
    counts = np.bincount(draw(q, int(m), rng), minlength=len(q))
    kept = np.flatnonzero(counts)
    return Sample(kept, counts[kept].astype(np.int64), int(m), False)


def sample_until(q: Array, k: int, rng: np.random.Generator, max_draws: int = MAX_DRAWS) -> Sample:
    """Draw i.i.d. from q until k distinct indices appeared; m = the number of draws taken.

    If fewer than k indices have q_i > 0, stops when all of them appeared (the caller keeps the
    zero-probability neurons unchanged: they contribute nothing).
    """
    n = len(q)
    target = min(int(k), int(np.count_nonzero(q > 0)))
    seen = np.zeros(n, dtype=bool)
    n_seen, taken, chunks = 0, 0, []
    chunk = max(1024, 4 * target)
    while True:
        batch = draw(q, chunk, rng)
        values, first = np.unique(batch, return_index=True)
        fresh = ~seen[values]
        order = np.argsort(first[fresh], kind="stable")
        new_pos = first[fresh][order]
        if n_seen + len(new_pos) >= target:
            stop = int(new_pos[target - n_seen - 1]) + 1
            chunks.append(batch[:stop])
            taken += stop
            break
        seen[values[fresh]] = True
        n_seen += len(new_pos)
        chunks.append(batch)
        taken += chunk
        if taken >= max_draws:
            raise ConfigError(f"{taken} draws gave only {n_seen} distinct neurons of the {target} asked for "
                              f"(sampling probabilities are too skewed); ask for fewer neurons")
        chunk = min(2 * chunk, max_draws - taken)
    counts = np.bincount(np.concatenate(chunks), minlength=n)
    kept = np.flatnonzero(counts)
    return Sample(kept, counts[kept].astype(np.int64), taken, True)
