"""Exact MILP: the true maximum of a linear function of (a^f, a^g) over a box, by big-M and HiGHS.

Binaries only for unstable neurons; big-M constants are the neuron bounds after LP tightening
(`lp.refine_region`: MIPVerify's recipe, starting from diff-linear / ReluDiff bounds), plus cuts
l <= a^f - a^g <= u from the tightened Delta bounds. Tight constants are what make the solve close:
a plain big-M model with interval constants did not finish in 120 s on a pruned LeNet-300-100 pair.

Soundness of what we report (docs/theory.md, "LP, MILP and branch-and-bound"):
- the *value* is the objective re-evaluated by a float64 forward pass at the solver's x (clipped into
  the box): it is reached, so it is a true lower bound of the maximum;
- the *upper bound* is HiGHS's MIP dual bound plus a margin for its tolerances (`tolerance_margin`),
  and never more than the LP relaxation's rigorous dual bound. The dual bound is the one step we
  cannot re-prove, so it is checked against a *witness*: the solver's own point and, when a `witness`
  search is given (`prunecert.adversarial.milp_witness`: apgd + LP walk), the best point it reaches.
  If any reached value exceeds the bound, the rigorous LP bound is used instead, the solve is not
  counted as exact (status "dual_bound_refuted") and the event is recorded.
`milp_bounds` reports exact values for the logits (and any layer in `layers`); other layers carry
the LP bounds of the tightening pass (sound, not exact).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from prunecert.certify.formulation import (
    Array,
    Encoding,
    RegionBounds,
    build_encoding,
    check_encodable,
    op_matrix,
)
from prunecert.certify.highs import DUAL_TOL, INTEGRALITY_TOL, PRIMAL_TOL, UNCONFIRMED, HighsModel
from prunecert.certify.lp import RegionLP, initial_bounds, refine_region, to_pair_bounds
from prunecert.core.region_batch import RegionBatch, boxes_or_batch
from prunecert.certify.result import MilpRegionInfo, PairBounds
from prunecert.core.pair import Pair
from prunecert.core.regions import L2Ball, Region
from prunecert.core.rounding import TINY, gamma
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Flatten
from prunecert.progress import stage_line
from prunecert.stage_budgets import MILP_SECONDS

SAFETY = 10.0  # multiplies the tolerance margin (see PairMILP.tolerance_margin)

# (layer, cf, cg): maximise cf . a_layer^f + cg . a_layer^g (flattened pre-activations)
LinearObjective = tuple[int, npt.ArrayLike, npt.ArrayLike]
# a search for inputs reaching more than the solver's point: (objective, solver's x or None) -> (value, x)
Witness = Callable[[LinearObjective, "Array | None"], "tuple[float, npt.ArrayLike] | None"]
# builds the witness of one box (lo, hi); None where there is nothing to search (a single point)
WitnessFactory = Callable[[Array, Array], "Witness | None"]
REFUTED = "dual_bound_refuted"  # a reached value exceeded HiGHS's dual bound (+ margin): LP bound used


@dataclass
class MaxResult:
    """The maximum of one objective: reached value, sound upper bound, the point, solver status."""

    value: float            # reached at x (float64 forward pass); -inf if no point was found
    upper: float            # sound upper bound on the maximum
    x: Array | None         # input of the network's shape
    status: str             # "optimal" | "unconfirmed" | "time_limit" | ...
    seconds: float

    @property
    def gap(self) -> float:
        """upper - value (>= 0): how far from exact the answer is."""
        return float(self.upper - self.value)


def _region_box(pair: Pair, region: Region) -> tuple[Array, Array]:
    if isinstance(region, L2Ball):
        raise RegionError(f"milp/bab encode boxes only, not the L2 ball {region.describe()}: HiGHS has no cone "
                          f"constraints; use --method lp (Clarabel) or diff-linear for L2 regions")
    lo, hi = region.bounding_box()
    return np.asarray(lo, dtype=np.float64).reshape(pair.input_shape), np.asarray(hi, np.float64).reshape(pair.input_shape)


def _one_box(lo: Array, hi: Array) -> RegionBatch:
    return RegionBatch(torch.as_tensor(lo, dtype=torch.float64)[None], torch.as_tensor(hi, dtype=torch.float64)[None])


def tighten_bounds(pair: Pair, lo: Array, hi: Array, pre: PairBounds | RegionBounds | None = None,
                   deadline: float | None = None) -> RegionBounds:
    """Sound, LP-tightened neuron and Delta bounds for one box: the MILP's big-M constants and cuts."""
    init = initial_bounds(pair, _one_box(lo, hi))
    rb = RegionBounds.from_pair_bounds(init, 0)
    if isinstance(pre, PairBounds):
        rb = rb.intersect(RegionBounds.from_pair_bounds(pre, 0))
    elif isinstance(pre, RegionBounds):
        rb = rb.intersect(pre)
    hidden = set(range(pair.n_layers - 1))
    return refine_region(pair, lo, hi, rb, HighsModel, True, hidden, local=False, margins=False,
                         deadline=deadline).bounds


