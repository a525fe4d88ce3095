"""The numbers behind the coreset guarantee: beta_hat (sound), the provable epsilon, the sample size.

Derivation with all constants: docs/theory.md, section "Coreset pruning: provable bound". In short,
for draws I_1..I_m i.i.d. from q and the estimator G'_j(z) = (1/m) sum_k X_k(z),
X_k(z) = sum_r c[j, I_k, r] relu(p_{I_k} . z_r) / q_{I_k}, with probability >= 1 - delta, for every
next-layer neuron j and every input whose patches satisfy ||z_r|| <= beta_hat:

    |G_j(z) - G'_j(z)| <= (4 sum_r sqrt(V_jr) + c_j sqrt(ln(U K / delta') / 2)) / sqrt(m) + rounding_j

    V_jr = sum_i c[j,i,r]^2 a_i^2 / q_i          (a_i = beta_hat ||p_i||; Rademacher term)
    c_j  = max_i P_ji / q_i + max_i N_ji / q_i   (range of one term X_k; McDiarmid)
    P_ji = a_i sum_r max(c[j,i,r], 0),  N_ji = a_i sum_r max(-c[j,i,r], 0)

U is the number of point sets covered at once (f's and the partially pruned g's rows), and
delta' = delta * 6 / (pi^2 m^2) when m is a stopping time ("draw until k distinct"; a union bound over
every possible m), delta' = delta when m was fixed in advance. Small explicit float64 terms are added
on top (`_float_terms`).
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from prunecert.core.interval import Bounds, affine_interval, interval_bounds
from prunecert.core.rounding import UNIT_ROUNDOFF, gamma
from prunecert.errors import ConfigError
from prunecert.prune.coreset import Array
from prunecert.network import AffineOp, Conv2d, Network
from prunecert.core.surgery import layer_spans

_REL = 1e-12  # relative slack for evaluating the formula itself in float64

# ----------------------------------------------------------------------------- beta_hat

def _round_up_norm(sq_sum: torch.Tensor, n_terms: int) -> torch.Tensor:
    """sqrt of a computed sum of n non-negative terms, rounded so it bounds the exact real value."""
    g = gamma(n_terms + 2)
    up = sq_sum * (1.0 + g) * (1.0 + 4 * UNIT_ROUNDOFF)
    root = torch.sqrt(up) * (1.0 + 4 * UNIT_ROUNDOFF)
    return torch.nextafter(root, torch.full_like(root, math.inf))


def out_op_input_bounds(net: Network, index: int, pre: list[Bounds] | None = None) -> Bounds:
    """Sound bounds (over the whole input domain) on the input of layer `index`'s last (weighted) op."""
    if pre is None:
        lo, hi = net.domain()
        pre = interval_bounds(net, lo, hi)
    if index == 0:
        lo, hi = net.domain()
        b = Bounds(torch.as_tensor(lo).unsqueeze(0), torch.as_tensor(hi).unsqueeze(0))
    else:
        b = pre[index - 1].relu()
    span = layer_spans(net)[index]
    for i in range(span.start, span.stop - 1):
        # Network.validate admits only AffineOp and ReLU, and a layer's span ends before its ReLU
        b = affine_interval(cast(AffineOp, net.ops[i]), b.lower, b.upper)
    return b


def beta_from_bounds(net: Network, index: int, b: Bounds) -> float:
    """A sound bound on ||[z; 1]||_2 for z the out-op input (Linear), or every input patch (Conv2d)."""
    op = net.ops[layer_spans(net)[index].stop - 1]
    sq = torch.maximum(b.lower.square(), b.upper.square())[0]  # each |v|^2 <= max(l^2, u^2)
    sq = torch.nextafter(sq, torch.full_like(sq, math.inf))  # squaring rounds to nearest: step up once
    if isinstance(op, Conv2d):
        c, kh, kw = op.weight.shape[1:]
        ones = torch.ones((1, c, kh, kw), dtype=torch.float64)
        patch = F.conv2d(sq.unsqueeze(0), ones, None, op.stride, op.padding)[0, 0]  # zero padding: 0 terms
        total, n_terms = patch.max() + 1.0, int(c * kh * kw) + 1
    else:
        total, n_terms = sq.sum() + 1.0, int(sq.numel()) + 1
    return float(_round_up_norm(total.reshape(1), n_terms)[0])


def beta_hat(net: Network, index: int, pre: list[Bounds] | None = None) -> float:
    """Sound upper bound on ||[h_{l-1}; 1]|| (or on every patch norm, for conv) over the domain."""
    return beta_from_bounds(net, index, out_op_input_bounds(net, index, pre))


# ----------------------------------------------------------------------------- provable epsilon

