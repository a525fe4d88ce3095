"""LP walk: exact ascent over the linear regions of the pair (Relax-and-Walk style, for two networks).

With both networks' ReLU patterns fixed, every pre-activation is affine in x, so a linear objective is
maximised over {x in the box, patterns fixed} by one LP. Its optimum lies on the pattern polytope's
boundary; the neurons whose sign constraints bind there (pre-activation 0, non-zero dual) are
flipped, which moves into an adjacent linear region that still contains the optimum (ReLU is
continuous at 0), so the next LP starts no lower. Repeat until no flip improves.

The model is the certification encoding (`prunecert.certify.formulation.build_encoding`, triangle
relaxation of the unstable neurons over the box), in which fixing a pattern is only a bound change:

    active   neuron:  a in [0, hi],  row h - a in [0, 0]      (h = a)
    inactive neuron:  a in [lo, 0],  h in [0, 0]

so one HiGHS model is built per region and every further LP is a dual-simplex warm start from the
previous basis: a walk of tens of LPs costs little more than the first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import highspy
import numpy as np
import numpy.typing as npt
import torch

from prunecert.certify.formulation import ZERO, Encoding, RegionBounds, build_encoding
from prunecert.core.interval import Bounds, interval_bounds
from prunecert.core.pair import Pair
from prunecert.core.regions import Array, Region
from prunecert.errors import ConfigError
from prunecert.solvers import silence_highs_banner

Pattern = npt.NDArray[np.bool_]  # activation pattern (a > 0) of the unstable neurons
Columns = npt.NDArray[np.int32]
# (optimal?, x, column values, column duals, row duals) of one LP
Solution = tuple[bool, Array, Array, Array, Array]


def _flat(bounds: list[Bounds]) -> list[tuple[Array, Array]]:
    return [(b.lower[0].reshape(-1).numpy().copy(), b.upper[0].reshape(-1).numpy().copy()) for b in bounds]


def interval_region_bounds(pair: Pair, lo: Array, hi: Array) -> RegionBounds:
    """Sound per-layer pre-activation bounds of f and g over the box (interval arithmetic)."""
    return RegionBounds(_flat(interval_bounds(pair.f, lo, hi)), _flat(interval_bounds(pair.g, lo, hi)))


@dataclass
class PairLP:
    """The pair's LP over the box [lo, hi]; `set_pattern` fixes activation patterns through bounds."""

    pair: Pair
    lo: Array
    hi: Array
    pre: RegionBounds | None = None
    enc: Encoding = field(init=False, repr=False)

    def __post_init__(self) -> None:
        pre = self.pre if self.pre is not None else interval_region_bounds(self.pair, self.lo, self.hi)
        self.enc = enc = build_encoding(self.pair, self.lo, self.hi, pre, milp=False, delta_cuts=False)
        a = enc.A.tocsc()
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = enc.n_cols, enc.n_rows
        lp.col_cost_ = np.zeros(enc.n_cols)
        lp.col_lower_, lp.col_upper_ = enc.col_lo, enc.col_hi
        lp.row_lower_, lp.row_upper_ = enc.row_lo, enc.row_hi
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
        lp.sense_ = highspy.ObjSense.kMaximize
        silence_highs_banner()
        self.highs = highspy.Highs()
        self.highs.silent()
        self.highs.setOptionValue("random_seed", 0)
        self.highs.passModel(lp)
        ns = enc.neurons
        self.a_col = np.array([n.a for n in ns], dtype=np.int32)
        self.h_col = np.array([n.h for n in ns], dtype=np.int32)
        self.row = np.array([n.lower_row for n in ns], dtype=np.int32)
        self.n_lo = np.array([n.lo for n in ns], dtype=np.float64)
        self.n_hi = np.array([n.hi for n in ns], dtype=np.float64)
        # where to read each unstable neuron's pre-activation in a forward pass: (network, layer, index)
        self.owner = [(n.owners[0][0], n.layer, n.owners[0][1]) for n in ns]
        self.x_cols = enc.x
        self._cost_cols = np.zeros(0, dtype=np.int32)
        self.solves = 0

    @property
    def n_neurons(self) -> int:
        return len(self.a_col)

    def pattern_at(self, x: Array) -> Pattern:
        """Activation pattern (a > 0) of the unstable neurons at the point x."""
        with torch.no_grad():
            af, ag = self.pair.forward_layers(torch.as_tensor(x).reshape(1, *self.pair.input_shape))
        acts = {"f": [a.flatten() for a in af], "g": [a.flatten() for a in ag]}
        return np.array([bool(acts[who][layer][i] > 0) for who, layer, i in self.owner], dtype=bool)

    def set_pattern(self, pattern: Pattern, neurons: npt.NDArray[np.intp] | None = None) -> None:
        """Fix the pattern of the neurons `neurons` (all if None) through bounds."""
        idx = np.arange(self.n_neurons) if neurons is None else np.asarray(neurons, dtype=np.int64)
        if len(idx) == 0:
            return
        act, lo, hi = pattern[idx], self.n_lo[idx], self.n_hi[idx]
        self.highs.changeColsBounds(len(idx), self.a_col[idx], np.where(act, 0.0, lo), np.where(act, hi, 0.0))
        self.highs.changeColsBounds(len(idx), self.h_col[idx], np.zeros(len(idx)), np.where(act, hi, 0.0))
        # highspy 1.16 ships py.typed stubs that omit changeRowsBounds, though the binding has it
        self.highs.changeRowsBounds(  # type: ignore[attr-defined]
            len(idx), self.row[idx], np.zeros(len(idx)), np.where(act, 0.0, np.inf))

    def start_basis(self, pattern: Pattern, gradient: Array) -> bool:
        """Install the basis of the box vertex that maximises the objective's linearisation at the start.

        All op outputs and active post-activations are basic (fixed by their rows), x sits at the bound
        its reduced cost (= the objective's gradient in this linear region) favours: dual feasible, so
        dual simplex only repairs the violated pattern constraints, far fewer pivots than from scratch.
        """
        enc = self.enc
        n_rows, n_cols = enc.n_rows, enc.n_cols
        col_basic = np.ones(n_cols, dtype=bool)
        col_basic[enc.x] = False
        col_basic[self.h_col[~pattern]] = False
        row_basic = enc.row_lo != enc.row_hi
        row_basic[self.row[pattern]] = False
        if col_basic.sum() + row_basic.sum() != n_rows:
            return False
        S = highspy.HighsBasisStatus
        cols = [S.kBasic if b else S.kLower for b in col_basic]
        for j, gx in zip(enc.x.tolist(), np.asarray(gradient, dtype=np.float64).reshape(-1).tolist()):
            cols[j] = S.kUpper if gx > 0 else S.kLower
        rows = [S.kBasic if b else S.kLower for b in row_basic]
        basis = highspy.HighsBasis()
        basis.col_status, basis.row_status = cols, rows
        basis.valid = True
        return self.highs.setBasis(basis) == highspy.HighsStatus.kOk

    def set_objective(self, layer: int, cf: Array, cg: Array) -> None:
        """Maximise cf . a_layer^f + cg . a_layer^g (shared columns add up)."""
        cost = np.zeros(self.enc.n_cols)
        for cols, c in ((self.enc.af[layer], cf), (self.enc.ag[layer], cg)):
            ok = cols != ZERO
            np.add.at(cost, cols[ok], np.asarray(c, dtype=np.float64)[ok])
        new = np.nonzero(cost)[0].astype(np.int32)
        cols = np.union1d(self._cost_cols, new).astype(np.int32)
        if len(cols):
            self.highs.changeColsCost(len(cols), cols, cost[cols])
        self._cost_cols = new

    def solve(self) -> Solution:
        """(optimal?, x, column values, column duals, row duals) of the current LP."""
        self.highs.run()
        self.solves += 1
        if self.highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return False, np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
        sol = self.highs.getSolution()
        val = np.asarray(sol.col_value)
        x = np.clip(val[self.x_cols], self.lo.reshape(-1), self.hi.reshape(-1))
        return True, x, val, np.asarray(sol.col_dual), np.asarray(sol.row_dual)

    def blocking(self, val: Array, col_dual: Array, row_dual: Array, tol: float = 1e-7
                 ) -> npt.NDArray[np.intp]:
        """Neurons at their kink (a ~ 0) whose sign constraint binds, most binding (|dual|) first."""
        a = val[self.a_col]
        score = np.abs(col_dual[self.a_col]) + np.abs(col_dual[self.h_col]) + np.abs(row_dual[self.row])
        scale = 1.0 + np.maximum(np.abs(self.n_lo), np.abs(self.n_hi))
        cand = np.nonzero((np.abs(a) <= tol * scale) & (score > 1e-9))[0]
        return cand[np.lexsort((cand, -score[cand]))]