class PairMILP:
    """The big-M model of a pair over one box, for many objectives (certification and attacks).

    `region`: a Box / Domain (or pass `lo`, `hi`). `pre_bounds`: sound bounds to start from (a
    PairBounds of batch 1 or RegionBounds); they are LP-tightened unless `tighten=False`.
    `witness`: builds, for this box, the search run after every solve to check the dual bound (see
    the module docstring), e.g. `prunecert.adversarial.milp_witness(pair)`.
    """

    def __init__(self, pair: Pair, region: Region | None = None, pre_bounds: PairBounds | RegionBounds | None = None,
                 *, lo: npt.ArrayLike | None = None, hi: npt.ArrayLike | None = None, tighten: bool = True,
                 witness: WitnessFactory | None = None) -> None:
        self.pair = pair
        if region is not None:
            lo, hi = _region_box(pair, region)
        if lo is None or hi is None:
            raise ConfigError("PairMILP needs a region or lo/hi box bounds")
        self.lo = np.asarray(lo, dtype=np.float64).reshape(pair.input_shape)
        self.hi = np.asarray(hi, dtype=np.float64).reshape(pair.input_shape)
        if tighten or pre_bounds is None or isinstance(pre_bounds, PairBounds):
            self.bounds = tighten_bounds(pair, self.lo, self.hi, pre_bounds) if tighten else \
                RegionBounds.from_pair_bounds(initial_bounds(pair, _one_box(self.lo, self.hi)), 0)
        else:
            self.bounds = pre_bounds
        self.enc: Encoding = build_encoding(pair, self.lo, self.hi, self.bounds, milp=True)
        self.model = HighsModel(self.enc, integer=True)
        self.witness: Witness | None = None if witness is None else witness(self.lo, self.hi)
        self._lp: HighsModel | None = None
        self.unsound_events = 0

    @property
    def n_binaries(self) -> int:
        return int(self.enc.integer.sum())

    def objective_vector(self, objective: LinearObjective) -> Array:
        layer, cf, cg = objective
        layer %= self.pair.n_layers
        c = np.zeros(self.enc.n_cols)
        np.add.at(c, self.enc.af[layer], np.asarray(cf, dtype=np.float64).reshape(-1))
        np.add.at(c, self.enc.ag[layer], np.asarray(cg, dtype=np.float64).reshape(-1))
        return c

    def evaluate(self, objective: LinearObjective, x: npt.ArrayLike) -> float:
        """The objective at input x by a float64 forward pass of both networks."""
        layer, cf, cg = objective
        with torch.no_grad():
            af, ag = self.pair.forward_layers(torch.as_tensor(x).reshape(1, *self.pair.input_shape))
        return float(af[layer].reshape(-1) @ torch.as_tensor(cf, dtype=torch.float64).reshape(-1)
                     + ag[layer].reshape(-1) @ torch.as_tensor(cg, dtype=torch.float64).reshape(-1))

    def lp_bound(self, c: Array) -> float:
        """Rigorous upper bound from the LP relaxation of the same encoding (dual-based)."""
        if self._lp is None:
            self._lp = HighsModel(build_encoding(self.pair, self.lo, self.hi, self.bounds, milp=False))
        # same column order for x/a/h; the LP encoding has no binaries, so map through its own indices
        return self._lp.maximize_lp(self._lp_objective(self._lp.enc, c)).bound

    def _lp_objective(self, enc: Encoding, c: Array) -> Array:
        """The MILP objective `c` (on the pre-activation columns) moved onto the LP encoding `enc`."""
        out = np.zeros(enc.n_cols)
        for cols_m, cols_l in zip(self.enc.af + self.enc.ag, enc.af + enc.ag):
            out[cols_l] = c[cols_m]
        return out

    def solve(self, objective: LinearObjective, time_limit: float = MILP_SECONDS) -> MaxResult:
        """max of the objective over the box: reached value, sound upper bound, point, status."""
        start = time.perf_counter()
        c = self.objective_vector(objective)
        sol = self.model.maximize_milp(c, time_limit)
        x: Array | None = None
        value = -np.inf
        if sol.v is not None:
            x = self._into_box(sol.v[self.enc.x])
            value = self.evaluate(objective, x)
        if self.witness is not None:
            found = self.witness(objective, x)
            if found is not None:
                wx = self._into_box(found[1])
                wv = self.evaluate(objective, wx)   # re-evaluated here: trust no caller's arithmetic
                if wv > value:
                    value, x = wv, wx
        lp = self.lp_bound(c)
        margin = 0.0 if sol.rigorous else self.tolerance_margin(objective, c)
        upper, status = min(lp, sol.dual_bound + margin), sol.status
        if value > upper:  # the solver broke its tolerances: keep the rigorous LP bound
            self.unsound_events += 1
            upper, status = lp, REFUTED
        return MaxResult(value, float(upper), x, status, time.perf_counter() - start)

    def _into_box(self, v: npt.ArrayLike) -> Array:
        """A point (solver columns or a witness's x) clipped into the box, in the network's input shape."""
        flat = np.asarray(v, dtype=np.float64).reshape(-1)
        return np.clip(flat, self.lo.reshape(-1), self.hi.reshape(-1)).reshape(self.pair.input_shape)

    def maximize(self, objective: LinearObjective, time_limit: float = MILP_SECONDS
                 ) -> tuple[float, Array | None, str, float]:
        """(value reached, x, status, gap = sound upper bound - value): the attack interface."""
        r = self.solve(objective, time_limit)
        return r.value, r.x, r.status, r.gap

    def tolerance_margin(self, objective: LinearObjective, c: Array) -> float:
        """How far HiGHS's dual bound may sit below the true maximum if it honours its tolerances.

        Every point the solver accepts violates rows and column bounds by <= PRIMAL_TOL (tp) and
        integrality by <= INTEGRALITY_TOL (ti). Clipping its x into the box gives a real input; by
        induction the accepted column values differ from that input's true ones by at most eps, with
        eps_x = tp, eps_out = |M| eps_in + tp through each op, and through a ReLU eps_h = eps_a
        (stable on), 0 (stable off), 2 eps_a + 2 max(|l|, |u|) ti + 3 tp (big-M, derived in
        docs/theory.md). The objective moves by <= |c| . eps; node LPs solved to dual tolerance td
        can under-report by <= td sum_j max|v_j|. Their sum, plus float rounding, is multiplied by
        SAFETY (slack for HiGHS's internal scaling of tolerances; engineering, not a proof).
        """
        layer, cf, cg = objective
        layer %= self.pair.n_layers
        enc, tp, ti = self.enc, PRIMAL_TOL, INTEGRALITY_TOL
        total = 0.0
        for side, layers, cols, coef in (("f", self.pair.layers_f, enc.af, cf), ("g", self.pair.layers_g, enc.ag, cg)):
            eps = np.full(self.pair.f.n_inputs, tp)
            for l in range(layer + 1):
                for op in layers[l].ops:
                    if not isinstance(op, Flatten):
                        eps = abs(op_matrix(op)) @ eps + tp
                if l == layer:
                    break
                a_lo, a_hi = enc.col_lo[cols[l]], enc.col_hi[cols[l]]
                big = np.maximum(np.abs(a_lo), np.abs(a_hi))
                eps = np.where(a_lo >= 0, eps, np.where(a_hi <= 0, 0.0, 2 * eps + 2 * big * ti + 3 * tp))
            total += float(np.abs(np.asarray(coef, dtype=np.float64).reshape(-1)) @ eps)
        mag = np.maximum(np.abs(enc.col_lo), np.abs(enc.col_hi))
        dual = DUAL_TOL * float(mag.sum())
        rounding = gamma(enc.n_cols + 8) * float(np.abs(c) @ mag)
        return SAFETY * (total + dual + rounding) * (1 + 1e-6) + TINY


