"""The joint LP / MILP encoding of an (f, g) pair over one input box, as sparse matrices.

One encoding serves the LP relaxation (`lp.py`), the exact MILP (`milp.py`), branch-and-bound
(`bab.py`) and the per-neuron bound tightening that gives the MILP its tight big-M constants.
Columns are the input x, every affine op's output of f and of g, and the post-ReLU values h of
unstable neurons; rows are the ops' equalities, the ReLU constraints and optional cuts on Delta.

Why this shape:
- Every constraint coefficient is *exactly* a weight of the network (ops are never composed: a
  layer with several ops gets one column block per op), so the encoding describes the real network;
  the only inexact quantities are the solver's answers, which `highs.py` turns into sound bounds.
- A neuron of g whose weight row equals f's row on the *same* input columns is the same quantity as
  f's neuron: it shares f's column (a pruned twin shares all of layer 0; a twin identical to f
  shares everything, so Delta is identically 0). Stable neurons need no ReLU column (h = a or 0).
- A ReLU split (branch-and-bound) is only a bound change on existing rows/columns, so one solver
  model is re-used, warm-started, for every node.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from prunecert.certify.result import PairBounds
from prunecert.core.interval import Bounds, affine_interval
from prunecert.core.pair import Pair
from prunecert.core.rounding import UNIT_ROUNDOFF
from prunecert.errors import ConfigError
from prunecert.network import AffineOp, Flatten, Linear

ZERO = -1  # column id of the constant 0 (the output of a ReLU that is always off)
MAX_COLUMNS = 60_000
MAX_NONZEROS = 8_000_000

Array = npt.NDArray[np.float64]
Columns = npt.NDArray[np.int64]         # column ids of an encoding (ZERO: the constant 0)
Interval = tuple[Array, Array]          # (lower, upper), one entry per neuron of a layer
OpTrace = tuple[AffineOp, Columns, Columns] | None  # (op, input columns, output columns); None: Flatten
Block = tuple[str, int, int, Columns]   # (side "f"/"g"/"gf", layer, op index, output columns)

_MATRICES: "weakref.WeakKeyDictionary[AffineOp, sp.csr_matrix]" = weakref.WeakKeyDictionary()


def op_matrix(op: AffineOp) -> sp.csr_matrix:
    """The op's linear part as a sparse (n_out, n_in) matrix whose entries are exactly its weights.

    Built by applying the op to unit vectors: every output is one weight times 1 plus exact zeros,
    so no rounding happens. Cached per op object.
    """
    cached = _MATRICES.get(op)
    if cached is not None:
        return cached
    if isinstance(op, Linear):
        mat = sp.csr_matrix(op.weight.numpy())
    else:
        n_in = math.prod(op.in_shape)
        parts, chunk = [], max(1, 2_000_000 // max(1, math.prod(op.out_shape)))
        with torch.no_grad():
            for start in range(0, n_in, chunk):
                k = min(chunk, n_in - start)
                eye = torch.zeros((k, n_in), dtype=torch.float64)
                eye[torch.arange(k), torch.arange(start, start + k)] = 1.0
                parts.append(sp.csr_matrix(op.linear(eye.reshape(k, *op.in_shape)).reshape(k, -1).numpy()))
        mat = sp.vstack(parts).T.tocsr()
    mat.sort_indices()
    _MATRICES[op] = mat
    return mat


@dataclass
class RegionBounds:
    """Sound bounds for ONE region, flattened per layer: pre-activations of f and g, and Delta.

    What an encoding needs for its ReLU constraints (and big-M constants) and its Delta cuts.
    """

    f: list[Interval]
    g: list[Interval]
    delta: list[Interval] | None = None

    @classmethod
    def from_pair_bounds(cls, pb: PairBounds, b: int = 0) -> "RegionBounds":
        """Take batch entry `b` of a PairBounds (anything with f, g, delta lists of Bounds)."""
        def flat(bounds: Sequence[Bounds]) -> list[Interval]:
            return [(x.lower[b].reshape(-1).double().numpy().copy(), x.upper[b].reshape(-1).double().numpy().copy())
                    for x in bounds]
        delta = flat(pb.delta) if getattr(pb, "delta", None) is not None else None
        return cls(flat(pb.f), flat(pb.g), delta)

    def intersect(self, other: "RegionBounds") -> "RegionBounds":
        """Both are sound, so is their intersection (the tighter side of each)."""
        def meet(a: list[Interval], b: list[Interval]) -> list[Interval]:
            return [(np.maximum(x[0], y[0]), np.minimum(x[1], y[1])) for x, y in zip(a, b)]
        if self.delta is None or other.delta is None:
            delta = self.delta if other.delta is None else other.delta
        else:
            delta = meet(self.delta, other.delta)
        return RegionBounds(meet(self.f, other.f), meet(self.g, other.g), delta)

    def copy(self) -> "RegionBounds":
        def dup(bounds: list[Interval]) -> list[Interval]:
            return [(lo.copy(), hi.copy()) for lo, hi in bounds]
        return RegionBounds(dup(self.f), dup(self.g), None if self.delta is None else dup(self.delta))


@dataclass
class Neuron:
    """An unstable ReLU of the encoding (possibly shared by f and g)."""

    a: int            # column of the pre-activation
    h: int            # column of the post-activation
    z: int            # column of the binary (MILP) or -1
    lower_row: int    # row h - a >= 0 (set to == 0 by an "active" split)
    lo: float
    hi: float
    layer: int
    owners: tuple[tuple[str, int], ...]  # (("f", i), ("g", i)): which network's neuron i it is


@dataclass
class Encoding:
    """Columns, rows and index maps of the pair's encoding (HiGHS ranged-row form)."""

    col_lo: Array
    col_hi: Array
    integer: npt.NDArray[np.bool_]    # per column
    A: sp.csr_matrix                  # rows x columns
    row_lo: Array
    row_hi: Array
    x: Columns                        # columns of the (flattened) input
    af: list[Columns]                 # per layer: columns of f's pre-activations
    ag: list[Columns]
    gf: list[Columns | None]          # per layer: g's layer l applied to f's layer input (local)
    hf: list[Columns]                 # per hidden layer: columns of f's post-activations (ZERO = 0)
    hg: list[Columns]
    neurons: list[Neuron] = field(default_factory=list)
    milp: bool = False
    blocks: list[Block] = field(default_factory=list)

    def embed(self, pair: Pair, x: npt.ArrayLike) -> Array:
        """The column vector of a real input x (float64 forward pass): a feasible point, for tests
        and MILP start solutions. Satisfies every row up to the forward pass's rounding."""
        v = np.zeros(self.n_cols)
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, *pair.input_shape)
        v[self.x] = xt.reshape(-1).numpy()
        values: dict[tuple[str, int, int], Array] = {}
        with torch.no_grad():
            inputs: dict[str, torch.Tensor | None] = {"f": xt, "g": xt}
            for l in range(len(self.af)):
                for side, layers in (("f", pair.layers_f), ("g", pair.layers_g), ("gf", pair.layers_g)):
                    if side == "gf" and l == 0:
                        continue
                    h = inputs["f" if side == "gf" else side]
                    assert h is not None  # layers l > 0 exist only after a ReLU layer set "f_next", "g_next"
                    for j, op in enumerate(layers[l].ops):
                        h = op.forward(h)
                        values[(side, l, j)] = h.reshape(-1).numpy()
                    if side != "gf":
                        inputs[side + "_next"] = torch.relu(h)
                inputs = {"f": inputs.get("f_next"), "g": inputs.get("g_next")}
        for side, l, j, cols in self.blocks:
            ok = cols >= 0
            v[cols[ok]] = values[(side, l, j)][ok]
        for n in self.neurons:
            v[n.h] = max(v[n.a], 0.0)
            if n.z >= 0:
                v[n.z] = 1.0 if v[n.a] > 0 else 0.0
        return v

    @property
    def n_cols(self) -> int:
        return len(self.col_lo)

    @property
    def n_rows(self) -> int:
        return len(self.row_lo)