def walk(lp: PairLP, value_fn: Callable[[Array], float], x0: Array, layer: int, cf: Array, cg: Array,
         deadline: float, gradient: Array | None = None, max_lps: int = 60, max_single: int = 6
         ) -> tuple[Array, float, list[float], int]:
    """Walk from x0 for one linear sub-objective; value_fn(x) is its float64 value at a point and
    `gradient` its gradient at x0 (for the starting basis; without it HiGHS starts cold).

    Returns the best point, its value, the best value after each LP, and the number of LPs solved.
    """
    lp.set_objective(layer, cf, cg)
    pattern = lp.pattern_at(x0)
    lp.set_pattern(pattern)
    if gradient is not None:
        lp.start_basis(pattern, gradient)
    best_x, best_v = x0.reshape(-1).copy(), float(value_fn(x0))
    trace = [best_v]
    ok, x, val, col_dual, row_dual = lp.solve()
    n = 1
    if not ok:
        return best_x, best_v, trace, n
    v = float(value_fn(x))
    if v > best_v:
        best_x, best_v = x, v
    trace.append(best_v)
    while n < max_lps and time.perf_counter() < deadline:
        cands = lp.blocking(val, col_dual, row_dual)
        if len(cands) == 0:
            break
        trials = [cands] + ([cands[i:i + 1] for i in range(min(max_single, len(cands)))] if len(cands) > 1 else [])
        moved = False
        for flip in trials:
            if n >= max_lps or time.perf_counter() >= deadline:
                break
            new = pattern.copy()
            new[flip] = ~new[flip]
            lp.set_pattern(new, flip)
            ok2, x2, val2, col_dual2, row_dual2 = lp.solve()
            n += 1
            v2 = float(value_fn(x2)) if ok2 else -np.inf
            if ok2 and v2 > best_v + 1e-9 * (1.0 + abs(best_v)):
                pattern, val, col_dual, row_dual = new, val2, col_dual2, row_dual2
                best_x, best_v = x2, v2
                trace.append(best_v)
                moved = True
                break
            lp.set_pattern(pattern, flip)  # undo
        if not moved:
            break
    return best_x, best_v, trace, n


def check_box(region: Region) -> None:
    if getattr(region, "radius", None) is not None:
        raise ConfigError("method lp-walk needs an L-inf box region (its LP cannot express an L2 ball); "
                          "use --method apgd or pgd for --norm 2")
