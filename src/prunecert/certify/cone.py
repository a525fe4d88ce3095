"""The LP encoding plus an L2-ball cone ||x - c||_2 <= r, in cvxpy (Clarabel), with sound bounds.

HiGHS has no cone constraints, so for L2 regions `lp.py` hands the reported layer's LPs to this
model. It is built once per encoding with the objective (and the column bounds) as cvxpy
Parameters, so each re-solve skips canonicalisation. The interior-point answer is inexact, so as in
`highs.py` we report a weak-duality bound built from the duals y of the linear rows:

    c.v <= sum_i row-terms(y) + sum_{j not x} max(r_j l_j, r_j u_j) + B_x,
    B_x = min( sum_{j in x} max(r_j l_j, r_j u_j),  r_x . c + r ||r_x||_2 ),

both expressions of B_x being valid bounds of r_x . x over the box and over the ball; float
rounding is covered by the same gamma margin.
"""

from __future__ import annotations

from collections.abc import Callable

import cvxpy as cp
import numpy as np
import numpy.typing as npt

from prunecert.certify.formulation import Array, Encoding
from prunecert.certify.highs import LPSolution, dual_terms
from prunecert.core.rounding import TINY, UNIT_ROUNDOFF, gamma
from prunecert.errors import ConfigError

MAX_CONE_COLUMNS = 20_000


class ConeModel:
    """max c.v over the triangle-relaxation encoding intersected with an L2 ball on x."""

    def __init__(self, enc: Encoding, center: npt.ArrayLike, radius: float) -> None:
        if enc.n_cols > MAX_CONE_COLUMNS:
            raise ConfigError(f"lp with an L2 ball: the encoding has {enc.n_cols} columns, above the cone "
                              f"model's limit {MAX_CONE_COLUMNS}; use diff-linear for this network")
        self.enc, self.center, self.radius = enc, np.asarray(center, dtype=np.float64).reshape(-1), float(radius)
        self.col_lo, self.col_hi = enc.col_lo.copy(), enc.col_hi.copy()
        self.row_lo, self.row_hi = enc.row_lo, enc.row_hi
        self.At = enc.A.T.tocsr()
        self.absAt = abs(self.At)
        self._col_nnz = np.diff(enc.A.tocsc().indptr)
        eq = self.row_lo == self.row_hi
        up = ~eq & np.isfinite(self.row_hi)
        dn = ~eq & np.isfinite(self.row_lo)
        self.rows = {"eq": np.flatnonzero(eq), "up": np.flatnonzero(up), "dn": np.flatnonzero(dn)}
        v = cp.Variable(enc.n_cols)
        self.c = cp.Parameter(enc.n_cols)
        self.lo_p, self.hi_p = cp.Parameter(enc.n_cols), cp.Parameter(enc.n_cols)
        A = enc.A.tocsr()
        cons: dict[str, cp.Constraint] = {}
        if len(self.rows["eq"]):
            cons["eq"] = A[self.rows["eq"]] @ v == self.row_lo[self.rows["eq"]]
        if len(self.rows["up"]):
            cons["up"] = A[self.rows["up"]] @ v <= self.row_hi[self.rows["up"]]
        if len(self.rows["dn"]):
            cons["dn"] = A[self.rows["dn"]] @ v >= self.row_lo[self.rows["dn"]]
        self.cons = cons
        self.box = [v >= self.lo_p, v <= self.hi_p]
        extra = self.box + [cp.SOC(cp.Constant(self.radius), v[enc.x] - self.center)]
        self.problem = cp.Problem(cp.Maximize(self.c @ v), list(cons.values()) + extra)
        self.v = v

    def set_col_bounds(self, cols: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike) -> None:
        ids = np.atleast_1d(np.asarray(cols))
        self.col_lo[ids], self.col_hi[ids] = lo, hi

    def maximize_lp(self, c: Array) -> LPSolution:
        self.c.value = np.asarray(c, dtype=np.float64)
        self.lo_p.value, self.hi_p.value = self.col_lo, self.col_hi
        try:
            self.problem.solve(solver=cp.CLARABEL)  # type: ignore[no-untyped-call]  # cvxpy leaves solve unannotated
        except cp.error.SolverError:
            return LPSolution(self.safe_bound(c, np.zeros(self.enc.n_rows)), np.nan, None, "solver_error")
        y = np.zeros(self.enc.n_rows)
        for kind, sign in (("eq", 1.0), ("up", 1.0), ("dn", -1.0)):
            if kind in self.cons and self.cons[kind].dual_value is not None:
                # a ranged row (both sides finite) is in "up" and "dn": its duals add up
                y[self.rows[kind]] += sign * np.asarray(self.cons[kind].dual_value, dtype=np.float64).reshape(-1)
        value = float(self.problem.value) if self.problem.value is not None else np.nan
        v = None if self.v.value is None else np.asarray(self.v.value, dtype=np.float64)
        z = None
        if all(b.dual_value is not None for b in self.box):
            z = (np.asarray(self.box[1].dual_value, dtype=np.float64).reshape(-1)
                 - np.asarray(self.box[0].dual_value, dtype=np.float64).reshape(-1))[self.enc.x]
        return LPSolution(self.safe_bound(c, y, z), value, v, str(self.problem.status))

    def safe_bound(self, c: Array, y: Array, z: Array | None = None) -> float:
        """Weak-duality bound with the ball for the x columns (see module docstring)."""
        y, r, row_terms, col_terms = dual_terms(self, c, y)
        x = self.enc.x
        rx = r[x]
        box_x = float(np.sum(col_terms[x]))
        ball_x = min(self._split_bound(rx, np.zeros_like(rx)), self._split_bound(rx, z) if z is not None else np.inf)
        mask = np.ones(len(col_terms), dtype=bool)
        mask[x] = False
        total = float(np.sum(row_terms) + np.sum(col_terms[mask])) + min(box_x, ball_x)
        mag_x = np.maximum(np.abs(self.col_lo), np.abs(self.col_hi))
        mag_x[x] = np.maximum(mag_x[x], np.abs(self.center) + self.radius)
        k = int(self._col_nnz.max(initial=0)) + len(row_terms) + len(col_terms) + 8
        mag = float(np.sum(np.abs(row_terms)) + np.sum(np.abs(col_terms)) + abs(ball_x)
                    + np.sum((np.abs(c) + self.absAt @ np.abs(y)) * mag_x))
        return float(np.nextafter(total + 2.0 * gamma(k) * mag + TINY, np.inf))

    def _split_bound(self, rx: Array, z: Array) -> float:
        """Bound r_x . x over box and ball by splitting r_x = z + s: z over the box, s over the ball."""
        z = np.where(np.isfinite(z), z, 0.0)
        s = rx - z
        lo, hi = self.col_lo[self.enc.x], self.col_hi[self.enc.x]
        box = np.maximum(z * lo, z * hi)
        ball = float(s @ self.center) + self.radius * float(np.linalg.norm(s))
        # rounding of s = r - z, the dot products, the norm and the sums
        err = gamma(len(s) + 8) * (float(np.abs(s) @ (np.abs(self.center) + self.radius)) + float(np.abs(box).sum())
                                   + float(np.abs(z) @ (np.abs(self.center) + self.radius)))
        return float(np.sum(box)) + ball + 2 * err + abs(ball) * 4 * UNIT_ROUNDOFF


def cone_factory(center: npt.ArrayLike, radius: float) -> Callable[[Encoding], ConeModel]:
    """A model factory for `lp.refine_region` that adds the ball to every encoding."""
    def make(enc: Encoding) -> ConeModel:
        return ConeModel(enc, center, radius)
    return make