class _Builder:
    """Accumulates columns (with bounds) and ranged rows, then emits CSR arrays."""

    def __init__(self) -> None:
        self.col_lo: list[Array] = []
        self.col_hi: list[Array] = []
        self.integer: list[npt.NDArray[np.bool_]] = []
        self.tight: list[tuple[Columns, Array, Array]] = []
        self.n = 0
        self.r_idx: list[npt.NDArray[np.int64]] = []
        self.c_idx: list[Columns] = []
        self.vals: list[Array] = []
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []

    def cols(self, lo: npt.ArrayLike, hi: npt.ArrayLike, integer: bool = False) -> Columns:
        lo = np.asarray(lo, dtype=np.float64).ravel()
        hi = np.asarray(hi, dtype=np.float64).ravel()
        ids = np.arange(self.n, self.n + len(lo), dtype=np.int64)
        self.col_lo.append(lo.copy())
        self.col_hi.append(hi.copy())
        self.integer.append(np.full(len(lo), integer))
        self.n += len(lo)
        if self.n > MAX_COLUMNS:
            raise ConfigError(f"the LP/MILP encoding of this pair needs more than {MAX_COLUMNS} columns; it is too "
                              f"large for lp/milp/bab: use --method diff-linear")
        return ids

    def tighten(self, cols: Columns, lo: Array, hi: Array) -> None:
        ok = cols >= 0
        self.tight.append((cols[ok], np.asarray(lo)[ok], np.asarray(hi)[ok]))

    def row(self, cols: npt.ArrayLike, vals: npt.ArrayLike, lo: float, hi: float) -> int:
        cols = np.asarray(cols, dtype=np.int64)
        vals = np.asarray(vals, dtype=np.float64)
        keep = (cols != ZERO) & (vals != 0)
        self.c_idx.append(cols[keep])
        self.vals.append(vals[keep])
        self.r_idx.append(np.full(int(keep.sum()), len(self.row_lo), dtype=np.int64))
        self.row_lo.append(float(lo))
        self.row_hi.append(float(hi))
        return len(self.row_lo) - 1

    def finish(self) -> tuple[Array, Array, npt.NDArray[np.bool_], sp.csr_matrix, Array, Array]:
        nnz = sum(len(v) for v in self.vals)
        if nnz > MAX_NONZEROS:
            raise ConfigError(f"the LP/MILP encoding of this pair has {nnz} non-zeros, above the limit {MAX_NONZEROS}; "
                              f"it is too large for lp/milp/bab: use --method diff-linear")
        col_lo, col_hi = np.concatenate(self.col_lo), np.concatenate(self.col_hi)
        for cols, lo, hi in self.tight:
            np.maximum.at(col_lo, cols, lo)
            np.minimum.at(col_hi, cols, hi)
        col_hi = np.maximum(col_hi, col_lo)  # empty intersections cannot happen for sound bounds; keep valid
        def cat(parts: list[npt.NDArray[np.float64]] | list[npt.NDArray[np.int64]], dtype: type) -> npt.NDArray[Any]:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        A = sp.csr_matrix((cat(self.vals, np.float64), (cat(self.r_idx, np.int64), cat(self.c_idx, np.int64))),
                          shape=(len(self.row_lo), self.n))
        A.sum_duplicates()
        return (col_lo, col_hi, np.concatenate(self.integer), A,
                np.asarray(self.row_lo, dtype=np.float64), np.asarray(self.row_hi, dtype=np.float64))


def _row_signature(M: sp.csr_matrix, i: int, in_cols: Columns) -> tuple[Columns, Array]:
    """Row i of M as (column ids, coefficients) over the encoding's columns, sorted, zeros dropped."""
    s, e = M.indptr[i], M.indptr[i + 1]
    cols: Columns = in_cols[M.indices[s:e]]
    vals: Array = M.data[s:e]
    keep = cols != ZERO
    cols, vals = cols[keep], vals[keep]
    order = np.argsort(cols, kind="stable")
    return cols[order], vals[order]


def _affine_block(b: _Builder, op: AffineOp, in_cols: Columns, in_lo: Array, in_hi: Array,
                  twin: tuple[AffineOp, Columns, Columns] | None = None) -> tuple[Columns, Array, Array]:
    """Columns for op(input block) with rows `out - M in = bias`; returns (cols, lo, hi).

    `twin` = (f's op, f's input cols, f's output cols): a row of `op` that is exactly f's row over
    the same columns, with the same bias, re-uses f's column instead of a new one.
    """
    M = op_matrix(op)
    bias = op.bias.reshape(-1).numpy()
    with torch.no_grad():
        bnd = affine_interval(op, torch.as_tensor(in_lo).reshape(1, *op.in_shape),
                              torch.as_tensor(in_hi).reshape(1, *op.in_shape))
    lo, hi = bnd.lower.reshape(-1).numpy().copy(), bnd.upper.reshape(-1).numpy().copy()
    out = np.full(M.shape[0], ZERO, dtype=np.int64)
    shared = np.zeros(M.shape[0], dtype=bool)
    if twin is not None:
        f_op, f_in, f_out = twin
        Mf, bf = op_matrix(f_op), f_op.bias.reshape(-1).numpy()
        for i in np.flatnonzero(bias == bf):
            gc, gv = _row_signature(M, int(i), in_cols)
            fc, fv = _row_signature(Mf, int(i), f_in)
            if np.array_equal(gc, fc) and np.array_equal(gv, fv):
                out[i], shared[i] = f_out[i], True
    new = np.flatnonzero(~shared)
    if len(new):
        out[new] = b.cols(lo[new], hi[new])
        for i in new:
            s, e = M.indptr[i], M.indptr[i + 1]
            b.row(np.concatenate([[out[i]], in_cols[M.indices[s:e]]]), np.concatenate([[1.0], -M.data[s:e]]),
                  bias[i], bias[i])
    return out, lo, hi


