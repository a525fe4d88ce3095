"""HiGHS on an `Encoding`, with *sound* bounds read from the solver's duals.

An LP solver's optimal value is only as exact as its tolerances. We never report it. Instead, any
dual vector y (exact or not) gives a rigorous bound by weak duality (Neumaier & Shcherbina, "Safe
bounds in linear and mixed-integer linear programming", Math. Prog. 2004): for every v with
row_lo <= A v <= row_hi and col_lo <= v <= col_hi,

    c.v = y.(A v) + r.v,   r = c - A^T y
        <= sum_i (y_i row_hi_i if y_i > 0 else y_i row_lo_i) + sum_j max(r_j col_lo_j, r_j col_hi_j),

which is finite because every column of our encodings is bounded. We evaluate the right-hand side
in float64 and add a rounding margin (gamma_K times the magnitude of all terms, K the longest sum),
so the bound holds whatever HiGHS returned; a poor y only makes it looser. Infeasibility is proven
the same way from a dual ray (Farkas), and otherwise never assumed.

MILP dual bounds cannot be re-derived like this; `milp.py` adds a tolerance margin to them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import highspy
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from prunecert.certify.formulation import Array, Encoding
from prunecert.core.rounding import TINY, gamma
from prunecert.solvers import silence_highs_banner

INF = highspy.kHighsInf

# tolerances handed to HiGHS (milp.py's margin is derived from these numbers)
PRIMAL_TOL = 1e-9
DUAL_TOL = 1e-9
INTEGRALITY_TOL = 1e-9
# HiGHS random seeds whose MILP runs cross-examine each other (see HighsModel.maximize_milp)
OPINION_SEEDS = (0, 1)
MIN_SOLVE = 1e-3            # seconds: the least time limit a solve is given (an expired deadline still ends at once)
UNCONFIRMED = "unconfirmed"  # optimal in the runs there was time for, but not in all of OPINION_SEEDS


@dataclass
class LPSolution:
    """A sound upper bound on max c.v, the solver's (approximate) value and point, and its status."""

    bound: float           # sound: >= max over the encoding's feasible set (-inf: proven empty)
    value: float           # the solver's objective value (approximate; nan if none)
    v: Array | None        # the solver's column values (None if none)
    status: str


@dataclass
class MILPSolution:
    dual_bound: float      # HiGHS's bound on the optimum (before milp.py's tolerance margin)
    value: float           # best incumbent objective (solver's arithmetic), -inf if none
    v: Array | None
    status: str            # "optimal" | "time_limit" | "infeasible" | other HiGHS status
    gap: float             # HiGHS's relative gap
    rigorous: bool = False  # True when no binaries were left: dual_bound is the LP's sound bound
    opinions_missing: int = 0  # runs of OPINION_SEEDS skipped for lack of time (status then UNCONFIRMED)

    def merge(self, other: "MILPSolution") -> "MILPSolution":
        """Two runs on one objective: the larger dual bound, the better incumbent, the weaker status."""
        first = self.value >= other.value
        value, v = (self.value, self.v) if first else (other.value, other.v)
        status = self.status if self.status == other.status else \
            next(s for s in (self.status, other.status) if s != "optimal")
        return MILPSolution(max(self.dual_bound, other.dual_bound), value, v, status,
                            max(self.gap, other.gap), opinions_missing=self.opinions_missing + other.opinions_missing)


def _fin(a: Array) -> Array:
    """Infinities as HiGHS spells them (kHighsInf)."""
    return np.where(np.isfinite(a), a, np.where(a > 0, INF, -INF))


class LPModel(Protocol):
    """An LP over an encoding, re-solved for many objectives: `HighsModel`, or `cone.ConeModel` for L2 balls."""

    def maximize_lp(self, c: Array) -> LPSolution: ...

    def set_col_bounds(self, cols: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike) -> None: ...


class LinearRows(Protocol):
    """What `dual_terms` reads of a model: row and column bounds and the transposed constraint matrix."""

    row_lo: Array
    row_hi: Array
    col_lo: Array
    col_hi: Array
    At: Any  # scipy.sparse.csr_matrix (columns x rows); scipy ships no type information


