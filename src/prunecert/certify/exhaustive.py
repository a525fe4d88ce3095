"""Ground truth for tiny pairs: the maximum over every joint activation pattern of f and g.

Fix which ReLUs of f and g are on: both networks become affine in x, so the objective is affine
and the set of inputs with that pattern is a polytope (sign constraints on the pre-activations).
One LP per pattern (scipy's HiGHS) gives the pattern's maximum; the largest over all patterns is the
true maximum over the box. Patterns are enumerated layer by layer and an infeasible partial pattern
prunes its whole subtree; neurons whose interval bounds are one-signed are fixed. Exponential: for
tests on networks with a handful of neurons only. It shares no code with `formulation.py`, so it
checks the MILP rather than repeating it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy.optimize import linprog

from prunecert.certify.formulation import Array, op_matrix
from prunecert.core.interval import interval_bounds
from prunecert.core.pair import Pair
from prunecert.errors import ConfigError
from prunecert.network import Flatten, Layer

MAX_LPS = 200_000

AffineMap = tuple[Array, Array]  # (A, c): x -> A x + c


@dataclass
class EnumResult:
    value: float            # the best pattern LP's optimum (solver arithmetic)
    x: Array | None         # its maximiser
    lps: int                # LPs solved


def _layer_affine(layer: Layer, A: Array, c: Array) -> AffineMap:
    """Push the affine map x -> A x + c (the layer input) through the layer's ops."""
    for op in layer.ops:
        if isinstance(op, Flatten):
            continue
        M = op_matrix(op).toarray()
        A, c = M @ A, M @ c + op.bias.reshape(-1).numpy()
    return A, c


def enumerate_max(pair: Pair, lo: npt.ArrayLike, hi: npt.ArrayLike, objective: tuple[int, npt.ArrayLike, npt.ArrayLike],
                  max_lps: int = MAX_LPS, side: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, float]] = ()
                  ) -> EnumResult:
    """max of cf . a_layer^f(x) + cg . a_layer^g(x) over the box [lo, hi], over all patterns.

    `side`: extra conditions sf . a_layer^f(x) + sg . a_layer^g(x) >= s0 on the objective's layer
    (e.g. f's confidence in a class); value -inf when no input of the box meets them."""
    layer = objective[0] % pair.n_layers
    lower = np.asarray(lo, dtype=np.float64).reshape(-1)
    upper = np.asarray(hi, dtype=np.float64).reshape(-1)
    n = len(lower)
    with torch.no_grad():
        ib = {s: interval_bounds(net, torch.as_tensor(lower).reshape(pair.input_shape),
                                 torch.as_tensor(upper).reshape(pair.input_shape))
              for s, net in (("f", pair.f), ("g", pair.g))}
    best = EnumResult(-np.inf, None, 0)
    cf = np.asarray(objective[1], dtype=np.float64).reshape(-1)
    cg = np.asarray(objective[2], dtype=np.float64).reshape(-1)

    def solve(G: Array, h: Array, obj: Array | None) -> tuple[float, Array] | None:
        """max obj.x over {G x <= h} in the box: (value, maximiser), None if infeasible (or failed)."""
        best.lps += 1
        if best.lps > max_lps:
            raise ConfigError(f"enumerate_max: more than {max_lps} LPs; the pair is too large for enumeration")
        c = np.zeros(n) if obj is None else -obj
        res = linprog(c, A_ub=G if len(G) else None, b_ub=h if len(h) else None, bounds=list(zip(lower, upper)),
                      method="highs")
        return (-float(res.fun), np.asarray(res.x, dtype=np.float64)) if res.status == 0 else None

    def recurse(l: int, maps: dict[str, AffineMap], G: Array, h: Array) -> None:
        new: dict[str, AffineMap] = {}
        for s, layers in (("f", pair.layers_f), ("g", pair.layers_g)):
            new[s] = _layer_affine(layers[l], *maps[s])
        if l == layer:
            (Af, bf), (Ag, bg) = new["f"], new["g"]
            obj = cf @ Af + cg @ Ag
            const = float(cf @ bf + cg @ bg)
            for sf, sg, s0 in side:   # sf.(Af x + bf) + sg.(Ag x + bg) >= s0
                sf, sg = np.asarray(sf, dtype=np.float64), np.asarray(sg, dtype=np.float64)
                G = np.concatenate([G, -(sf @ Af + sg @ Ag)[None]])
                h = np.concatenate([h, [float(sf @ bf + sg @ bg) - s0]])
            res = solve(G, h, obj)
            if res is not None and res[0] + const > best.value:
                best.value, best.x = res[0] + const, res[1].copy()
            return
        rows: list[tuple[str, int]] = []  # (side, neuron) whose sign is free
        fixed: dict[str, Array] = {}
        for s in ("f", "g"):
            b_lo = ib[s][l].lower.reshape(-1).numpy()
            b_hi = ib[s][l].upper.reshape(-1).numpy()
            fixed[s] = np.where(b_lo >= 0, 1.0, 0.0)
            rows += [(s, int(i)) for i in np.flatnonzero((b_lo < 0) & (b_hi > 0))]
        for signs in itertools.product((0.0, 1.0), repeat=len(rows)):
            on = {s: fixed[s].copy() for s in ("f", "g")}
            G2, h2 = [G], [h]
            for (s, i), on_i in zip(rows, signs):
                on[s][i] = on_i
                A, c = new[s][0][i], new[s][1][i]
                # on: A x + c >= 0  ->  -A x <= c ; off: A x + c <= 0
                G2.append((-A if on_i else A)[None])
                h2.append(np.array([c if on_i else -c]))
            G3, h3 = np.concatenate(G2), np.concatenate(h2)
            if rows and solve(G3, h3, None) is None:
                continue
            maps2 = {s: (on[s][:, None] * new[s][0], on[s] * new[s][1]) for s in ("f", "g")}
            recurse(l + 1, maps2, G3, h3)

    ident = (np.eye(n), np.zeros(n))
    recurse(0, {"f": ident, "g": ident}, np.zeros((0, n)), np.zeros(0))
    return best