def _run_layer(b: _Builder, ops: Sequence[AffineOp], in_cols: Columns, in_lo: Array, in_hi: Array,
               twin_trace: list[OpTrace] | None = None) -> tuple[Columns, Array, Array, list[OpTrace]]:
    """Encode one layer's ops; returns (cols, lo, hi, trace) with trace[j] = (op, in, out) per op."""
    cols, lo, hi = np.asarray(in_cols), np.asarray(in_lo, dtype=np.float64), np.asarray(in_hi, dtype=np.float64)
    trace: list[OpTrace] = []
    for j, op in enumerate(ops):
        if isinstance(op, Flatten):  # C-order flattening: the same columns
            trace.append(None)
            continue
        twin = twin_trace[j] if twin_trace is not None else None
        new_cols, lo, hi = _affine_block(b, op, cols, lo, hi, twin)
        trace.append((op, cols, new_cols))
        cols = new_cols
    return cols, lo, hi, trace


def relu_upper_line(lo: float, hi: float) -> tuple[float, float]:
    """Slope s and intercept t with s a + t >= relu(a) on [lo, hi] *exactly*, despite rounding.

    The chord through (lo, 0) and (hi, hi) is the tightest such line. With the rounded slope s, t is
    the least value keeping both end points on or above relu (then the whole segment is, relu being
    convex), computed in float and then enlarged by a few ulps of every term involved.
    """
    s = hi / (hi - lo)
    t = max(-s * lo, hi - s * hi)
    t += (abs(t) + abs(s * lo) + abs(hi) + abs(s * hi)) * 8 * UNIT_ROUNDOFF
    return s, float(np.nextafter(t, np.inf))


def _relu(b: _Builder, a: Columns, lo: Array, hi: Array, milp: bool, relu_of: dict[int, Neuron | _Alias],
          neurons: list[Neuron], layer: int, who: str) -> tuple[Columns, Array, Array]:
    """Post-activation columns of the block `a` (ZERO when off, `a` itself when on)."""
    h = np.empty_like(a)
    h_lo, h_hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    for i, col in enumerate(a):
        if col in relu_of:  # a neuron shared with f: one ReLU
            n = relu_of[col]
            h[i] = n.h
            if isinstance(n, Neuron):
                n.owners = n.owners + ((who, i),)
            continue
        if hi[i] <= 0:
            h[i] = ZERO
        elif lo[i] >= 0:
            h[i] = col
        else:
            hc = int(b.cols([0.0], [hi[i]])[0])
            zc = int(b.cols([0.0], [1.0], integer=True)[0]) if milp else -1
            lower_row = b.row([hc, col], [1.0, -1.0], 0.0, np.inf)        # h >= a
            if milp:
                b.row([hc, col, zc], [1.0, -1.0, -lo[i]], -np.inf, -lo[i])  # h <= a - lo (1 - z)
                b.row([hc, zc], [1.0, -hi[i]], -np.inf, 0.0)                # h <= hi z
            else:
                s, t = relu_upper_line(float(lo[i]), float(hi[i]))
                b.row([hc, col], [1.0, -s], -np.inf, t)                     # h <= s a + t
            n = Neuron(int(col), hc, zc, lower_row, float(lo[i]), float(hi[i]), layer, ((who, i),))
            neurons.append(n)
            relu_of[col] = n
            h[i] = hc
            continue
        relu_of[col] = _Alias(h[i])
    return h, h_lo, h_hi


@dataclass
class _Alias:
    """A stable neuron's pre-activation column that a twin of g meets again: its h column (ZERO or itself)."""

    h: int


def encoding_columns(pair: Pair) -> int:
    """A lower bound on the columns `build_encoding` needs: the input, every op output of f, and of
    g from the first op where g differs from f (before it, g's columns are f's)."""
    n = math.prod(pair.input_shape)
    shared = True
    for lf, lg in pair.layer_pairs():
        for opf, opg in zip(lf.ops, lg.ops):
            if isinstance(opf, Flatten):
                continue
            width = math.prod(opf.out_shape)
            shared = shared and all(torch.equal(a, b) for a, b in zip(opf.tensors().values(), opg.tensors().values()))
            n += width if shared else 2 * width
    return n