def dual_terms(model: LinearRows, c: Array, y: Array) -> tuple[Array, Array, Array, Array]:
    """The weak-duality pieces shared by every LP model's `safe_bound` (box or cone).

    Any row multipliers y give the bound c.v <= sum(row_terms) + sum(col_terms) over
    {row_lo <= A v <= row_hi, col_lo <= v <= col_hi}: y is cleaned first (NaNs, and signs that point
    at an infinite row bound, are zeroed) so the bound stays valid whatever the solver returned.
    Returns (y, r = c - A^T y, row_terms, col_terms); the caller adds its rounding margin.
    """
    y = np.where(np.isfinite(y), y, 0.0)
    y = np.where((y > 0) & np.isfinite(model.row_hi) | (y < 0) & np.isfinite(model.row_lo), y, 0.0)
    r = c - model.At @ y
    row_terms = np.where(y > 0, y * np.where(np.isfinite(model.row_hi), model.row_hi, 0.0),
                         y * np.where(np.isfinite(model.row_lo), model.row_lo, 0.0))
    col_terms = np.maximum(r * model.col_lo, r * model.col_hi)
    return y, r, row_terms, col_terms


class HighsModel:
    """One HiGHS model of an encoding, re-solved (warm) for many objectives and bound changes."""

    def __init__(self, enc: Encoding, integer: bool = False) -> None:
        self.enc = enc
        self.col_lo, self.col_hi = enc.col_lo.copy(), enc.col_hi.copy()
        self.row_lo, self.row_hi = enc.row_lo.copy(), enc.row_hi.copy()
        self.At = enc.A.T.tocsr()
        self.absAt = abs(self.At)
        self._col_nnz = np.diff(enc.A.tocsc().indptr)
        silence_highs_banner()
        self.highs = highspy.Highs()
        self.highs.silent()
        opts: dict[str, float | str | bool] = {"primal_feasibility_tolerance": PRIMAL_TOL, "dual_feasibility_tolerance": DUAL_TOL,
                "mip_feasibility_tolerance": INTEGRALITY_TOL, "mip_rel_gap": 1e-7, "mip_abs_gap": 1e-10}
        if not integer:
            # warm re-solves after a cost change: dual simplex without presolve and scaling was 5-8x
            # faster than the defaults on LeNet-300-100 encodings (12 ms vs 60-110 ms per LP)
            opts.update(presolve="off", simplex_strategy=1, simplex_scale_strategy=0)
        else:
            # The sub-MIP heuristics (RINS/RENS) spent 30-50 s presolving the dense input layer of
            # LeNet-300-100 encodings, so they stay off. Presolve stays ON: with presolve off, HiGHS
            # 1.16 returned "optimal" -1.78e-4 on a 3-8-6-3 pair (tests/test_certify_milp.py,
            # seed 302, perturb twin) where a feasible integral point reaches 3.0e-4 -- an unsound
            # answer; with presolve on it finds 6.4e-4. Correctness over speed.
            opts.update(mip_heuristic_run_rins=False, mip_heuristic_run_rens=False)
        for k, v in opts.items():
            self.highs.setOptionValue(k, v)
        csc = enc.A.tocsc()
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = enc.n_cols, enc.n_rows
        lp.col_cost_ = np.zeros(enc.n_cols)
        lp.col_lower_, lp.col_upper_ = _fin(self.col_lo), _fin(self.col_hi)
        lp.row_lower_, lp.row_upper_ = _fin(self.row_lo), _fin(self.row_hi)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = csc.indptr.astype(np.int32)
        lp.a_matrix_.index_ = csc.indices.astype(np.int32)
        lp.a_matrix_.value_ = csc.data.astype(np.float64)
        lp.sense_ = highspy.ObjSense.kMaximize
        if integer and enc.integer.any():
            lp.integrality_ = [highspy.HighsVarType.kInteger if f else highspy.HighsVarType.kContinuous
                               for f in enc.integer]
        self.highs.passModel(lp)
        self.integer = bool(integer and enc.integer.any())

    # ------------------------------------------------------------------ bound changes (branching)
    def set_col_bounds(self, cols: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike) -> None:
        ids = np.atleast_1d(np.asarray(cols, dtype=np.int32))
        lower = np.broadcast_to(np.asarray(lo, float), ids.shape)
        upper = np.broadcast_to(np.asarray(hi, float), ids.shape)
        self.col_lo[ids], self.col_hi[ids] = lower, upper
        self.highs.changeColsBounds(len(ids), ids, _fin(lower.copy()), _fin(upper.copy()))

    def set_row_bounds(self, row: int, lo: float, hi: float) -> None:
        self.row_lo[row], self.row_hi[row] = lo, hi
        self.highs.changeRowBounds(int(row), float(_fin(np.array(lo))), float(_fin(np.array(hi))))

    def add_side_row(self, cols: npt.ArrayLike, vals: npt.ArrayLike, lo: float, hi: float) -> int:
        """Append the row lo <= vals . v[cols] <= hi (a side condition on the inputs searched, e.g. f's
        confidence in a class); returns its index, to relax later with `set_row_bounds`. The rigorous
        bounds (`safe_bound`, `proves_infeasible`) see the new row too."""
        ids = np.asarray(cols, dtype=np.int32)
        coefs = np.asarray(vals, dtype=np.float64)
        self.highs.addRow(float(_fin(np.array(lo))), float(_fin(np.array(hi))), len(ids), ids, coefs)
        self.row_lo, self.row_hi = np.append(self.row_lo, lo), np.append(self.row_hi, hi)
        col = sp.csr_matrix((coefs, (ids, np.zeros(len(ids), dtype=np.int32))), shape=(self.At.shape[0], 1))
        self.At = sp.hstack([self.At, col]).tocsr()
        self.absAt = abs(self.At)
        self._col_nnz = np.diff(self.At.indptr)
        return len(self.row_lo) - 1

    def set_objective(self, c: Array) -> None:
        idx = np.arange(len(c), dtype=np.int32)
        self.highs.changeColsCost(len(c), idx, np.asarray(c, dtype=np.float64))

    # ------------------------------------------------------------------ solves
    def maximize_lp(self, c: Array, time_limit: float | None = None) -> LPSolution:
        """max c.v over the LP relaxation, with a sound bound (see module docstring). A solve stopped by
        `time_limit` (seconds; None: none) gives the box bound, as any non-optimal status does."""
        self.set_objective(c)
        self.highs.setOptionValue("time_limit", INF if time_limit is None else max(float(time_limit), MIN_SOLVE))
        self.highs.run()
        status = self.highs.getModelStatus()
        if status == highspy.HighsModelStatus.kOptimal:
            sol = self.highs.getSolution()
            y = np.asarray(sol.row_dual, dtype=np.float64)
            v = np.asarray(sol.col_value, dtype=np.float64)
            bound = self.safe_bound(c, y)
            return LPSolution(bound, float(self.highs.getInfo().objective_function_value), v, "optimal")
        if status == highspy.HighsModelStatus.kInfeasible and self.proves_infeasible():
            return LPSolution(-np.inf, np.nan, None, "infeasible")
        # anything else (a time limit too): the box bound (y = 0) is always valid; y has one entry per
        # row of the model, side rows included (the encoding's count missed them)
        return LPSolution(self.safe_bound(c, np.zeros(len(self.row_lo))), np.nan, None, str(status))

    def safe_bound(self, c: Array, y: Array) -> float:
        """Sound upper bound on c.v over {row_lo <= A v <= row_hi, col_lo <= v <= col_hi} from any y."""
        y, r, row_terms, col_terms = dual_terms(self, c, y)
        mag_x = np.maximum(np.abs(self.col_lo), np.abs(self.col_hi))
        total = float(np.sum(row_terms) + np.sum(col_terms))
        # r_j carries error <= gamma(nnz_j+1) (|c_j| + (|A|^T |y|)_j); the sums add gamma(K) * magnitude
        k = int(self._col_nnz.max(initial=0)) + len(row_terms) + len(col_terms) + 8
        mag = float(np.sum(np.abs(row_terms)) + np.sum(np.abs(col_terms))
                    + np.sum((np.abs(c) + self.absAt @ np.abs(y)) * mag_x))
        err = 2.0 * gamma(k) * mag + TINY
        return float(np.nextafter(total + err, np.inf))

    def proves_infeasible(self) -> bool:
        """Check HiGHS's dual ray as a Farkas certificate (in float64, with a rounding margin)."""
        try:
            # highspy 1.16's stubs omit getDualRay, though the binding has it (-> status, has_ray, ray)
            _, has_ray, ray = self.highs.getDualRay()  # type: ignore[attr-defined]
        except Exception:  # pragma: no cover - older highspy
            return False
        if not has_ray:
            return False
        ray = np.asarray(ray, dtype=np.float64)
        for y in (ray, -ray):
            # y.(A v) <= safe_bound(0, -y)-style upper bound over the box; rows force y.(A v) >= L
            y_lo = np.where(y > 0, np.isfinite(self.row_lo), np.isfinite(self.row_hi))
            yy = np.where(y_lo, y, 0.0)
            low = np.where(yy > 0, yy * np.nan_to_num(self.row_lo, neginf=0.0),
                           yy * np.nan_to_num(self.row_hi, posinf=0.0))
            r = self.At @ yy
            upper_box = np.maximum(r * self.col_lo, r * self.col_hi)
            mag = float(np.sum(np.abs(low)) + np.sum(np.abs(upper_box))
                        + np.sum((self.absAt @ np.abs(yy)) * np.maximum(np.abs(self.col_lo), np.abs(self.col_hi))))
            k = int(self._col_nnz.max(initial=0)) + len(low) + len(r) + 8
            if float(np.sum(low)) - float(np.sum(upper_box)) > 4.0 * gamma(k) * mag + TINY:
                return True
        return False

    def maximize_milp(self, c: Array, time_limit: float) -> MILPSolution:
        """max c.v with integrality within `time_limit` seconds: HiGHS's numbers, cross-examined.

        HiGHS 1.16 sometimes declares a wrong optimum (a dual bound below a feasible integral point:
        tests/test_certify_milp.py, seeds 302 and 369590), and which runs go wrong depends on its
        random seed and presolve. So every objective is solved once per seed of `OPINION_SEEDS` (the
        later runs share whatever time the first left) and the *largest* dual bound is kept, with the
        best incumbent of all runs: a wrong bound now needs every opinion to be wrong at once.
        Without binaries HiGHS solves an LP and reports no MIP dual bound; then the LP's rigorous
        dual bound is returned instead (`rigorous=True`).
        """
        if not self.integer:
            lp = self.maximize_lp(c)
            value = lp.value if lp.v is not None else -np.inf
            status = "optimal" if lp.status in ("optimal", "infeasible") else lp.status
            return MILPSolution(lp.bound, value, lp.v, status, 0.0, rigorous=True)
        self.set_objective(c)
        deadline = time.perf_counter() + float(time_limit)
        best: MILPSolution | None = None
        for seed in OPINION_SEEDS:
            left = deadline - time.perf_counter()
            if best is not None and left <= 0:
                best.opinions_missing += 1
                if best.status == "optimal":
                    best.status = UNCONFIRMED
                continue
            run = self._run_milp(seed, max(left, 0.01))
            best = run if best is None else best.merge(run)
        assert best is not None
        return best

    def _run_milp(self, seed: int, time_limit: float) -> MILPSolution:
        self.highs.setOptionValue("random_seed", int(seed))
        self.highs.setOptionValue("time_limit", float(time_limit))
        self.highs.run()
        status = self.highs.getModelStatus()
        info = self.highs.getInfo()
        name = {highspy.HighsModelStatus.kOptimal: "optimal", highspy.HighsModelStatus.kTimeLimit: "time_limit",
                highspy.HighsModelStatus.kInfeasible: "infeasible"}.get(status, str(status))
        v: Array | None = None
        if info.primal_solution_status == highspy.kSolutionStatusFeasible:
            v = np.asarray(self.highs.getSolution().col_value, dtype=np.float64)
        value = float(info.objective_function_value) if v is not None else -np.inf
        dual = float(info.mip_dual_bound)
        if not np.isfinite(dual) or name not in ("optimal", "time_limit"):
            dual = np.inf
        return MILPSolution(dual, value, v, name, float(info.mip_gap))