def _terms(coeffs: Array, a: Array, q: Array
           ) -> tuple[Array, Array, Array, Array]:
    """Per next-layer neuron j: sum_r sqrt(V_jr), the range c_j of one term, M_j = max_i |X| and
    sum_r max_i |c[j,i,r]| a_i / q_i (the last two only enter the floating-point terms)."""
    coeffs = np.asarray(coeffs, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    support = q > 0
    c, a, q = coeffs[:, support, :], a[support], q[support]
    if c.shape[1] == 0:
        z = np.zeros(coeffs.shape[0])
        return z, z, z, z
    v = np.einsum("jir,i->jr", c * c, a * a / q)
    rad = np.sqrt(v).sum(axis=1)
    pos = (np.clip(c, 0, None).sum(axis=2) * a) / q  # (K, n_support)
    neg = (np.clip(-c, 0, None).sum(axis=2) * a) / q
    spread = pos.max(axis=1) + neg.max(axis=1)
    big = (pos + neg).max(axis=1)
    per_r = (np.abs(c) * (a / q)[None, :, None]).max(axis=1).sum(axis=1)
    return rad, spread, big, per_r


def _float_terms(n: int, big: Array, per_r: Array) -> tuple[Array, Array]:
    """(constant, coefficient of 1/sqrt(m)) covering float64 effects (theory.md, "Floating point").

    The sampler's realised probabilities q' satisfy sum |q' - q| <= L1 = (n + 1)^2 2^-51 (rounded
    cumulative sums, 2^-53-grained uniforms): the mean shifts by <= L1 M_j and each V_jr grows by
    <= L1 max_i (c a / q)^2; the stored re-weighted weights are off by a relative 2^-51.
    """
    l1 = (n + 1) ** 2 * 2.0 ** -51
    return (l1 + 2.0 ** -50) * big, 4.0 * math.sqrt(l1) * per_r


def _log_term(k: int, delta: float, m: int, union: int, sequential: bool) -> float:
    d = delta * 6.0 / (math.pi ** 2 * m * m) if sequential else delta
    return math.log(union * k / d)


def check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise ConfigError(f"delta must lie strictly between 0 and 1, got {delta!r}")
    return float(delta)


def provable_epsilon(m: int, delta: float, coeffs: Array, a: Array, q: Array, *,
                     union: int = 1, sequential: bool = False) -> Array:
    """eps_j for each of the K next-layer neurons (shape (K,)); see the module docstring.

    `coeffs` (K, n, R): next-layer weights per neuron and offset; `a` (n,): beta_hat * ||p_i||;
    `q` (n,): the sampling distribution; `m`: number of i.i.d. draws (0 = nothing sampled, the layer
    was kept whole and exactly: eps = 0).
    """
    delta = check_delta(delta)
    coeffs = np.asarray(coeffs, dtype=np.float64)
    if m == 0:
        return np.zeros(coeffs.shape[0])
    rad, spread, big, per_r = _terms(coeffs, a, q)
    log = _log_term(coeffs.shape[0], delta, int(m), union, sequential)
    const, slope = _float_terms(coeffs.shape[1], big, per_r)
    eps = (4.0 * rad + slope + spread * math.sqrt(log / 2.0)) / math.sqrt(m) + const
    return eps * (1.0 + _REL)


def min_sample_size(epsilon: float, delta: float, coeffs: Array, a: Array, q: Array, *,
                    union: int = 1) -> int:
    """Smallest fixed m with max_j provable_epsilon(m, ...) <= epsilon (absolute, next-layer units)."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon must be a positive number, got {epsilon!r}")
    delta = check_delta(delta)
    coeffs = np.asarray(coeffs, dtype=np.float64)
    rad, spread, big, per_r = _terms(coeffs, a, q)
    const, slope = _float_terms(coeffs.shape[1], big, per_r)
    log = _log_term(coeffs.shape[0], delta, 1, union, False)
    amp = 4.0 * rad + slope + spread * math.sqrt(log / 2.0)
    room = epsilon / (1.0 + _REL) - const
    if np.any(room <= 0):
        raise ConfigError(f"epsilon {epsilon:g} is below the float64 rounding floor of this layer "
                          f"({float(const.max()):.3g})")
    def meets(m: int) -> bool:
        return bool(np.max(provable_epsilon(m, delta, coeffs, a, q, union=union)) <= epsilon)

    # the bound decreases in m: bisect between a size that fails and one that meets it (the closed-form
    # guess can be ~1e18 for a tiny epsilon, far too many to step through one at a time)
    hi = max(1, int(math.ceil(float(np.max((amp / room) ** 2)))))
    while not meets(hi):
        hi *= 2
    lo = 0  # m = 0 never meets a bound
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi
