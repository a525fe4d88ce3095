"""CROWN-style back-substitution through one network or through a pair (f, Delta), with sound rounding.

A *form* is a batch of R linear functions of one level's variables, per region:
lam_f . v^f + lam_d . Delta v + bias (+ err, the accumulated rounding bound). Starting from rows over
a layer's pre-activations, `Engine` walks it down to the input: through each affine op by its
transpose (`op.backward`, so conv nets never build dense matrices) and through each hidden ReLU by
the relaxations of `relax.py`. The pair recurrence is

    Delta y = (A^f - A^g) x^f + A^g Delta x + (b^f - b^g),   y^f = A^f x^f + b^f,

so lam_f . y^f + lam_d . Delta y = (A^fT lam_f + D^T lam_d) . x^f + (A^gT lam_d) . Delta x + const
(in float64 steps with both terms, A^fT (lam_f + lam_d) - A^gT lam_d: two transposes, not three).
At the network input Delta x = 0 exactly. `concretise` then maximises the final form over a box (and
an L2 ball), so every row yields a sound *upper* bound; lower bounds are upper bounds of negated rows.
Over boxes, exact walks stop above the first Linear/Conv2d on the input and `concretise` splits it
into a float64 centre part and a float32 radius part (`firstop.py`).

Rounding (docs/theory.md, "Differential linear bounds"): each computed coefficient differs from the
exact transpose/relaxation of the previous (computed) one by at most gamma_k times a magnitude we
evaluate alongside (|lam| . (|A| |x|max + |b|) for an op); those bounds accumulate in `err`, biases
are accumulated with upward rounding, and the final concretisation adds its own gamma_n margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunecert.certify import firstop
from prunecert.certify.firstop import FirstOp, Term, backward_terms, concretise_terms, plus_terms
from prunecert.certify.layout import DENSE, Layout, abs_dot, dense_backward, dot, fast_ok, fast_tiny
from prunecert.certify.relax import DeltaParams, DeltaRelax, SideRelax, relax_delta, relax_side
from prunecert.core.region_batch import RegionBatch
from prunecert.core.rounding import UNIT_ROUNDOFF_32, gamma, margin, up
from prunecert.network import AffineOp, AvgPool2d, Conv2d, Flatten


@dataclass
class Form:
    """R linear functions per region: lam_f . v^f + lam_d . Delta v + bias, exact up to err.

    `bias` and `err` have shape (Bl, R); Bl is 1 until a per-region relaxation enters the form.
    `layout` says how the coefficients are stored (`layout.py`: dense, or conv-net windows).
    `first`: a form at the network input whose walk stopped above the op acting on it (`firstop.py`):
    its value is the terms' plus bias (lam_f, lam_d None).
    """

    lam_f: torch.Tensor | None    # (Bl, R, *shape) or (Bl, R, C, kh, kw) windows
    lam_d: torch.Tensor | None
    bias: torch.Tensor
    err: torch.Tensor
    layout: Layout = DENSE
    first: tuple[Term, ...] = ()

    @staticmethod
    def rows_of(lam_f: torch.Tensor | None, lam_d: torch.Tensor | None = None, layout: Layout = DENSE) -> "Form":
        lam = lam_f if lam_f is not None else lam_d
        assert lam is not None, "a form needs coefficients"
        zero = torch.zeros(lam.shape[:2], dtype=lam.dtype)
        return Form(lam_f, lam_d, zero, zero.clone(), layout)

    def plus(self, other: "Form", region: "RegionBatch") -> "Form":
        """The sum of two forms over the network input, rows stored alike (CROWN on f - g adds the
        f-walk of e_i and the g-walk of -e_i there). Each coefficient sum is one rounding: its error,
        at most u (|lam| + |lam'|) . max|x| over the region, joins `err`. Forms stopped above the
        first op add their terms (`firstop.plus_terms`)."""
        if self.first or other.first:
            assert self.first and other.first, "both forms stop above the first op, or neither"
            terms, err = plus_terms(self.first, other.first, self.layout, up(self.err + other.err))
            return Form(None, None, up(self.bias + other.bias), err, self.layout, terms)
        assert self.lam_d is None and other.lam_d is None
        assert self.lam_f is not None and other.lam_f is not None
        size = _abs_rc(self.lam_f.abs() + other.lam_f.abs(), self.layout, region)[..., 1]    # (B, R)
        err = up(self.err + other.err + margin(size, 1))
        return Form(self.lam_f + other.lam_f, None, up(self.bias + other.bias), err, self.layout)

    def take(self, rows: torch.Tensor) -> "Form":
        """The form's rows `rows` (an index over dim 1)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, rows]

        return Form(pick(self.lam_f), pick(self.lam_d), self.bias[:, rows], self.err[:, rows],
                    self.layout.take(rows), tuple(t.take(rows) for t in self.first))

    @property
    def rows(self) -> int:
        return int(self.bias.shape[1])


@dataclass
class OpCtx:
    """One affine op of the walked network, optionally paired with g's op and the difference op.

    `mag` >= |A| |x|max + |b| over the op's input bounds; `dmag` >= |D| |x^f|max + |A^g| |Delta x|max + |b^f - b^g|.
    """

    op: AffineOp
    mag: torch.Tensor
    dop: AffineOp | None = None
    opg: AffineOp | None = None
    dmag: torch.Tensor | None = None
    dx_zero: bool = False    # Delta x = 0 exactly at this op's input (the walk drops lam_d there)
    xsum: torch.Tensor | None = None   # (B,) >= sum |x|max + sum |Delta x|max; given: convs may run in float32
    _gmag: torch.Tensor | None = None  # mag + dmag, computed when first needed (`gmag`)
    first: FirstOp | None = None       # the op acts on the network input: walks stop above it (`firstop.py`)

    @property
    def gmag(self) -> torch.Tensor:
        """A magnitude of g's op over both inputs: mag + dmag >= |A^g| (|x^f|max + |Delta x|max) + |b^g|
        (|A^g| <= |A^f| + |D| and |b^g| <= |b^f| + |b^f - b^g| entrywise), rounded up."""
        if self._gmag is None:
            assert self.dmag is not None   # a pair op
            self._gmag = up(self.mag + self.dmag)
        return self._gmag

    def select(self, idx: slice | torch.Tensor) -> "OpCtx":
        """The same op context for a sub-batch of the regions."""
        return OpCtx(self.op, self.mag[idx], self.dop, self.opg, None if self.dmag is None else self.dmag[idx],
                     self.dx_zero, None if self.xsum is None else self.xsum[idx],
                     None if self._gmag is None else self._gmag[idx],
                     None if self.first is None else self.first.select(idx))

    def fast(self, op: AffineOp | None, lam: torch.Tensor) -> bool:
        """Whether op's transpose of coefficients `lam` runs in float32 (`layout.fast_ok`)."""
        return self.fast_ops((op,), lam)[0]

    def fast_ops(self, ops: tuple[AffineOp | None, ...], lam: torch.Tensor) -> list[bool]:
        """`fast` for several ops' transposes of the same rows: lam's largest |entry| taken once."""
        out = [False] * len(ops)
        absmax: float | None = None
        for i, op in enumerate(ops):
            if self.xsum is None or op is None or not isinstance(op, (Conv2d, AvgPool2d)):
                continue
            if absmax is None:
                lo, hi = torch.aminmax(lam)    # one vectorised pass (an inf-norm is 10x slower); NaN stays NaN
                absmax = float(torch.maximum(-lo, hi))
            out[i] = fast_ok(op, absmax)
        return out

    @property
    def count(self) -> int:
        """Rounding-term count for one backward step (transposes, bias dot product, combinations)."""
        t = backward_terms(self.op) + (backward_terms(self.dop) if self.dop is not None else 0)
        t += backward_terms(self.opg) if self.opg is not None else 0
        return 2 * (t + math.prod(self.op.out_shape)) + 16


def bias_dot(lay: Layout, lam: torch.Tensor, op: AffineOp) -> torch.Tensor:
    """lam . b for op's bias b, (Bl, R). A conv's bias is one value per channel: on windows, each
    channel's coefficients are summed first, then weighted (no per-neuron read); a zero bias (pooling)
    adds nothing. Any order of summing the same products errs by at most gamma_n times the sum of
    their absolute values, which the step's magnitude |lam| . (|A| m + |b|) contains."""
    if isinstance(op, AvgPool2d) or (isinstance(op, Conv2d) and not bool(op._bias.any())):
        return lam.new_zeros(lam.shape[:2])
    if isinstance(op, Conv2d) and not lay.dense:
        return lam.sum((3, 4)) @ op._bias.to(lam.dtype)
    return lay.dot(lam, op.bias)


def _add(a: torch.Tensor | None, b: torch.Tensor | None, fresh: bool = False) -> torch.Tensor | None:
    """a + b (None: no term); `fresh`: a is a new tensor of this step, added into in place where the
    shapes allow (the same sums, one row tensor fewer)."""
    if a is None:
        return b
    if b is None:
        return a
    if fresh and a.shape == b.shape and a.dtype == torch.promote_types(a.dtype, b.dtype):
        return a.add_(b)
    return a + b


class Engine:
    """Back-substitution through the layers of one network (`ctx`, `side`), or of the pair when
    `delta` (the Delta relaxations per hidden layer) is given. Tensors of any float dtype; only
    `exact=True` (float64) results are sound, the others serve the slope optimisation. `fast`: conv
    transposes may run in float32 (where the op context allows, `OpCtx.fast`), with their own margin."""

    fast = False
    merge = True   # pair steps through a differing op take two transposes (`_through_merged`), not three

    def __init__(self, ctx: list[list[OpCtx]], side: list[SideRelax], delta: list[DeltaRelax] | None = None,
                 exact: bool = True):
        self.ctx, self.side, self.delta, self.exact = ctx, side, delta, exact

    def select(self, idx: slice | torch.Tensor) -> "Engine":
        """The same walk restricted to a sub-batch of the regions (per-region tensors sliced)."""
        out = Engine([[c.select(idx) for c in layer] for layer in self.ctx], [s.select(idx) for s in self.side],
                     None if self.delta is None else [d.select(idx) for d in self.delta], self.exact)
        out.fast, out.merge = self.fast, self.merge
        return out

    # ------------------------------------------------------------------ steps
    def through_layer(self, l: int, form: Form, ctx: list[OpCtx] | None = None) -> Form:
        """From the layer's pre-activation level to its input level, op by op. An exact walk stops
        above the op acting on the network input (its context has `first`; the ops below it are
        reshapes): `concretise` takes that op's centre and radius parts (`firstop.py`)."""
        for c in reversed(ctx if ctx is not None else self.ctx[l]):
            if c.first is not None and self.exact:
                assert not form.first   # (Delta x = 0 at the network input: lam_d meets only the difference op)
                term = Term(c.first, form.lam_f, form.lam_d if c.dop is not None else None, self.fast or firstop.FAST_LOGITS)
                return Form(None, None, form.bias, form.err, form.layout, (term,))
            form = self.through_op(c, form)
        return form

    def through_op(self, c: OpCtx, form: Form) -> Form:
        lf, ld, lay = form.lam_f, form.lam_d, form.layout
        if self.merge and lf is not None and ld is not None and c.dop is not None and not c.dx_zero \
                and not self._may_run_fast(c):
            return self._through_merged(c, form)
        if isinstance(c.op, Flatten) and c.dop is None:   # a reshape: exact, no bias
            return Form(None if lf is None else dense_backward(c.op, lf),
                        None if ld is None or c.dx_zero else dense_backward(c.op, ld), form.bias, form.err, lay)
        new_lay = lay
        new_f = new_d = None
        bias, mag = form.bias, torch.zeros_like(form.err)
        fast_mag, fast_n = torch.zeros_like(form.err), 0   # magnitudes of the float32 transposes, their count
        if lf is not None:
            fast = self.exact and self.fast and c.fast(c.op, lf)
            new_f, new_lay = lay.backward(c.op, lf, fast)
            bias = self._acc(bias, bias_dot(lay, lf, c.op))
            if self.exact:
                mag_f = abs_dot(lay, lf, c.mag)
                mag = mag + mag_f
                if fast:
                    fast_mag, fast_n = fast_mag + mag_f, 1
        if ld is not None:
            fast_d = fast_g = False
            if self.exact and self.fast:
                fast_d, fast_g = c.fast_ops((c.dop, None if c.dx_zero else c.opg), ld)
            # one stacked transpose (`stackable`) in exact walks; a slope search's walks keep them apart (its
            # optimiser would follow the last bits of a stacked transpose's other summation order elsewhere)
            t: torch.Tensor | None = None    # D^T lam_d
            if self.exact and c.dop is not None and not c.dx_zero and fast_d == fast_g:
                assert c.opg is not None
                t, new_d, new_lay = lay.backward2(c.dop, c.opg, ld, fast_d)
            else:
                if c.dop is not None:
                    t, new_lay = lay.backward(c.dop, ld, fast_d)
                if not c.dx_zero:
                    assert c.opg is not None   # a pair walk (lam_d set) has g's op beside f's
                    new_d, new_lay = lay.backward(c.opg, ld, fast_g)
            if c.dop is not None:
                new_f = _add(new_f, t, fresh=not isinstance(c.op, Flatten))   # (a reshape's rows are lf's)
                bias = self._acc(bias, bias_dot(lay, ld, c.dop))
            if self.exact:
                assert c.dmag is not None   # so do its exact magnitudes
                mag_d = abs_dot(lay, ld, c.dmag)
                mag = mag + mag_d
                if fast_d or fast_g:
                    fast_mag, fast_n = fast_mag + mag_d, fast_n + int(fast_d) + int(fast_g)
        err = up(form.err + margin(mag, c.count)) if self.exact else form.err
        if fast_n:   # float32 transposes: their relative error on the same magnitudes, and underflow
            assert c.xsum is not None   # `OpCtx.fast` allows float32 only with xsum
            tiny = fast_n * max(fast_tiny(op) for op in (c.op, c.dop, c.opg) if op is not None) * c.xsum.unsqueeze(1)
            err = up(up(err + margin(fast_mag, backward_terms(c.op) + 2, UNIT_ROUNDOFF_32)) + tiny * (1 + 2.0 ** -40))
        return Form(new_f, new_d, bias, err, new_lay)

    def _may_run_fast(self, c: OpCtx) -> bool:
        """Whether the op's transposes may run in float32: a slope search's walk (`exact` False), or
        `OpCtx.fast`. Those keep three transposes (a search merged in float32 chose other slopes:
        LeNet logit bounds up to 9e-6 of their width looser). Float32 steps of exact walks:
        float32 errs relative to the magnitudes, and the two-transpose magnitude |A^f| |lam_f + lam_d|
        + |A^g| |lam_d| is several times |A^f| |lam_f| + |D| |lam_d| where lam_d is large and D small
        (measured on the vgg pair: layer 3's max |Delta| 5e-4 looser, up to 2 % of a bound's width)."""
        return not self.exact or (self.fast and c.xsum is not None and isinstance(c.op, (Conv2d, AvgPool2d)))

    def _through_merged(self, c: OpCtx, form: Form) -> Form:
        """`through_op` with two transposes instead of three: A^fT lam_f + D^T lam_d is computed as
        A^fT (lam_f + lam_d) - A^gT lam_d, the second product being the new lam_d itself (the same
        real number: D = A^f - A^g). The rounding magnitude becomes |lam_f + lam_d| . mag +
        |lam_d| . gmag (docs/theory.md, "Rounding"); the bias lam_f . b^f + lam_d . (b^f - b^g)
        likewise as (lam_f + lam_d) . b^f - lam_d . b^g."""
        lf, ld, lay = form.lam_f, form.lam_d, form.layout
        assert lf is not None and ld is not None and c.opg is not None
        s = lf + ld
        p, new_lay = lay.backward(c.op, s)
        new_d, _ = lay.backward(c.opg, ld)
        bias = self._acc(self._acc(form.bias, bias_dot(lay, s, c.op)), -bias_dot(lay, ld, c.opg))
        err = form.err
        if self.exact:
            err = up(err + margin(abs_dot(lay, s, c.mag) + abs_dot(lay, ld, c.gmag), c.count))
        return Form(p.sub_(new_d) if p.shape == new_d.shape else p - new_d, new_d, bias, err, new_lay)

    def _acc(self, bias: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        """bias + term, rounded upward when exact (the term's own error is in the magnitudes)."""
        return up(bias + term) if self.exact else bias + term

    def relax(self, l: int, form: Form, params: DeltaParams | None = None) -> Form:
        """Through the ReLU of hidden layer l: from h_l-level coefficients to a_l-level ones."""
        p = params or DeltaParams()
        lf, ld = form.lam_f, form.lam_d
        mu_f = mu_d = None
        bias, mag = form.bias, torch.zeros_like(form.err)
        if lf is not None:
            mu_f, b, m = relax_side(self.side[l], lf, p.alpha_f, self.exact, form.layout)
            bias = self._acc(bias, b)
            mag = mag if m is None else mag + m
        if ld is not None and self.delta is not None and self.delta[l].zero:
            pass    # Delta h_l = 0 exactly (Delta a_l is): its coefficients contribute nothing
        elif ld is not None:
            assert self.delta is not None
            m_f, mu_d, b, m = relax_delta(self.delta[l], ld, p, self.exact, form.layout)
            mu_f = _add(mu_f, m_f, fresh=True)   # (relax_side's mu is new)
            bias = self._acc(bias, b)
            mag = mag if m is None else mag + m
        err = form.err
        if self.exact:
            n = math.prod(self.side[l].s.shape[1:])
            err = up(err + margin(mag, 2 * n + 16))
        return Form(mu_f, mu_d, bias, err, form.layout)

    def below(self, form: Form, l: int, params: list[DeltaParams] | None = None) -> Form:
        """A form over layer l's *input* (h_{l-1}; Delta h_{l-1}) walked down to the network input."""
        for k in range(l - 1, -1, -1):
            form = self.relax(k, form, params[k] if params else None)
            form = self.through_layer(k, form)
        form.lam_d = None   # Delta x = 0 at the network input
        return form

    def from_layer(self, l: int, form: Form, params: list[DeltaParams] | None = None) -> Form:
        """A form over layer l's pre-activations walked down to the network input."""
        return self.below(self.through_layer(l, form), l, params)


# ----------------------------------------------------------------------------- concretisation
def _dot2(absl: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
    """(Bl, R, *s) against (B, n, k) -> (B, R, k) in one pass over `absl`."""
    flat = absl.flatten(2)
    if flat.shape[0] == 1:
        b, n, k = rc.shape
        return (flat[0] @ rc.permute(1, 0, 2).reshape(n, b * k)).reshape(-1, b, k).permute(1, 0, 2)
    return torch.bmm(flat, rc)


def _abs_rc(absl: torch.Tensor, lay: Layout, region: RegionBatch) -> torch.Tensor:
    """(B, R, 2): |lam| . r and |lam| . (|c| + r) for coefficients |lam| stored as `lay` says."""
    if lay.dense:
        return _dot2(absl, region.rc)
    r = lay.at(region.r)
    return torch.stack([dot(absl, r), dot(absl, lay.at(region.c.abs()) + r)], dim=-1)


def concretise(form: Form, region: RegionBatch, exact: bool = True) -> torch.Tensor:
    """(B, R) upper bounds of the form's rows over each region (box, and L2 ball when given).

    With `exact`, each is sound for the exact real value of every row at every point of the region.
    """
    lam, bias, err, lay = form.lam_f, form.bias, form.err, form.layout
    if form.first:
        assert exact and region.l2 is None, "only exact walks over boxes stop above the first op"
        return concretise_terms(form.first, lay, bias, err)
    if lam is None:
        total = (bias + err).expand(region.batch, form.rows)
        return up(total) if exact else total
    n = math.prod(lam.shape[2:])
    absl = lam.abs()
    rc = _abs_rc(absl, lay, region)            # (B, R, 2): |lam| . r and |lam| . (|c| + r)
    out = lay.dot(lam, region.c) + rc[..., 0] + bias + err
    if exact:
        mag = rc[..., 1] + bias.abs() + err
        out = up(out + margin(mag, n + 4))
    if region.l2 is not None:
        centre, radius = region.l2
        radius = radius.reshape(-1, 1)
        norm = lam.flatten(2).norm(dim=2)
        if exact:   # sqrt(sum lam^2) is computed to a relative gamma_{n+2}; round it up
            norm = norm * (1.0 + gamma(n + 4)) * (1.0 + 4 * 2.0 ** -53)
        ball = lay.dot(lam, centre) + radius * norm + bias + err
        if exact:
            mag = lay.dot(absl, centre.abs()) + radius * norm + bias.abs() + err
            ball = up(ball + margin(mag, n + 4))
        out = torch.minimum(out, ball)
    return out
