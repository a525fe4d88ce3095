"""How the coefficient rows of a back-substitution are stored: dense, or as local patches of a conv net.

A row started at a neuron of a conv layer depends, after walking down through a few convs, only on a
small window of each lower level (the neuron's receptive field). `Patches` keeps each row as that
window, shape (Bl, R, C, kh, kw), plus the window's top-left corner on the level's (H, W) grid per
row; a transposed conv on the window costs C_out kh kw C_in k^2 per row instead of the level's full
width (what made diff-linear 900x slower than CROWN on the vgg pair). Window entries that fall
outside the level (on the conv padding) stand for constant zeros: they are cleared after every
transposed op, so they never leak into in-range positions, and every per-neuron tensor is read with
zero padding (`at`). When a window covers the level, the rows turn `Dense`: (Bl, R, *shape), the
layout of rows started at dense layers. Both layouts compute the same sums term by term (a transposed
op on a window sums the same products as on the full level), so the rounding bounds of `backsub.py`
hold unchanged.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TypeAlias

import torch
import torch.nn.functional as F

from prunecert.network import AffineOp, AvgPool2d, Conv2d, Linear, Scale

SPARSE_FRACTION = 0.5   # below this share of used columns, multiply only by the used rows of W
LIVE_FRACTION = 0.875   # below this share of non-zero coefficient rows, multiply only those rows
FAST_DTYPE = torch.float32   # conv transposes of float64 rows run in it (20x faster on CPU), see `fast_ok`
FAST_RANGE = 2.0 ** 60       # coefficients this large or larger stay in float64 (no overflow in float32)
FLOAT32_TINY = 2.0 ** -126   # smallest normal float32: the absolute error of one underflowing operation
COLUMN_BUDGET = 2 ** 22      # float64 conv transposes of dense rows: rows per call so that the kernel's
                             # unfolded buffer (rows x C_in kh kw x H_out W_out) stays this small (2x faster)


def fast_ok(op: AffineOp, lam_absmax: float) -> bool:
    """Whether W^T lam may be computed in FAST_DTYPE: a conv or average pooling with no weight that
    float32 would flush (subnormal) and coefficients of moderate size (no overflow). Rounding lam and
    W to float32 and the float32 sums then err by at most gamma^32_{k+2} (|W|^T |lam|)_j +
    `fast_tiny` per entry (docs/theory.md, "Conv transposes in float32")."""
    if not isinstance(op, (Conv2d, AvgPool2d)) or not lam_absmax < FAST_RANGE:
        return False
    return float32_weights(op)[0]


def fast_tiny(op: AffineOp) -> float:
    """FLOAT32_TINY (2 max_j colsum_j + 4 k): the underflow part of `fast_ok`'s error bound, per
    entry, for either network's op (k: the transpose's fan-in, bounded by C_out kh kw)."""
    if not isinstance(op, (Conv2d, AvgPool2d)):
        return 0.0
    w = op.weight if isinstance(op, Conv2d) else op._kernel
    return FLOAT32_TINY * (2.0 * float32_weights(op)[1] + 4 * int(w.shape[0] * w.shape[2] * w.shape[3]))


_WEIGHTS32: "weakref.WeakKeyDictionary[AffineOp, tuple[bool, float]]" = weakref.WeakKeyDictionary()


def float32_weights(op: "Linear | Conv2d | AvgPool2d") -> tuple[bool, float]:
    """(every non-zero |W| in [2^-100, 2^60): float32 neither flushes nor overflows it, an upper bound
    on the largest column sum max_j sum_i |W_ij| of the transpose), per op (cached)."""
    if op not in _WEIGHTS32:
        a = (op._kernel if isinstance(op, AvgPool2d) else op.weight).abs()
        ok = bool(((a == 0) | ((a >= 2.0 ** -100) & (a < 2.0 ** 60))).all())
        cols = a.sum(0) if isinstance(op, Linear) else a.sum(dim=(0, 2, 3))
        _WEIGHTS32[op] = (ok, float(cols.max()) * (1 + 2.0 ** -40))
    return _WEIGHTS32[op]


def dot(lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum over the trailing dims of lam (Bl, R, *s) * v -> (B or Bl, R).

    `v` is (B, *s) or (*s) (shared by all rows), or (B|1, R, *s) (one vector per row).
    """
    flat = lam.flatten(2)
    if v.dim() == lam.dim():                            # per-row vectors
        return (lam * v.to(lam.dtype)).flatten(2).sum(-1)
    if v.dim() == lam.dim() - 2:                        # no batch dim
        return flat @ v.reshape(-1).to(lam.dtype)
    vb = v.reshape(v.shape[0], -1).to(lam.dtype)
    if flat.shape[0] == 1:
        return (flat[0] @ vb.T).T
    return torch.bmm(flat, vb.unsqueeze(2)).squeeze(2)