def _delta_objective(pair: Pair, layer: int, k: int, sign: float) -> LinearObjective:
    n = int(np.prod(pair.layers_f[layer].out_shape))
    cf = np.zeros(n)
    cf[k] = sign
    return layer, cf, -cf


def milp_region(pair: Pair, lo: Array, hi: Array, rb: RegionBounds, layers: set[int], deadline: float,
                max_abs_only: bool = False, witness: WitnessFactory | None = None
                ) -> tuple[RegionBounds, MilpRegionInfo]:
    """Exact bounds on Delta of `layers` for one box (LP-tightened `rb` in, exact-where-solved out).

    Coordinates are solved largest LP bound first, each with the time left. `max_abs_only`: skip a
    coordinate whose sound bound cannot beat the best reached |Delta| (enough for max |Delta_logit|).
    """
    milp = PairMILP(pair, None, rb, lo=lo, hi=hi, tighten=False, witness=witness)
    rb = rb.copy()
    assert rb.delta is not None  # refine_region's bounds always carry Delta
    jobs: list[tuple[float, int, int, float]] = []   # (sound bound, layer, coordinate, sign)
    for l in sorted(layers):
        dlo, dhi = rb.delta[l]
        for k in range(len(dlo)):
            if milp.enc.af[l][k] == milp.enc.ag[l][k]:
                continue
            jobs += [(float(dhi[k]), l, k, 1.0), (float(-dlo[k]), l, k, -1.0)]
    jobs.sort(key=lambda j: -j[0])
    # max_k |Delta_k| >= 0 at every point: 0 is reached even when no coordinate needs a solve
    # (every logit structurally identical in f and g)
    best_reached, solved, skipped = 0.0, 0, 0
    statuses: list[str] = []
    for bound, l, k, sign in jobs:
        left = deadline - time.perf_counter()
        if max_abs_only and bound <= best_reached:
            skipped += 1
            continue
        if left <= 0:
            statuses.append("not_started")
            continue
        r = milp.solve(_delta_objective(pair, l, k, sign), time_limit=left)
        solved += 1
        statuses.append(r.status)
        dlo, dhi = rb.delta[l]
        if sign > 0:
            dhi[k] = min(dhi[k], r.upper)
        else:
            dlo[k] = max(dlo[k], -r.upper)
        best_reached = max(best_reached, r.value)
    info: MilpRegionInfo = {"binaries": milp.n_binaries, "solved": solved, "skipped": skipped, "statuses": statuses,
                         "reached_max_abs": float(best_reached), "unsound_events": milp.unsound_events,
                         "closed": all(s == "optimal" for s in statuses)}
    return rb, info


