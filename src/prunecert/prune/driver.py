"""The layer-by-layer driver: one criterion, every hidden layer in order, a pruning record per layer.

Layer l is pruned on the network *as pruned so far* (g): its rows already carry the re-weighted
columns from pruning layer l-1. The guarantee for layer l covers both f's and g's rows (a_i uses the
larger norm, and a union bound over the two point sets) and both networks' layer inputs (beta_hat
is the max of the two sound bounds), so it speaks about g as built and about the *local* deviation
of g's weights on f's inputs, which `certify` measures.
"""

from __future__ import annotations

import time
from typing import NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

from prunecert import __version__
from prunecert.core.interval import Bounds, interval_bounds
from prunecert.io import weights_sha256
from prunecert.network import Network
from prunecert.prune.bounds import beta_hat, check_delta
from prunecert.prune.importance import LayerView, Selection, criterion
from prunecert.core.surgery import check_finite, cut_layer, geometry, layer_spans
from prunecert.prune.targets import Keep, resolve_targets
from prunecert.progress import stage_line


class LayerRecord(TypedDict):
    """One layer of metadata["pruning"]["layers"] (the sampling keys only for sampling criteria)."""

    index: int
    name: str
    n_total: int
    n_kept: int
    kept: list[int]
    scale: list[float]
    beta_hat: float
    next_neurons: int
    t: float | None                  # total sensitivity (coreset)
    eps_max: float | None            # provable bound: None without one (top-k, magnitude)
    eps: list[float] | None
    provable_bound_valid: bool
    counts: NotRequired[list[int]]
    probabilities: NotRequired[list[float]]
    m: NotRequired[int]
    draw_rule: NotRequired[str]
    delta: NotRequired[float]
    union_point_sets: NotRequired[int]
    eps_relative_max: NotRequired[float]


def _floats(a: npt.ArrayLike) -> list[float]:
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def _record(view: LayerView, sel: Selection, n_kept_next: int) -> LayerRecord:
    geom = view.geom
    if sel.q is None or sel.counts is None:
        return LayerRecord(index=geom.index, name=geom.name, n_total=geom.n, n_kept=int(len(sel.kept)),
                           kept=[int(i) for i in sel.kept], scale=_floats(sel.scale), beta_hat=float(view.beta_hat),
                           next_neurons=int(n_kept_next), t=None, eps_max=None, eps=None, provable_bound_valid=False)
    eps = np.asarray(sel.eps, dtype=np.float64)
    total = np.abs(geom.coeffs).sum(axis=2) @ view.a  # S_j = sum_i w_j(i) a_i: the trivial bound on |G_j|
    rel = np.divide(eps, total, out=np.zeros_like(eps), where=total > 0)
    return LayerRecord(
        index=geom.index, name=geom.name, n_total=geom.n, n_kept=int(len(sel.kept)),
        kept=[int(i) for i in sel.kept], scale=_floats(sel.scale), beta_hat=float(view.beta_hat),
        next_neurons=int(n_kept_next),
        counts=[int(c) for c in sel.counts], probabilities=_floats(sel.q[sel.kept]),
        m=int(sel.m), draw_rule="until_k_distinct" if sel.sequential else ("fixed_m" if sel.m else "none"),
        t=None if sel.t is None else float(sel.t), delta=float(view.delta), union_point_sets=view.union,
        eps_max=float(eps.max()) if eps.size else 0.0, eps=_floats(eps),
        eps_relative_max=float(rel.max()) if rel.size else 0.0, provable_bound_valid=True)


def _view(f: Network, g: Network, index: int, pre_f: list[Bounds], delta: float) -> LayerView:
    gg, gf = geometry(g, index), geometry(f, index)
    beta = max(beta_hat(f, index, pre_f), beta_hat(g, index))
    same = gg.points.shape == gf.points.shape and np.array_equal(gg.points, gf.points)
    norms = np.linalg.norm(gg.points, axis=1) if same else np.maximum(
        np.linalg.norm(gg.points, axis=1), np.linalg.norm(gf.points, axis=1))
    a = beta * norms
    a = np.nextafter(a * (1.0 + 2.0 ** -50), np.inf)  # round a_i up: it multiplies into every bound
    return LayerView(gg, a, beta, 1 if same else 2, delta)


def prune_network(network: Network, method: str = "coreset", keep: Keep | None = None,
                  compression: float | None = None, epsilon: float | None = None,
                  delta: float = 0.1, seed: int = 0, progress: bool = True) -> Network:
    """Prune every targeted hidden layer of `network` in order; returns the compact pruned network."""
    check_finite(network)
    crit = criterion(method)
    delta = check_delta(delta)
    targets, spec = resolve_targets(network, keep, compression, epsilon)
    lo, hi = network.domain()
    pre_f = interval_bounds(network, lo, hi)
    g = network
    records: list[LayerRecord] = []
    n_layers = len(layer_spans(network))
    for index in sorted(targets):
        t0 = time.perf_counter()
        view = _view(network, g, index, pre_f, delta)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
        sel = crit.select(view, targets[index], rng)
        g = cut_layer(g, index, sel.kept, sel.scale)
        rec = _record(view, sel, view.geom.next_neurons)
        records.append(rec)
        if progress:
            eps = "-" if rec["eps_max"] is None else f"{rec['eps_max']:.4g}"
            stage_line(f"[prune {method}] layer {index}/{n_layers - 1} {rec['name']}: kept {rec['n_kept']}/{rec['n_total']}"
                       f", beta_hat {rec['beta_hat']:.4g}, eps {eps} ({time.perf_counter() - t0:.2f}s)")
    g.name = f"{network.name}-{method}"
    meta = dict(network.metadata)
    meta["pruning"] = {
        "method": method, "seed": int(seed), "delta": float(delta), "target": spec,
        "original_name": network.name, "original_weights_sha256": weights_sha256(network),
        "original_params": network.n_params(), "pruned_params": g.n_params(),
        "compression": 1.0 - g.n_params() / network.n_params(),
        "layers": records, "provable_bound_valid": crit.provable, "fine_tune": None,
        "prunecert_version": __version__,  # no timings: same seed, same bytes (timings live in reports)
        "bound_statement": ("per layer, with probability >= 1 - delta over the sampling: for every next-layer "
                            "neuron j and every layer input (patch) z with ||[z; 1]|| <= beta_hat, "
                            "|G_j(z) - G'_j(z)| <= eps[j], for the rows of both the original and the network "
                            "as pruned so far; all layers together hold with probability >= 1 - L*delta"),
    }
    g.metadata = meta
    return g