def encodable(pair: Pair) -> bool:
    """Whether the pair's LP/MILP encoding can fit in MAX_COLUMNS."""
    return encoding_columns(pair) <= MAX_COLUMNS


def check_encodable(pair: Pair, what: str, advice: str) -> None:
    """Refuse, before any work, a pair whose LP/MILP encoding would exceed MAX_COLUMNS."""
    n = encoding_columns(pair)
    if n > MAX_COLUMNS:
        raise ConfigError(f"{what}: the LP/MILP encoding of this pair needs at least {n} columns (limit "
                          f"{MAX_COLUMNS}); {advice}")


def build_encoding(pair: Pair, lo: npt.ArrayLike, hi: npt.ArrayLike, pre: RegionBounds, milp: bool = False, local: bool = False,
                   delta_cuts: bool = True, upto: int | None = None) -> Encoding:
    """Encode f and g over the box [lo, hi] given sound pre-activation bounds `pre` (one region).

    `milp`: binaries (big-M) for unstable neurons instead of the triangle relaxation. `local`: also
    encode g's layer l applied to f's layer input (local-deviation objectives). `upto`: encode
    layers 0..upto only (per-neuron tightening of layer upto+1 needs no more).
    """
    b = _Builder()
    lo = np.asarray(lo, dtype=np.float64).reshape(-1)
    hi = np.asarray(hi, dtype=np.float64).reshape(-1)
    x = b.cols(lo, hi)
    n_layers = pair.n_layers if upto is None else min(pair.n_layers, upto + 1)
    af: list[Columns] = []
    ag: list[Columns] = []
    gf: list[Columns | None] = []
    hf: list[Columns] = []
    hg: list[Columns] = []
    neurons: list[Neuron] = []
    blocks: list[Block] = []
    relu_of: dict[int, Neuron | _Alias] = {}
    f_in, f_lo, f_hi = x, lo, hi
    g_in, g_lo, g_hi = x, lo, hi
    for l, (lf, lg) in enumerate(pair.layer_pairs()[:n_layers]):
        a_f, flo, fhi, trace = _run_layer(b, lf.ops, f_in, f_lo, f_hi)
        a_g, glo, ghi, trace_g = _run_layer(b, lg.ops, g_in, g_lo, g_hi, trace)
        blocks += [(side, l, j, t[2]) for side, tr in (("f", trace), ("g", trace_g))
                   for j, t in enumerate(tr) if t is not None]
        flo, fhi = np.maximum(flo, pre.f[l][0]), np.minimum(fhi, pre.f[l][1])
        glo, ghi = np.maximum(glo, pre.g[l][0]), np.minimum(ghi, pre.g[l][1])
        same = a_f == a_g  # one quantity: both bound sets apply
        flo[same] = glo[same] = np.maximum(flo[same], glo[same])
        fhi[same] = ghi[same] = np.minimum(fhi[same], ghi[same])
        fhi, ghi = np.maximum(fhi, flo), np.maximum(ghi, glo)
        b.tighten(a_f, flo, fhi)
        b.tighten(a_g, glo, ghi)
        af.append(a_f)
        ag.append(a_g)
        if local and l > 0:
            cols, _, _, trace_gf = _run_layer(b, lg.ops, f_in, f_lo, f_hi, trace)
            gf.append(cols)
            blocks += [("gf", l, j, t[2]) for j, t in enumerate(trace_gf) if t is not None]
        else:
            gf.append(a_g if l == 0 else None)
        if delta_cuts and pre.delta is not None:
            dlo, dhi = pre.delta[l]
            for i in np.flatnonzero(~same):
                if dlo[i] > flo[i] - ghi[i] or dhi[i] < fhi[i] - glo[i]:
                    b.row([a_f[i], a_g[i]], [1.0, -1.0], dlo[i], dhi[i])
        if not lf.relu or l == n_layers - 1:
            break
        h_f, f_lo, f_hi = _relu(b, a_f, flo, fhi, milp, relu_of, neurons, l, "f")
        h_g, g_lo, g_hi = _relu(b, a_g, glo, ghi, milp, relu_of, neurons, l, "g")
        hf.append(h_f)
        hg.append(h_g)
        f_in, g_in = h_f, h_g
    col_lo, col_hi, integer, A, row_lo, row_hi = b.finish()
    return Encoding(col_lo, col_hi, integer, A, row_lo, row_hi, x, af, ag, gf, hf, hg, neurons, milp, blocks)