def abs_dot(lay: "Layout", lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, R): sum_i |lam_i| v_i per row for a per-neuron v >= 0 (a magnitude). On windows as the sum
    of |lam * v|, taken in place (|lam_i| v_i = |lam_i v_i| in floating point too): no |lam| tensor."""
    if lay.dense:
        return dot(lam.abs(), v)
    return window_sum((lay.split(lam) * lay.read(v).to(lam.dtype)).abs_())


def window_sum(t: torch.Tensor) -> torch.Tensor:
    """(Bl, R): the sum over each row's window of a tensor shaped like rows on windows, as they are
    or `split` ((Bl, 2, R/2, C, kh, kw): the pairs' halves in order)."""
    return t.sum((-3, -2, -1)).reshape(t.shape[0], -1)


class Dense:
    """Rows over a whole level: lam (Bl, R, *shape); per-neuron tensors broadcast over the rows."""

    dense = True

    def at(self, x: torch.Tensor) -> torch.Tensor:
        """A per-neuron tensor (B, *shape) as (B, 1, *shape), to broadcast against the rows."""
        return x.unsqueeze(1)

    def dot(self, lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sum_i lam_i v_i per row: v is (B, *shape), (*shape) or per row (B|1, R, *shape)."""
        return dot(lam, v)

    def backward(self, op: AffineOp, lam: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, "Dense"]:
        return dense_backward(op, lam, fast), self

    def backward2(self, op: AffineOp, op2: AffineOp, lam: torch.Tensor, fast: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, "Dense"]:
        """(op^T lam, op2^T lam): two transposes (stacked, dense rows measured slower: the vgg pair's
        16->16 conv on 100 rows at 28x28 in float32 took 24.7 ms stacked, 19.9 ms apart)."""
        return dense_backward(op, lam, fast), dense_backward(op2, lam, fast), self

    def width(self, shape: Sequence[int]) -> int:
        return math.prod(shape)

    def take(self, rows: torch.Tensor) -> "Dense":
        return self

    def split(self, lam: torch.Tensor) -> torch.Tensor:
        """Rows as `read` broadcasts against them (dense: as they are)."""
        return lam

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """A per-neuron tensor to combine with `split` rows (dense: `at`)."""
        return self.at(x)

    def join(self, t: torch.Tensor) -> torch.Tensor:
        """`split` rows back to (Bl, R, ...)."""
        return t


def dense_backward(op: AffineOp, lam: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """op.backward on (Bl, R, *out) coefficients (`fast`: a conv computed in FAST_DTYPE). For a Linear,
    rows that are all zero (the padding of regions with fewer selected neurons) are left out of the
    product, and when the coefficient columns are mostly zero in every row (a completed pruned twin:
    removed neurons have zero outgoing weights), only the used columns enter it: the same terms, so the
    same rounding bound."""
    b, r = lam.shape[:2]
    flat = lam.reshape(b * r, *lam.shape[2:])
    if isinstance(op, Linear) and flat.shape[0] > 1:
        nonzero = flat.ne(0)
        live = nonzero.any(dim=1)
        n_live = int(live.sum())
        if n_live < LIVE_FRACTION * flat.shape[0]:
            out = flat.new_zeros(b * r, *op.in_shape)
            out[live] = dense_backward(op, flat[live].unsqueeze(0))[0] if n_live else out[live]
            return out.reshape(b, r, *op.in_shape)
        used = nonzero.any(dim=0)
        k = int(used.sum())
        if k < SPARSE_FRACTION * flat.shape[1]:
            return (flat[:, used] @ op.weight[used].to(lam.dtype)).reshape(b, r, *op.in_shape)
    if fast:
        return op.backward(flat.to(FAST_DTYPE)).to(lam.dtype).reshape(b, r, *op.in_shape)
    if isinstance(op, (Conv2d, AvgPool2d)):   # float64 transposes unfold every row at once: in pieces
        kernel = op.weight.shape[2:] if isinstance(op, Conv2d) else op.kernel
        per = max(1, COLUMN_BUDGET // (op.in_shape[0] * math.prod(kernel) * math.prod(op.out_shape[1:])))
        if flat.shape[0] > per:
            return torch.cat([op.backward(flat[i:i + per]) for i in range(0, flat.shape[0], per)]).reshape(
                b, r, *op.in_shape)
    return op.backward(flat).reshape(b, r, *op.in_shape)


def stackable(op: AffineOp, op2: AffineOp) -> bool:
    """Whether two ops' transposes of the same rows on windows can run as one conv_transpose2d: convs of
    the same geometry, their weights stacked along the transpose's output channels (`stacked_weight`):
    lam is read and converted once (measured on the vgg pair's convs, windows of 32-100 rows: 5-35 %
    faster in float32, 4-12 % in float64). Each output channel is a sum over the same products as the separate
    transposes take; the kernel may add them in another order (the last bits differ in about a third
    of random cases), which the rounding bound gamma_k |W|^T |lam| of `backsub` covers in any order."""
    return isinstance(op, Conv2d) and isinstance(op2, Conv2d) and op.weight.shape == op2.weight.shape \
        and op.stride == op2.stride and op.padding == op2.padding and op.in_shape == op2.in_shape


_STACKED: "weakref.WeakKeyDictionary[AffineOp, dict[tuple[int, torch.dtype], tuple[AffineOp, torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()


def stacked_weight(op: Conv2d, op2: Conv2d, dtype: torch.dtype) -> torch.Tensor:
    """[W; W2] along the input channels of the ops (the transpose's output channels), in dtype, cached
    per op pair (the value keeps op2, so its id stays unique while the entry lives)."""
    per = _STACKED.setdefault(op, {})
    key = (id(op2), dtype)
    if key not in per or per[key][0] is not op2:
        per[key] = (op2, torch.cat([op.weight, op2.weight], dim=1).to(dtype))
    return per[key][1]


class Patches:
    """Rows as windows (Bl, R, C, kh, kw) of a level of shape (C, H, W); `corner` (Ba, R, 2) holds
    each row's top-left window position (may be negative: the conv padding)."""

    dense = False

    def __init__(self, corner: torch.Tensor, size: tuple[int, int], shape: Sequence[int]):
        self.corner, self.size, self.shape = corner, size, tuple(int(s) for s in shape)
        self._idx: torch.Tensor | None = None
        self._pad = 0
        self._paired: bool | None = None     # `paired`, once known
        self._half: Patches | None = None    # the first half of the rows (`read` when paired)

    # ------------------------------------------------------------------ rows in pairs
    def paired(self) -> bool:
        """Whether rows come as two halves on the same windows: row i and row R/2 + i share a corner
        (rows [+e_j; -e_j] and everything walked from them), so a per-neuron tensor is read once per pair."""
        if self._paired is None:
            r = int(self.corner.shape[1])
            self._paired = r >= 2 and r % 2 == 0 and torch.equal(self.corner[:, :r // 2], self.corner[:, r // 2:])
        return self._paired

    def split(self, lam: torch.Tensor) -> torch.Tensor:
        """Rows (Bl, R, C, kh, kw) as `read` broadcasts against them: (Bl, 2, R/2, C, kh, kw) when
        paired (a view), else as they are."""
        if not self.paired():
            return lam
        return lam.reshape(lam.shape[0], 2, lam.shape[1] // 2, *lam.shape[2:])

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """`at` for rows as `split` gives them: when paired, each pair's window read once, (B|1, 1, R/2,
        C, kh, kw) -- the same values as `at`, at half its cost."""
        if not self.paired():
            return self.at(x)
        if self._half is None:
            self._half = Patches(self.corner[:, :self.corner.shape[1] // 2], self.size, self.shape)
        return self._half.at(x).unsqueeze(1)

    def join(self, t: torch.Tensor) -> torch.Tensor:
        """`split` rows (or any tensor shaped like them, e.g. their products with `read`) back to
        (Bl, R, C, kh, kw)."""
        if not self.paired():
            return t
        return t.reshape(t.shape[0], -1, *t.shape[3:])

    # ------------------------------------------------------------------ reading per-neuron tensors
    def _index(self) -> tuple[torch.Tensor, int]:
        """Flat indices (Ba, R, kh*kw) of each row's window in the level zero-padded by `pad`."""
        if self._idx is None:
            _, h, w = self.shape
            kh, kw = self.size
            cy, cx = self.corner[..., 0], self.corner[..., 1]
            pad = max(0, int(-cy.min()), int(-cx.min()), int((cy + kh - h).max()), int((cx + kw - w).max()))
            ys = cy.unsqueeze(-1) + pad + torch.arange(kh).view(1, 1, kh)
            xs = cx.unsqueeze(-1) + pad + torch.arange(kw).view(1, 1, kw)
            self._idx = (ys.unsqueeze(-1) * (w + 2 * pad) + xs.unsqueeze(-2)).flatten(2)
            self._pad = pad
        return self._idx, self._pad

    def at(self, x: torch.Tensor) -> torch.Tensor:
        """A per-neuron tensor (B|1, C, H, W) or (C|1, H|1, W|1) read at every row's window:
        (B|1, R, C, kh, kw), zero outside the level."""
        if x.dtype == torch.bool:
            return self.at(x.to(torch.uint8)).bool()
        idx, pad = self._index()
        if x.dim() == len(self.shape):
            x = x.unsqueeze(0)
        x = x.expand(x.shape[0], *self.shape)
        flat = F.pad(x, (pad, pad, pad, pad)).flatten(2)           # (Bx, C, N)
        b = max(flat.shape[0], idx.shape[0])
        r, k = idx.shape[1], idx.shape[2]
        c = self.shape[0]
        src = flat.unsqueeze(1).expand(b, r, c, flat.shape[2])
        out = torch.gather(src, 3, idx.unsqueeze(2).expand(b, r, c, k))
        return out.reshape(b, r, c, *self.size)

    def dot(self, lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if v.dim() == lam.dim():      # already per row
            return dot(lam, v)
        return window_sum(self.split(lam) * self.read(v).to(lam.dtype))

    def width(self, shape: Sequence[int]) -> int:
        return shape[0] * self.size[0] * self.size[1]

    def take(self, rows: torch.Tensor) -> "Patches":
        return Patches(self.corner[:, rows], self.size, self.shape)

    # ------------------------------------------------------------------ walking down
    def backward(self, op: AffineOp, lam: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, "Dense | Patches"]:
        """W^T applied to the windows: the new windows on op's input level (dense once they cover it);
        `fast`: a conv computed in FAST_DTYPE."""
        b, r = lam.shape[:2]
        flat = lam.reshape(b * r, *lam.shape[2:])
        if isinstance(op, Scale):
            return self.join(self.split(lam) * self.read(op.scale.to(lam.dtype))), self
        if isinstance(op, Conv2d):
            weight, groups = op.weight.to(lam.dtype), 1
        elif isinstance(op, AvgPool2d):
            weight, groups = op._kernel.to(lam.dtype), op.in_shape[0]
        else:   # Flatten / Linear never see patches (their outputs are 1-D)
            raise TypeError(f"patches cannot go through a {op.kind} op")
        if isinstance(op, AvgPool2d) and op.tiles and not fast and flat.dtype == torch.float64:
            new = op.repeat_backward(flat)    # the same floats as the conv below (`AvgPool2d.repeat_backward`)
        elif fast:
            new = F.conv_transpose2d(flat.to(FAST_DTYPE), weight.to(FAST_DTYPE), None, op.stride, 0, groups=groups)
        else:
            new = F.conv_transpose2d(flat, weight, None, op.stride, 0, groups=groups)
        # (fast) the exact conversion back to lam's dtype joins the clearing of the padding positions
        return self.land(op, new, b, r, lam.dtype)

    def backward2(self, op: AffineOp, op2: AffineOp, lam: torch.Tensor, fast: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, "Dense | Patches"]:
        """(op^T lam, op2^T lam) on the windows, as `backward` twice; for `stackable` convs one transposed
        conv with the stacked weights, its output split by channel."""
        if not stackable(op, op2):
            a, lay = self.backward(op, lam, fast)
            return a, self.backward(op2, lam, fast)[0], lay
        assert isinstance(op, Conv2d) and isinstance(op2, Conv2d)
        b, r = lam.shape[:2]
        c = op.in_shape[0]
        flat = lam.reshape(b * r, *lam.shape[2:])
        dt = FAST_DTYPE if fast else lam.dtype
        both = F.conv_transpose2d(flat.to(dt), stacked_weight(op, op2, dt), None, op.stride, 0)
        assert tuple(both.shape[2:]) == self.landing_size(op)
        nxt, dense = self._below(op)
        keep = nxt.inside().to(lam.dtype)
        halves = [both[:, i * c:(i + 1) * c].reshape(b, r, c, *both.shape[2:]) * keep for i in (0, 1)]
        if dense:
            return nxt.to_dense(halves[0]), nxt.to_dense(halves[1]), Dense()
        return halves[0], halves[1], nxt

    def landing_size(self, op: "Conv2d | AvgPool2d") -> tuple[int, int]:
        """The size of the windows that op's transpose (padding 0) makes of these."""
        k = op.weight.shape[2:] if isinstance(op, Conv2d) else op.kernel
        return (self.size[0] - 1) * op.stride[0] + k[0], (self.size[1] - 1) * op.stride[1] + k[1]

    def _below(self, op: "Conv2d | AvgPool2d") -> tuple["Patches", bool]:
        """The windows on op's input level after op's transpose, and whether they turn dense (cover the
        level, or most of it)."""
        corner = torch.stack([self.corner[..., 0] * op.stride[0] - op.padding[0],
                              self.corner[..., 1] * op.stride[1] - op.padding[1]], dim=-1)
        size = self.landing_size(op)
        nxt = Patches(corner, size, op.in_shape)
        nxt._paired = self._paired    # corners map row by row: pairs stay pairs
        dense = size[0] >= op.in_shape[1] or size[1] >= op.in_shape[2] or \
            size[0] * size[1] * 2 >= op.in_shape[1] * op.in_shape[2]
        return nxt, dense

    def land(self, op: "Conv2d | AvgPool2d", new: torch.Tensor, b: int, r: int, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, "Dense | Patches"]:
        """Windows `new` (b r, C_in, *landing_size) that a transpose of op made of these rows (`backward`'s,
        or e.g. `firstop`'s matrix product), placed on op's input level: padding positions cleared (in
        one pass with the conversion to `dtype`, default new's), dense once they cover the level."""
        assert tuple(new.shape[2:]) == self.landing_size(op)
        nxt, dense = self._below(op)
        new = new.reshape(b, r, *new.shape[1:]) * nxt.inside().to(dtype or new.dtype)
        if dense:
            return nxt.to_dense(new), Dense()
        return new, nxt

    def inside(self) -> torch.Tensor:
        """(Ba, R, 1, kh, kw) mask of window positions on the level (not on the padding)."""
        _, h, w = self.shape
        kh, kw = self.size
        ys = self.corner[..., 0].unsqueeze(-1) + torch.arange(kh).view(1, 1, kh)
        xs = self.corner[..., 1].unsqueeze(-1) + torch.arange(kw).view(1, 1, kw)
        my = (ys >= 0) & (ys < h)
        mx = (xs >= 0) & (xs < w)
        return (my.unsqueeze(-1) & mx.unsqueeze(-2)).unsqueeze(2)

    def to_dense(self, lam: torch.Tensor) -> torch.Tensor:
        """The windows placed on the full level: (Bl, R, C, H, W) (entries off the level dropped)."""
        idx, pad = self._index()
        c, h, w = self.shape
        b, r = max(lam.shape[0], idx.shape[0]), lam.shape[1]
        k = idx.shape[2]
        canvas = lam.new_zeros(b, r, c, (h + 2 * pad) * (w + 2 * pad))
        canvas.scatter_(3, idx.unsqueeze(2).expand(b, r, c, k), lam.expand(b, r, c, *self.size).reshape(b, r, c, k))
        return canvas.reshape(b, r, c, h + 2 * pad, w + 2 * pad)[..., pad:pad + h, pad:pad + w].contiguous()


DENSE = Dense()
Layout: TypeAlias = Dense | Patches


def unit_patches(neuron: torch.Tensor, sign: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float64
                 ) -> tuple[torch.Tensor, Patches]:
    """Rows sign * e_neuron over a (C, H, W) level as 1x1 windows: neuron, sign (Ba, R) (sign 0: a
    padding row)."""
    c, h, w = shape
    ch, y, x = neuron // (h * w), (neuron // w) % h, neuron % w
    lam = torch.zeros(*neuron.shape, c, 1, 1, dtype=dtype)
    lam.view(*neuron.shape, c).scatter_(-1, ch.unsqueeze(-1), sign.to(dtype).unsqueeze(-1))
    return lam, Patches(torch.stack([y, x], dim=-1), (1, 1), shape)
