"""Differential linear bounds (the default method): NeuroDiff-style symbolic Delta over CROWN.

Layer by layer, for every region of the batch:
1. ReluDiff intervals from the previous layer's final bounds (`diff_interval.diff_step`): a cheap
   floor, the neurons worth back-substituting, and the op-input magnitudes the rounding margins need;
2. CROWN back-substitution (`backsub.Engine`) of +-e_i over a^f_l through f and over a^g_l through g
   (hidden layers: only the neurons still unstable in that region);
3. the differential back-substitution of +-e_i over Delta a_l through the pair (Delta h relaxed by
   `relax.DeltaRelax`), and of the local deviation (L^f_l - L^g_l) h^f_{l-1} through f;
4. intersect everything, plus a^f - a^g and the refinements a^g = a^f - Delta, a^f = a^g + Delta;
   these bounds define the next layer's relaxations.
Then, for the logits: alpha-CROWN-style optimisation of the Delta rows' relaxation parameters
(`alpha.optimise_rows`), and agreement margins f_c - f_j, g_c - g_j back-substituted through each
network for the class c predicted at each region's centre. The result is finally intersected with
an independent `diff_interval_bounds` run, so it is never looser than diff-interval (or naive).
On nets with costly layers (conv nets) a first Delta pass leaves out the relaxation rows of (3) and
the optimisation, and walks only the bounds that can carry a layer's reported maximum (`rows.py`);
only regions where it beats CROWN on f - g by DELTA_GAIN get the full pass, and hidden layers' conv
transposes run in float32 with their own margin (`layout.fast_ok`).
Derivations and the rounding argument: docs/theory.md, "Differential linear bounds".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
import time
from typing import TypeVar, cast

import torch

from prunecert.certify.alpha import optimise_rows
from prunecert.certify.alpha_diff import optimise_diff_rows
from prunecert.certify.backsub import Engine, Form, OpCtx, concretise
from prunecert.certify.firstop import attach_first
from prunecert.certify.diff_interval import diff_interval_bounds, difference_op, diff_step, relu_delta
from prunecert.core.interval import Bounds, affine_interval
from prunecert.certify.naive import MAX_MARGIN_CLASSES, margins_from_inputs
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch, boxes_or_batch
from prunecert.certify.layout import Layout
from prunecert.certify.relax import DeltaRelax, SideRelax
from prunecert.certify.rows import (FULL_COST, ROW_BUDGET, TOP_ROWS, Selection, Walk, bound_rows, bound_rows_pair,
                                    bound_top_rows, bound_widest, walk_width)
from prunecert.certify.result import MethodInfo, PairBounds, meet, sub_bounds
from prunecert.errors import ConfigError
from prunecert.network import AffineOp, Conv2d, Flatten, Linear, Scale

OPTIMISE_SHARE = 0.8   # the logit rows optimised: bound >= this share of the region's largest |Delta| bound
FAST_HIDDEN = True  # hidden layers' rows may take float32 conv transposes (the logits' rows stay float64)
DELTA_GAIN = 1e-3   # nets with costly layers: the full Delta pass runs where the first beats CROWN on f - g by this
SEARCH_GAP = 0.01   # the Delta slope search skips logit rows whose default walk is above the bound by this share of the max

_OpPair = tuple[AffineOp, AffineOp, AffineOp | None]    # f's op, g's op, their difference op (None: identical)
_OpInputs = tuple[Bounds, Bounds, Bounds | None]        # bounds on x^f, x^g, Delta x (None: exactly 0)
T = TypeVar("T")


def _difference(opf: AffineOp, opg: AffineOp) -> AffineOp | None:
    """The difference op, or None when f's and g's ops are bit-for-bit identical (Delta y = A Delta x)."""
    dop = difference_op(opf, opg)
    if dop is None:
        return None
    parts = {Linear: ("weight", "_bias"), Conv2d: ("weight", "_bias"), Scale: ("scale", "shift")}[type(dop)]
    return None if all(not getattr(dop, k).any() for k in parts) else dop


def _op_pairs(pair: Pair) -> list[list[_OpPair]]:
    """Per layer, (f's op, g's op, their difference op or None)."""
    return [[(of, og, _difference(of, og)) for of, og in zip(lf.ops, lg.ops)] for lf, lg in pair.layer_pairs()]


def _amax(b: Bounds | None) -> torch.Tensor | None:
    return None if b is None else torch.maximum(b.lower.abs(), b.upper.abs())


class _Memo:
    """Results one diff_linear_bounds call would otherwise compute again: its passes (CROWN on f - g,
    the Delta passes) and each layer's local chain apply the same ops to bit-for-bit the same bounds
    (a^f, a^g entering a layer usually are; Delta's differ), so each network's interval step, the
    op magnitudes of the walks and the structural zeros of Delta are looked up by op and inputs (equal
    tensors, `torch.equal`) before they are computed. Held for one call: a few tensors per op."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], list[tuple[tuple[torch.Tensor, ...], object]]] = {}

    def get(self, kind: str, op: object, args: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
        """compute(), or what it returned before for `op` and equal `args` (the caller keeps `op` alive)."""
        seen = self._seen.setdefault((kind, id(op)), [])
        for old, value in seen:
            if all(a is b or (a.shape == b.shape and torch.equal(a, b)) for a, b in zip(old, args)):
                return cast(T, value)
        value = compute()
        seen.append((args, value))
        return value

    def interval(self, op: AffineOp, x: Bounds) -> Bounds:
        """`affine_interval(op, x)`."""
        return self.get("interval", op, (x.lower, x.upper), lambda: affine_interval(op, x.lower, x.upper))

    def zero_delta(self, ops: Sequence[_OpPair], zero_in: torch.Tensor | None) -> torch.Tensor | None:
        """`_zero_delta(ops, zero_in)`."""
        args = () if zero_in is None else (zero_in,)
        return self.get("zero" if zero_in is None else "zero-after", ops, args, lambda: _zero_delta(ops, zero_in))

    def abs_linear(self, op: AffineOp, x: torch.Tensor) -> torch.Tensor:
        """`op.abs_linear(x)` (|A| x, the magnitudes of the walks' rounding margins)."""
        return self.get("abs_linear", op, (x,), lambda: op.abs_linear(x))


def _chain(ops: Sequence[_OpPair], xf: Bounds, xg: Bounds, dx: Bounds | None, memo: _Memo
           ) -> tuple[list[_OpInputs], tuple[Bounds, Bounds, Bounds]]:
    """Interval (ReluDiff) pass through a layer's op pairs: the bounds entering each op, and the outputs.

    dx None means Delta = 0 structurally (the network input, or identical ops applied to it).
    """
    inputs: list[_OpInputs] = []
    for opf, opg, dop in ops:
        inputs.append((xf, xg, dx))
        zero = dx is None and dop is None
        xf, xg, dx = diff_step(opf, opg, dop, xf, xg, dx, memo.interval)
        dx = None if zero else dx
    if dx is None:
        dx = Bounds(torch.zeros_like(xf.lower), torch.zeros_like(xf.lower))
    return inputs, (xf, xg, dx)


def _zero_delta(ops: Sequence[_OpPair], zero_in: torch.Tensor | None) -> torch.Tensor | None:
    """Where Delta is exactly 0 at the output of a layer's op chain, for every input of the domain: a
    bool tensor of the output shape, or None when it is 0 everywhere. `zero_in`: the same at the
    chain's input (None: everywhere, e.g. the network input).

    Delta y_i = sum_j D_ij x^f_j + sum_j A^g_ij Delta x_j + (b^f_i - b^g_i) is exactly 0 when row i of
    D = A^f - A^g and its bias are 0 and A^g_ij = 0 wherever Delta x_j may be non-zero; ReLU keeps it
    (relu(a) - relu(a) = 0). A completed pruned twin has such neurons: a removed neuron keeps f's
    incoming weights, so its Delta is 0 while its inputs' Deltas are. Tested with non-negative sums
    (|D| 1 + |b_D| and |A^g| [Delta x may be non-zero]), which are 0 in floating point only when every
    term is."""
    z = zero_in
    for opf, opg, dop in ops:
        if z is None and dop is None:
            continue
        one = opf.bias.new_ones((1, *opf.in_shape))
        live = torch.zeros_like(one) if z is None else (~z).to(one.dtype).unsqueeze(0)
        reach = opg.abs_linear(live)[0]
        if dop is not None:
            reach = reach + dop.abs_linear(one)[0] + dop.bias.abs()
        z = (reach == 0).expand(opf.out_shape)
    return z


def _zero_out(b: Bounds, zero: torch.Tensor | None) -> Bounds:
    """Bounds set to exactly 0 where `zero` (None: everywhere) says the quantity is structurally 0."""
    if zero is None:
        return Bounds(torch.zeros_like(b.lower), torch.zeros_like(b.upper))
    if not bool(zero.any()):
        return b
    return Bounds(b.lower.masked_fill(zero, 0.0), b.upper.masked_fill(zero, 0.0))


def _box_exact(ops: Sequence[_OpPair], region: RegionBatch) -> tuple[bool, bool]:
    """Whether intervals are already exact on layer 0 over a box, for a^f/a^g and for Delta: true when
    every op before the last maps boxes to boxes (Flatten, Scale) -- and, for Delta, is the same in f and g."""
    if region.l2 is not None:
        return False, False
    head = ops[:-1]
    nets = all(isinstance(opf, (Flatten, Scale)) for opf, _, _ in head)
    return nets, nets and all(dop is None for _, _, dop in head)


def _contexts(ops: Sequence[_OpPair], inputs: Sequence[_OpInputs], memo: _Memo) -> tuple[list[OpCtx], list[OpCtx]]:
    """Op contexts for walking f (paired with g and the difference ops) and for walking g alone."""
    cf, cg = [], []
    for (opf, opg, dop), (xf, xg, dx) in zip(ops, inputs):
        mf, mg, md = _amax(xf), _amax(xg), _amax(dx)
        assert mf is not None and mg is not None   # xf, xg are bounds (only dx may be None)
        dmag = opf.bias.new_zeros(()) if dop is None else memo.abs_linear(dop, mf) + dop.bias.abs()
        if md is not None:
            dmag = dmag + memo.abs_linear(opg, md)
        xsum_f = _up_sum(mf) if md is None else _up_sum(mf) + _up_sum(md)
        cf.append(OpCtx(opf, memo.abs_linear(opf, mf) + opf.bias.abs(), dop, opg,
                        dmag.expand(mf.shape[0], *opf.out_shape), dx_zero=dx is None, xsum=xsum_f))
        cg.append(OpCtx(opg, memo.abs_linear(opg, mg) + opg.bias.abs(), xsum=_up_sum(mg)))
    return cf, cg


def _up_sum(x: torch.Tensor) -> torch.Tensor:
    """(B,) an upper bound on the sum of each region's (non-negative) entries (`OpCtx.xsum`)."""
    return x.flatten(1).sum(1) * (1 + 2.0 ** -30)


def _local(ops: Sequence[_OpPair], hf: Bounds, memo: _Memo) -> tuple[Bounds, list[OpCtx]]:
    """Interval bounds on a layer's local deviation (g's ops fed with f's input, Delta x := 0) and the
    op contexts of its walk: functions of f's layer input alone, so computed once per call for each."""
    def compute() -> tuple[Bounds, list[OpCtx]]:
        inputs, (_, _, loc) = _chain(ops, hf, hf, None, memo)
        return _zero_out(loc, memo.zero_delta(ops, None)), _contexts(ops, inputs, memo)[0]
    return memo.get("local", ops, (hf.lower, hf.upper), compute)


class _Bounder:
    """Per-call state: the engines over the layers processed so far, the regions."""

    def __init__(self, pair: Pair, region: RegionBatch, ops: list[list[_OpPair]], delta_walks: bool = True,
                 deadline: float | None = None, prior: PairBounds | None = None, relax_rows: bool = True,
                 all_rows: bool = False, logits: Sequence[int] | None = None):
        self.pair, self.region, self.ops, self.delta_walks, self.prior = pair, region, ops, delta_walks, prior
        self.relax_rows, self.all_rows, self.logits = relax_rows, all_rows, logits
        self.deadline, self.truncated = deadline, False
        self._checked: float | None = None   # when `stop` last looked at the clock
        self.walk_top: Bounds | None = None  # the logits' Delta walk with default slopes (where every row is walked)
        self.zero: list[torch.Tensor | None] = []    # per layer: where Delta a_l is structurally 0
        self.ctx_f: list[list[OpCtx]] = []
        self.ctx_g: list[list[OpCtx]] = []
        self.side_f: list[SideRelax] = []
        self.side_g: list[SideRelax] = []
        self.delta: list[DeltaRelax] = []
        self.f = Engine(self.ctx_f, self.side_f)
        self.g = Engine(self.ctx_g, self.side_g)
        self.d = Engine(self.ctx_f, self.side_f, self.delta)
        self._sub: dict[tuple[int, tuple[int, ...]], tuple[Engine, Engine, Engine]] = {}

    def engines(self, idx: torch.Tensor | None) -> tuple[Engine, Engine, Engine]:
        """The f, g and pair engines over the regions `idx` (None: all), kept while the layer lasts."""
        if idx is None:
            return self.f, self.g, self.d
        key = (len(self.ctx_f), tuple(idx.tolist()))
        if key not in self._sub:
            self._sub = {key: (self.f.select(idx), self.g.select(idx), self.d.select(idx))}
        return self._sub[key]

    def _down(self, l: int) -> list[AffineOp]:
        return [opf for k in range(l, -1, -1) for opf, _, _ in reversed(self.ops[k])]

    def chunk(self, l: int) -> int:
        """Neurons per chunk for rows started at layer l (2 rows each, three walks side by side)."""
        return max(1, ROW_BUDGET // (6 * self.region.batch * walk_width(self._down(l))))

    def stop(self) -> bool:
        """Past the time limit, or too close to it for the next piece of work if that takes as long as
        the last one did (the time since the previous check: one chunk of rows, on a CNN up to ~1.7 s
        at load 8): the walks not yet done are left out (their neurons keep interval bounds) and the
        result says it was truncated."""
        if self.deadline is not None and not self.truncated:
            now = time.perf_counter()
            last = 0.0 if self._checked is None else now - self._checked
            self._checked = now
            self.truncated = now + last > self.deadline
        return self.truncated

    def _bounds(self, l: int, walk: Walk, mask: torch.Tensor | None) -> Bounds | None:
        shape = self.pair.layers_f[l].out_shape
        sel = Selection.of(mask, math.prod(shape))
        if sel is None or self.stop():
            return None
        rows = bound_rows(walk, sel, shape, self.region, self.chunk(l), self.stop)
        return _spread(sel, rows, shape, self.region.batch)

    def _widest(self, l: int, walk: Walk, prior: Bounds, mask: torch.Tensor) -> Bounds:
        if self.stop() or not bool(mask.any()):
            return prior
        return bound_widest(walk, prior, mask, self.pair.layers_f[l].out_shape, self.region, self.chunk(l), TOP_ROWS,
                            self.stop)

    def _top(self, l: int, walk: Walk, prior: Bounds, mask: torch.Tensor) -> Bounds:
        """`prior` with the bounds that can carry layer l's reported maximum walked (`rows.bound_top_rows`)."""
        if self.stop() or not bool(mask.any()):
            return prior
        return bound_top_rows(walk, prior, mask, self.pair.layers_f[l].out_shape, self.region, self.chunk(l), TOP_ROWS,
                              self.stop)

    def _top_of(self, l: int, walk: Walk, prior: Bounds, mask: torch.Tensor) -> Bounds:
        """`_top` for the maximum over `self.logits` only: the other logits enter as [0, 0] (they
        cannot raise that maximum) and keep `prior`."""
        assert self.logits is not None
        b = self.region.batch
        keep = torch.zeros(math.prod(prior.lower.shape[1:]), dtype=torch.bool)
        keep[list(self.logits)] = True
        lo, up = prior.lower.reshape(b, -1), prior.upper.reshape(b, -1)
        sub = self._top(l, walk, Bounds(lo.masked_fill(~keep, 0.0), up.masked_fill(~keep, 0.0)), mask & keep)
        return Bounds(torch.where(keep, sub.lower.reshape(b, -1), lo).reshape(prior.lower.shape),
                      torch.where(keep, sub.upper.reshape(b, -1), up).reshape(prior.upper.shape))

    def layer(self, l: int, local_ctx: list[OpCtx] | None, cheap: tuple[Bounds, Bounds, Bounds, Bounds | None],
              hidden: bool) -> list[Bounds | None]:
        """Back-substituted bounds of layer l (`rows.py` says which neurons): a^f, a^g, CROWN on
        f - g, Delta and the local deviation. Neurons not bounded get infinite bounds."""
        af, ag, d, loc = cheap
        for e in (self.f, self.g, self.d):   # hidden layers' bounds: float32 conv transposes (docs/theory.md)
            e.fast = hidden and FAST_HIDDEN
        self._sub = {}
        shape = self.pair.layers_f[l].out_shape
        n, b = math.prod(shape), self.region.batch
        nets_exact, delta_exact = _box_exact(self.ops[0], self.region) if l == 0 else (False, False)
        f = g = cd = dd = lb = None
        if not nets_exact:
            walk_f = lambda lam, lay, idx: self.engines(idx)[0].from_layer(l, Form.rows_of(lam, layout=lay))  # noqa: E731
            walk_g = lambda lam, lay, idx: self.engines(idx)[1].from_layer(l, Form.rows_of(lam, layout=lay))  # noqa: E731
            if self.prior is not None:    # the CROWN pass's bounds (its f - g ones at the logits)
                f, g, cd = self.prior.f[l], self.prior.g[l], self.prior.delta[l]
            elif hidden:   # each network's bounds matter where it is unstable
                f = self._bounds(l, walk_f, _unstable(af).reshape(b, n))
                # where Delta is structurally 0, a^g = a^f: `_refine` copies f's bounds to g
                zero_l = self.zero[l]
                same = _unstable(af) if zero_l is None else _unstable(af) & zero_l
                g = self._bounds(l, walk_g, (_unstable(ag) & ~same).reshape(b, n))
            elif not self.stop():   # the logits: every neuron, and CROWN on f - g from the same walks
                sel = Selection.of(None, n)
                assert sel is not None   # no mask: every neuron
                f, g, cd = (_spread(sel, x, shape, b) for x in
                            bound_rows_pair(walk_f, walk_g, sel, shape, self.region, self.chunk(l)))
        if not self.delta_walks:
            return [f, g, cd, None]
        full = n * walk_width(self._down(l)) <= FULL_COST
        # a costly net's first pass: bounds that settle only a reported maximum walk the rows that can carry it
        frugal = not self.relax_rows and not self.all_rows
        walk_d = lambda lam, lay, idx: self.engines(idx)[2].from_layer(l, Form.rows_of(None, lam, lay))  # noqa: E731
        if not delta_exact:
            mask = (d.upper > d.lower).reshape(b, n)
            met = _refine(_meet(af, f), _meet(ag, g), _meet(d, cd))[2]    # what a Delta walk is met with
            if hidden and not full:
                dd = met
                if self.relax_rows:    # a Delta bound feeds the relaxation where f or g is still unstable
                    still = _unstable(_meet(af, f)) | _unstable(_meet(ag, g))
                    dd = _meet(dd, self._bounds(l, walk_d, mask & still.reshape(b, n)))
                # the layer's reported maximum; neuron by neuron: both sides of a wide Delta feed the relaxation
                dd = self._widest(l, walk_d, dd, mask)
            elif not hidden and frugal:   # a first pass's logits: the reported maximum, which decides the full pass
                dd = self._top(l, walk_d, met, mask) if self.logits is None else self._top_of(l, walk_d, met, mask)
            else:
                dd = self._bounds(l, walk_d, mask)
                if not hidden:
                    self.walk_top = dd    # (infinite where not walked)
        if local_ctx is not None:
            def walk_local(lam: torch.Tensor, lay: Layout, idx: torch.Tensor | None) -> Form:
                ef, _, ed = self.engines(idx)
                ctx = local_ctx if idx is None else [c.select(idx) for c in local_ctx]
                form = ed.through_layer(l, Form.rows_of(None, lam, lay), ctx)
                form.lam_d = None    # g's layer l is fed with f's input: Delta h_{l-1} := 0
                return ef.below(form, l)
            assert loc is not None   # `_run` bounds the local deviation whenever it passes local_ctx
            mask = (loc.upper > loc.lower).reshape(b, n)
            lb = self._bounds(l, walk_local, mask) if full and not frugal else self._top(l, walk_local, loc, mask)
        return [f, g, _meet_opt(cd, dd), lb]


def _spread(sel: Selection, b: Bounds, shape: Sequence[int], batch: int) -> Bounds:
    return Bounds(sel.spread(b.lower, -torch.inf, batch).reshape(batch, *shape),
                  sel.spread(b.upper, torch.inf, batch).reshape(batch, *shape))


def _meet_opt(a: Bounds | None, b: Bounds | None) -> Bounds | None:
    return b if a is None else _meet(a, b)


def _unstable(b: Bounds) -> torch.Tensor:
    return (b.lower < 0) & (b.upper > 0)


def _meet(a: Bounds, b: Bounds | None) -> Bounds:
    return a if b is None else meet(a, b)


@boxes_or_batch
def diff_linear_bounds(pair: Pair, region: RegionBatch, optimize: bool = True, iterations: int = 20,
                       time_limit: float | None = None, all_rows: bool = False,
                       logits: Sequence[int] | None = None) -> PairBounds:
    """Differential linear bounds on every layer's Delta (and local deviation) over a batch of regions.

    `region`: the boxes, each intersected with its L2 ball when the batch has balls. `optimize`: tune
    the Delta relaxation of the logits for `iterations` Adam steps (any parameters give sound bounds; the
    result is never looser than without). The result is intersected with `crown_diff_bounds` (with
    `optimize`: `alpha_crown_diff_bounds` with the same `iterations`) and `diff_interval_bounds`, so it
    is never looser than either, neuron by neuron. `time_limit`:
    seconds per region; past it the remaining back-substitutions are left out (sound interval bounds
    stay) and `info["truncated"]` says so per region. `all_rows`: both slope searches optimise every
    logit row, not only those that can carry the region's largest |Delta| bound (the LP/MILP start
    from every logit's bounds). `logits`: the logits whose largest |Delta| is reported (certify's
    tolerance verdict; None: all): on nets with costly layers the first Delta pass walks only the
    logit bounds that can carry it (the others keep the CROWN pass's), and the full pass is decided on it.
    """
    if iterations < 0:
        raise ConfigError(f"iterations must be >= 0, got {iterations}")
    logits = pair.checked_logits(logits)
    deadline = _deadline(time_limit, region.batch)
    # the independent ReluDiff pass costs little and makes "never looser than diff-interval" exact; it
    # runs first so that a time limit counts it, and the walks stop as long again before the limit: a
    # truncated pass still finishes its layers with interval bounds, a pass of about that cost (on
    # vgg-small ~0.06 s per region each; a 0.3 s limit otherwise ran 0.35 s)
    started = time.perf_counter()
    floor = diff_interval_bounds(pair, region)
    if deadline is not None:
        deadline -= time.perf_counter() - started
    ops = _op_pairs(pair)
    # (alpha-)CROWN on f - g first (the cheaper pass; it also bounds the agreement margins): its a^f, a^g
    # bounds and its logit Delta are reused below. It is alpha_crown_diff_bounds's very pass (the same
    # rows optimised in the same searches), so the result is never looser than that method per neuron
    memo = _Memo()   # what the passes below would compute again
    crown = _run(pair, region, False, deadline, ops=ops, diff_iterations=iterations if optimize else 0,
                 all_rows=all_rows, memo=memo)
    optimize = optimize and iterations > 0
    costly = not _all_cheap(pair)
    # on nets with costly layers, a first Delta pass without relaxation rows or optimisation says
    # where the Delta walk improves on CROWN on f - g at all; only those regions get the full pass
    if _past(deadline):   # the Delta pass would add nothing but its interval bounds
        out, truncated = crown, [True] * region.batch
    else:
        out = _run(pair, region, True, deadline, optimize=optimize and not costly, iterations=iterations,
                   prior=crown, ops=ops, all_rows=all_rows, relax_rows=not costly, logits=logits, memo=memo)
        truncated = [a or b for a, b in zip(out.info["truncated"], crown.info["truncated"])]
        out = out.intersect(crown)
    optimized = out.info.get("optimized", False)
    if costly:
        idx = torch.nonzero(_gain(out, crown, logits) > DELTA_GAIN).flatten()
        if len(idx) and not _past(deadline):
            sub = _run(pair, region.select(idx), True, deadline, optimize=optimize, iterations=iterations,
                       prior=crown.select(idx), ops=ops, all_rows=all_rows, memo=memo)
            for i, cut in zip(idx.tolist(), sub.info["truncated"]):
                truncated[i] = truncated[i] or cut
            optimized = optimized or sub.info.get("optimized", False)
            out = out.intersect(sub, idx)
    out = out.intersect(floor)
    for l, same in enumerate(crown.info["local_is_delta"]):
        if same:    # two bounds of one quantity
            out.delta[l] = out.local[l] = meet(out.delta[l], out.local[l])
    out.info = {"method": "diff-linear", "optimized": optimized, "truncated": truncated}
    return out


def _all_cheap(pair: Pair) -> bool:
    """Whether every layer bounds every neuron's Delta and local deviation (`rows.FULL_COST`)."""
    down: list[AffineOp] = []
    for l, (lf, _) in enumerate(pair.layer_pairs()):
        down = list(reversed(lf.ops)) + down
        if math.prod(lf.out_shape) * walk_width(down) > FULL_COST:
            return False
    return True


def _gain(out: PairBounds, crown: PairBounds, logits: Sequence[int] | None) -> torch.Tensor:
    """(B,) relative gain of `out` over `crown` on the max |Delta logit| (over `logits`) of each region."""
    a, c = out.max_abs_logit_deviation(logits), crown.max_abs_logit_deviation(logits)
    return torch.where(c > 0, (c - a) / c, torch.zeros_like(c))


@boxes_or_batch
def crown_diff_bounds(pair: Pair, region: RegionBatch, time_limit: float | None = None) -> PairBounds:
    """CROWN on the merged difference network x -> f(x) - g(x) (shared input, f and g side by side).

    Its hidden neurons are f's and g's, so its intermediate bounds are each network's own CROWN
    bounds (intersected with intervals); its output rows e_k - e_k back-substitute through f and g
    separately and add at the input, where the two halves' terms cancel. Intermediate layers' Delta:
    the same where both networks' rows are walked, else a^f - a^g. Local deviations: intervals
    (Delta's own bounds where the layer's input Delta is 0 everywhere: then they are the same quantity).
    `time_limit` as for `diff_linear_bounds`.
    """
    out = _run(pair, region, False, _deadline(time_limit, region.batch))
    out.info = {"method": "crown-diff", "truncated": out.info["truncated"]}
    return out


@boxes_or_batch
def alpha_crown_diff_bounds(pair: Pair, region: RegionBatch, iterations: int = 20,
                            time_limit: float | None = None) -> PairBounds:
    """alpha-CROWN on the merged difference network: `crown_diff_bounds`, then the f and g lower slopes
    of the logits' paired rows tuned for `iterations` projected Adam steps (`alpha_diff.py`) on the
    rows that can carry the region's max |Delta_k| (`_optimise_where_it_matters`); per row
    the better of the tuned and the default bound, so never looser than crown-diff. Hidden layers are
    crown-diff's. `time_limit` as for `diff_linear_bounds` (it also ends the slope search).
    """
    if iterations < 0:
        raise ConfigError(f"iterations must be >= 0, got {iterations}")
    out = _run(pair, region, False, _deadline(time_limit, region.batch), diff_iterations=iterations)
    out.info = {"method": "alpha-crown-diff", "optimized": out.info["diff_optimized"],
                "truncated": out.info["truncated"]}
    return out


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def _deadline(time_limit: float | None, batch: int) -> float | None:
    if time_limit is None:
        return None
    if not time_limit > 0:
        raise ConfigError(f"time_limit must be > 0 seconds, got {time_limit}")
    return time.perf_counter() + float(time_limit) * batch


def _run(pair: Pair, region: RegionBatch, delta_walks: bool, deadline: float | None = None, optimize: bool = False,
         iterations: int = 0, prior: PairBounds | None = None, ops: list[list[_OpPair]] | None = None, all_rows: bool = False,
         diff_iterations: int = 0, relax_rows: bool = True, logits: Sequence[int] | None = None,
         memo: _Memo | None = None) -> PairBounds:
    """The layer-by-layer pass; `delta_walks` False leaves out the differential walks (CROWN on f - g).
    `prior`: bounds of an earlier pass (CROWN on f - g) whose a^f, a^g, logit Delta and margins are
    taken instead of walking again. `diff_iterations` > 0: the logits' f - g rows also get optimised
    slopes (alpha-CROWN on f - g); both searches optimise the rows `_optimise_where_it_matters` chooses
    (every row with `all_rows`). `relax_rows` False: no relaxation rows on costly layers (a cheap
    first Delta pass; its logits' Delta walked where it can carry the max |Delta| over `logits`)."""
    ops = ops or _op_pairs(pair)
    memo = memo or _Memo()
    st = _Bounder(pair, region, ops, delta_walks, deadline, prior, relax_rows, all_rows, logits)
    hf = hg = Bounds(region.lo, region.hi)
    dh: Bounds | None = None
    f_b: list[Bounds] = []
    g_b: list[Bounds] = []
    d_b: list[Bounds] = []
    loc_b: list[Bounds] = []
    local_is_delta: list[bool] = []
    last_inputs: _OpInputs | None = None
    local_ctx: list[OpCtx] | None
    loc: Bounds | None
    zero: torch.Tensor | None = None
    for l in range(pair.n_layers):
        inputs, (af, ag, d) = _chain(ops[l], hf, hg, dh, memo)
        zero = memo.zero_delta(ops[l], zero)
        st.zero.append(zero)
        d = _zero_out(d, zero)
        cf, cg = _contexts(ops[l], inputs, memo)
        if l == 0 and region.l2 is None:   # exact walks stop above the op on the input (`firstop.py`)
            attach_first(cf, cg, [xf for xf, _, _ in inputs])
        st.ctx_f.append(cf)
        st.ctx_g.append(cg)
        local_ctx, loc = None, None
        # Delta h_{l-1} = 0 everywhere (layer 0's input, or a structurally zero layer): g's layer l fed
        # with f's input is g's layer l, so the local deviation is Delta itself (one walk serves both)
        same = l == 0 or (zero_prev := st.zero[l - 1]) is None or bool(zero_prev.all())
        if not same:
            loc, local_ctx = _local(ops[l], hf, memo)
        hidden = l < pair.n_layers - 1
        cf_, cg_, cd_, cloc = st.layer(l, local_ctx, (af, ag, d, loc), hidden)
        af, ag, d = _refine(_meet(af, cf_), _meet(ag, cg_), _meet(d, cd_))
        if same:
            loc = d
        else:
            assert loc is not None   # bounded above when not same
            loc = _meet(loc, cloc)
        local_is_delta.append(same)
        f_b.append(af)
        g_b.append(ag)
        d_b.append(d)
        loc_b.append(loc)
        last_inputs = inputs[-1]
        if hidden:
            sf, sg = SideRelax.of(af), SideRelax.of(ag)
            st.side_f.append(sf)
            st.side_g.append(sg)
            st.delta.append(DeltaRelax.of(af, ag, d, sf, sg))
            dh = relu_delta(af, ag, d)
            hf, hg = af.relu(), ag.relu()
    info: MethodInfo = {"optimized": False, "diff_optimized": False}
    top = pair.n_layers - 1
    if diff_iterations > 0 and pair.n_layers > 1 and not st.stop():
        def diff_rows(rows: torch.Tensor) -> Bounds:
            opt, cut = optimise_diff_rows(st.f, st.g, top, region, diff_iterations, deadline, rows=rows)
            st.truncated |= cut
            return opt
        d_b[-1] = _optimise_where_it_matters(d_b[-1], f_b[-1], g_b[-1], all_rows, diff_rows, st.stop)
        info["diff_optimized"] = True
    if optimize and pair.n_layers > 1 and not st.stop():
        def delta_rows(rows: torch.Tensor) -> Bounds:
            return optimise_rows(st.d, top, region, iterations, deadline, rows)
        skip = None if all_rows or st.walk_top is None else _hopeless(st.walk_top, d_b[-1])
        d_b[-1] = _optimise_where_it_matters(d_b[-1], f_b[-1], g_b[-1], all_rows, delta_rows, st.stop, skip)
        info["optimized"] = True
    margins = None if prior is not None else _margins(pair, st, f_b[-1], g_b[-1], last_inputs)
    info["truncated"] = [st.truncated] * region.batch
    info["local_is_delta"] = local_is_delta
    return PairBounds(f_b, g_b, d_b, loc_b, margins, info)



def _optimise_where_it_matters(d: Bounds, af: Bounds, ag: Bounds, all_rows: bool,
                               optimise: Callable[[torch.Tensor], Bounds], stop: Callable[[], bool],
                               skip: torch.Tensor | None = None) -> Bounds:
    """The logits' Delta bounds `d` met with `optimise(rows)` (bounds of the chosen rows) on the rows
    that can carry the region's largest |Delta| (`_rows_that_matter`). Optimising lowers that largest
    bound, which can bring rows not yet optimised within OPTIMISE_SHARE of it: they are optimised in
    turn, until none is left. So every row that is not optimised ends below OPTIMISE_SHARE x the
    reported maximum. With `all_rows`, every remaining row is optimised after that (the same searches
    first, so the rows the maximum needs get the very bounds they get without `all_rows`). Both
    slope searches (f - g's and Delta's) choose their rows here. `skip`: a (B, 2n) mask of rows left
    out from the start (`_hopeless`)."""
    done = torch.zeros(d.upper.shape[0], 2 * d.upper[0].numel(), dtype=torch.bool)
    if skip is not None:
        done |= skip
    while not stop():
        want = _rows_that_matter(d) & ~done
        if all_rows and not bool(want.any()):
            want = _rows_that_matter(d, 0.0) & ~done
        if not bool(want.any()):
            break
        d = _refine(af, ag, meet(d, optimise(want)))[2]
        done |= want
    return d


def _hopeless(walk: Bounds, d: Bounds) -> torch.Tensor:
    """(B, 2n) mask of the logit rows (as in `_rows_that_matter`) whose default-slope Delta walk `walk`
    is above the current bound `d` by more than SEARCH_GAP x the region's largest |Delta| bound: the
    Delta slope search starts from that walk and would have to gain more than the gap to tighten the
    row. Not a proof: measured on the 400 LeNet boxes of `benchmarks/certify.py` (eps 0.005-0.05),
    every row the search tightened had a gap <= 0.27 % of the maximum (docs/theory.md)."""
    ub = torch.cat([d.upper.flatten(1), -d.lower.flatten(1)], dim=1)
    ub_walk = torch.cat([walk.upper.flatten(1), -walk.lower.flatten(1)], dim=1)
    top = ub.max(dim=1, keepdim=True).values.clamp_min(0.0)
    return ub_walk - ub > SEARCH_GAP * top


def _rows_that_matter(d: Bounds, share: float = OPTIMISE_SHARE) -> torch.Tensor:
    """(B, 2n) mask of the logit rows worth optimising per region (row i: Delta_i's upper bound, row
    n + i: its lower bound): those whose bound is within `share` of the region's largest |Delta|
    bound, the quantity certify reports (optimisation moves a bound by ~0.1-3 % on LeNet, so the
    others cannot become the largest; share 0: every row); rows of a zero-width Delta have nothing
    to gain."""
    ub = torch.cat([d.upper.flatten(1), -d.lower.flatten(1)], dim=1)
    width = (d.upper - d.lower).flatten(1)
    keep = torch.cat([width, width], dim=1).gt(0)
    if share <= 0:
        return keep
    top = ub.max(dim=1, keepdim=True).values
    return (ub >= top - (1.0 - share) * top.abs()) & keep


def _refine(af: Bounds, ag: Bounds, d: Bounds) -> tuple[Bounds, Bounds, Bounds]:
    """Use Delta = a^f - a^g among the three bounds (each step rounded outward)."""
    d = meet(d, sub_bounds(af, ag))
    ag = meet(ag, sub_bounds(af, d))
    inf = torch.tensor(torch.inf, dtype=ag.lower.dtype)
    af = meet(af, Bounds(torch.nextafter(ag.lower + d.lower, -inf), torch.nextafter(ag.upper + d.upper, inf)))
    return af, ag, d


def _margins(pair: Pair, st: _Bounder, logits_f: Bounds, logits_g: Bounds, last_inputs: _OpInputs | None
             ) -> torch.Tensor:
    """(B, C, C) lower bounds on both f_c - f_j and g_c - g_j: interval margins from the last op's input
    bounds everywhere, and back-substituted ones for the class c predicted at each region's centre."""
    assert last_inputs is not None   # a pair has at least one layer
    xf, xg, _ = last_inputs
    base = margins_from_inputs(pair, xf, xg, logits_f, logits_g)
    c = pair.n_classes
    if c > MAX_MARGIN_CLASSES or c < 2 or st.stop():
        return base
    reg = st.region
    b = reg.batch
    with torch.no_grad():
        pred = pair.f.forward((reg.lo + reg.hi) / 2).reshape(b, -1).argmax(dim=1)
    # the classes j != c (row j = c would be 0: its margin is meaningless, and it cost a tenth of the walks)
    every = torch.arange(c).expand(b, c)
    others = every[every != pred.unsqueeze(1)].reshape(b, c - 1)
    eye = torch.eye(c, dtype=torch.float64)
    rows = (eye[others] - eye[pred].unsqueeze(1)).reshape(b, c - 1, *pair.layers_f[-1].out_shape)
    last = pair.n_layers - 1     # row j: -(e_c - e_j); its upper bound = -margin
    lf = -concretise(st.f.from_layer(last, Form.rows_of(rows)), reg)
    lg = -concretise(st.g.from_layer(last, Form.rows_of(rows)), reg)
    at = (torch.arange(b).unsqueeze(1), pred.unsqueeze(1), others)
    base[at] = torch.maximum(base[at], torch.minimum(lf, lg))
    return base
