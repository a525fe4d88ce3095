"""Which neurons get back-substituted bounds, and walking their rows +-e_i in memory-bounded chunks.

Back-substitution costs a walk per row, so the bounders start rows only where they can matter:
- a^f, a^g of a hidden layer: the neurons unstable in f or in g under the cheap (interval) bounds,
  since a stable neuron's relaxation is exact whatever its bounds (the logits: every neuron);
- Delta of a hidden layer: the same neurons -- the Delta relaxation of a neuron stable in both f and
  g (after the a^f, a^g bounds just computed) is exact too -- plus the `TOP_ROWS` neurons with the
  widest Delta bounds, which carry the layer's reported maximum; layers whose rows are cheap (neurons
  x widest row <= `FULL_COST`, e.g. all of LeNet-300-100) bound every neuron's Delta and local deviation;
- CROWN on f - g comes for free from the f and g walks of the same rows: the f-walk of +e_i plus
  the g-walk of -e_i, added at the network input where the two halves' terms cancel.
Neurons left out keep their (sound) interval bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from prunecert.certify.backsub import Form, RegionBatch, concretise
from prunecert.certify.layout import DENSE, Layout, unit_patches
from prunecert.core.interval import Bounds
from prunecert.network import AffineOp, AvgPool2d, Conv2d

ROW_BUDGET = 2 ** 22   # elements of one (regions x rows x width) coefficient tensor per chunk
FULL_COST = 2 ** 18    # layers with neurons x row width up to this bound every neuron's Delta / local bound
TOP_ROWS = 32          # costlier layers: also the neurons with the widest cheap Delta / local bounds


@dataclass
class Selection:
    """The neurons of one layer to bound, per region: idx, valid (Ba, m) (valid False: padding)."""

    idx: torch.Tensor
    valid: torch.Tensor
    n: int

    @staticmethod
    def of(mask: torch.Tensor | None, n: int) -> "Selection | None":
        """From a (B, n) mask (None: every neuron, shared by all regions); None if nothing is selected."""
        if mask is None or bool(mask.all()):
            return Selection(torch.arange(n).unsqueeze(0), torch.ones(1, n, dtype=torch.bool), n)
        if not bool(mask.any()):
            return None
        counts = mask.sum(1)
        m = int(counts.max())
        idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]
        return Selection(idx, torch.arange(m).unsqueeze(0) < counts.unsqueeze(1), n)

    @property
    def m(self) -> int:
        return int(self.idx.shape[1])

    def spread(self, values: torch.Tensor, fill: float, batch: int) -> torch.Tensor:
        """(B, m) values per selected neuron -> (B, n), `fill` elsewhere."""
        out = torch.full((batch, self.n), fill, dtype=values.dtype)
        idx = self.idx.expand(batch, -1)
        return out.scatter_(1, idx, torch.where(self.valid.expand(batch, -1), values, torch.full_like(values, fill)))


def widest(b: Bounds, k: int) -> torch.Tensor:
    """(B, n) mask of the k neurons of largest max(|lower|, |upper|) per region."""
    amax = torch.maximum(b.lower.abs(), b.upper.abs()).flatten(1)
    k = min(k, amax.shape[1])
    mask = torch.zeros_like(amax, dtype=torch.bool)
    return mask.scatter_(1, amax.topk(k, dim=1).indices, True)


def unit_rows(idx: torch.Tensor, valid: torch.Tensor, shape) -> tuple[torch.Tensor, Layout]:
    """Rows [+e_idx; -e_idx] per region ((Ba, k) each): (Ba, 2k, *shape) dense, or 1x1 windows on a
    (C, H, W) level."""
    neuron = torch.cat([idx, idx], dim=1)
    sign = torch.cat([valid, valid], dim=1).to(torch.float64)
    sign[:, idx.shape[1]:] *= -1
    if len(shape) == 3:
        return unit_patches(neuron, sign, shape)
    rows = torch.zeros(*neuron.shape, math.prod(shape), dtype=torch.float64)
    rows.scatter_(2, neuron.unsqueeze(2), sign.unsqueeze(2))
    return rows.reshape(*neuron.shape, *shape), DENSE


def walk_width(ops_down: list[AffineOp]) -> int:
    """Most coefficients one row holds on its way down through `ops_down` (top op first), windows
    growing through convs until they cover their level."""
    width = 0
    window = (1, 1) if ops_down and len(ops_down[0].out_shape) == 3 else None    # None: dense rows
    for op in ops_down:
        if isinstance(op, (Conv2d, AvgPool2d)) and window is not None:
            k = op.weight.shape[2:] if isinstance(op, Conv2d) else op.kernel
            window = ((window[0] - 1) * op.stride[0] + k[0], (window[1] - 1) * op.stride[1] + k[1])
        full = math.prod(op.in_shape)
        w = full if window is None or len(op.in_shape) != 3 else min(full, op.in_shape[0] * window[0] * window[1])
        width = max(width, w, math.prod(op.out_shape) if window is None else 0)
    return max(width, 1)


Walk = Callable[[torch.Tensor, Layout], Form]


def bound_rows(walk: Walk, sel: Selection, shape, region: RegionBatch, chunk: int,
               stop: Callable[[], bool] = lambda: False) -> Bounds:
    """Bounds on the selected neurons of a layer ((B, m) each), walking chunks of `chunk` neurons;
    once `stop()` says so (a time limit), the remaining neurons get infinite bounds."""
    ups, los = [], []
    for a in range(0, sel.m, chunk):
        z = min(sel.m, a + chunk)
        if stop():
            inf = torch.full((region.batch, sel.m - a), torch.inf, dtype=torch.float64)
            ups.append(inf)
            los.append(-inf)
            break
        lam, lay = unit_rows(sel.idx[:, a:z], sel.valid[:, a:z], shape)
        u = concretise(walk(lam, lay), region)
        ups.append(u[:, :z - a])
        los.append(-u[:, z - a:])
    return Bounds(torch.cat(los, dim=1), torch.cat(ups, dim=1))


def bound_rows_pair(walk_f: Walk, walk_g: Walk, sel: Selection, shape, region: RegionBatch, chunk: int
                    ) -> tuple[Bounds, Bounds, Bounds]:
    """CROWN bounds on a^f and a^g of the selected neurons, and CROWN on f - g for their Delta."""
    out: list[list[torch.Tensor]] = [[], [], []]
    for a in range(0, sel.m, chunk):
        z = min(sel.m, a + chunk)
        lam, lay = unit_rows(sel.idx[:, a:z], sel.valid[:, a:z], shape)
        ff, fg = walk_f(lam, lay), walk_g(lam, lay)
        k = z - a
        swap = torch.cat([torch.arange(k, 2 * k), torch.arange(k)])
        fd = ff.plus(fg.take(swap), region)     # rows: e_i over f - e_i over g, then the reverse
        for dst, form in zip(out, (ff, fg, fd)):
            dst.append(concretise(form, region))
    res = []
    for parts in out:
        k = [p.shape[1] // 2 for p in parts]
        res.append(Bounds(torch.cat([-p[:, h:] for p, h in zip(parts, k)], 1),
                          torch.cat([p[:, :h] for p, h in zip(parts, k)], 1)))
    return res[0], res[1], res[2]