def _out_of_time(status: str) -> bool:
    """An objective the time limit left open: not started, stopped by it, or without its second opinion
    (objectives skipped because max |Delta| was already decided are not: `max_abs_only`)."""
    return status in ("not_started", UNCONFIRMED) or "time" in status.lower()


@boxes_or_batch
def milp_bounds(pair: Pair, region: RegionBatch, time_limit: float = MILP_SECONDS,
                layers: Iterable[int] | None = None, local: bool = True,
                max_abs_only: bool = False, tighten_time_limit: float | None = None,
                progress: bool = False, witness: WitnessFactory | None = None) -> PairBounds:
    """Exact (MILP) bounds on Delta of the logits (and `layers`) for a batch of boxes.

    `time_limit` (seconds per region) bounds the MILP solves; the LP tightening pass before them has
    its own `tighten_time_limit` (None: no limit; past it, neurons keep their initial bounds).
    Coordinates not closed in time keep sound bounds (dual bound, else LP). Per-region solver
    details go to `info["milp"]`. `witness` (e.g. `prunecert.adversarial.milp_witness(pair)`)
    checks every optimum (see `PairMILP`); without it only the solver's own point does.
    """
    if time_limit is None:
        time_limit = MILP_SECONDS
    if time_limit <= 0:
        raise ConfigError(f"milp: time_limit must be > 0 seconds, got {time_limit}")
    check_encodable(pair, "milp", "use diff-linear or crown-diff (they scale to conv nets)")
    region = region.bounding_boxes()   # the MILP encodes boxes; a ball's box contains it (sound)
    lo_t, hi_t = region.lo, region.hi
    init = initial_bounds(pair, region)
    wanted = {pair.n_layers - 1} | ({int(l) % pair.n_layers for l in layers} if layers is not None else set())
    results: list[RegionLP] = []
    infos: list[MilpRegionInfo] = []
    for b in range(lo_t.shape[0]):
        lo_b, hi_b = lo_t[b].numpy(), hi_t[b].numpy()
        rb = RegionBounds.from_pair_bounds(init, b)
        deadline = None if tighten_time_limit is None else time.perf_counter() + float(tighten_time_limit)
        res = refine_region(pair, lo_b, hi_b, rb, HighsModel, True, None, local, margins=True, deadline=deadline)
        rb, info = milp_region(pair, lo_b, hi_b, res.bounds, wanted, time.perf_counter() + float(time_limit),
                               max_abs_only, witness)
        res.bounds = rb
        results.append(res)
        infos.append(info)
        stage_line(f"milp: region {b + 1}/{lo_t.shape[0]}: {info['binaries']} binaries, {info['solved']} MILPs, "
                   f"closed={info['closed']}", progress)
    out = to_pair_bounds(pair, results, init, "milp")
    out.info["milp"] = infos
    out.info["truncated"] = [any(_out_of_time(s) for s in i["statuses"]) for i in infos]
    return out
