"""Which neurons get back-substituted bounds, and walking their rows +-e_i in memory-bounded chunks.

Back-substitution costs a walk per row, so the bounders start rows only where they can matter:
- a^f, a^g of a hidden layer: the neurons unstable in f or in g under the cheap (interval) bounds,
  since a stable neuron's relaxation is exact whatever its bounds (the logits: every neuron);
- Delta and the local deviation of a layer whose rows are cheap (neurons x widest row <= `FULL_COST`,
  e.g. all of LeNet-300-100): every neuron;
- costlier layers (conv nets): the neurons that settle the layer's reported maximum |bound|, walked
  widest first until no neuron left could raise it (`bound_widest`: the same maximum as walking every
  neuron), plus -- only where diff-linear's first pass found the Delta walk worth it -- the Delta
  rows of neurons still unstable in f or g (a both-stable neuron's Delta relaxation is exact);
  bounds that feed nothing but that maximum (local deviations; on a costly net's first pass also
  the logits' Delta, cheap layer or not) one side at a time (`bound_top_rows`);
- CROWN on f - g comes for free from the f and g walks of the same rows: the f-walk of +e_i plus
  the g-walk of -e_i, added at the network input where the two halves' terms cancel.
Neurons left out keep their (sound) interval bounds. Regions selecting different numbers of rows
are walked in groups of similar counts (`region_groups`), so a batch pays for little padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch

from prunecert.certify.backsub import Form, concretise
from prunecert.certify.layout import DENSE, Layout, unit_patches
from prunecert.core.interval import Bounds
from prunecert.core.region_batch import RegionBatch
from prunecert.network import AffineOp, AvgPool2d, Conv2d

ROW_BUDGET = 2 ** 22   # elements of one (regions x rows x width) coefficient tensor per chunk
FULL_COST = 2 ** 18    # layers with neurons x row width up to this bound every neuron's Delta / local bound
TOP_ROWS = 4           # costlier layers: neurons per region in the first round of the widest-first walk


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


def unit_rows(idx: torch.Tensor, valid: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, Layout]:
    """Rows [+e_idx; -e_idx] per region ((Ba, k) each): (Ba, 2k, *shape) dense, or 1x1 windows on a
    (C, H, W) level."""
    sign = torch.cat([valid, valid], dim=1).to(torch.float64)
    sign[:, idx.shape[1]:] *= -1
    return signed_rows(torch.cat([idx, idx], dim=1), sign, shape)


def signed_rows(neuron: torch.Tensor, sign: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, Layout]:
    """Rows sign * e_neuron per region (neuron, sign: (Ba, R); sign 0: a padding row): (Ba, R, *shape)
    dense, or 1x1 windows on a (C, H, W) level."""
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


Walk = Callable[[torch.Tensor, Layout, "torch.Tensor | None"], Form]   # rows, their layout, regions (None: all)
GROUP_FILL = 0.75    # regions walked together when their row counts are within this ratio of the group's largest


def region_groups(counts: torch.Tensor) -> list[torch.Tensor]:
    """Regions (indices) with rows to walk, in groups of similar row counts: a group is padded to its
    largest count, so grouping keeps the padding (walked at full cost) under 1 - GROUP_FILL."""
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    groups: list[list[int]] = []
    for r in order:
        c = int(counts[r])
        if c == 0:
            break
        if groups and c >= GROUP_FILL * int(counts[groups[-1][0]]):
            groups[-1].append(r)
        else:
            groups.append([r])
    return [torch.tensor(sorted(g)) for g in groups]


def bound_rows(walk: Walk, sel: Selection, shape: Sequence[int], region: RegionBatch, chunk: int,
               stop: Callable[[], bool] = lambda: False) -> Bounds:
    """Bounds on the selected neurons of a layer ((B, m) each), walking chunks of `chunk` neurons
    (for the whole batch; a group of fewer regions takes proportionally more). Regions that select
    different numbers of neurons are walked in groups of similar counts (`region_groups`); once
    `stop()` says so (a time limit), the remaining neurons get infinite bounds."""
    if sel.idx.shape[0] == 1:   # one selection shared by every region
        return _bound_chunks(walk, sel, shape, region, None, chunk, stop)
    b = region.batch
    lo = torch.full((b, sel.m), -torch.inf, dtype=torch.float64)
    up = torch.full((b, sel.m), torch.inf, dtype=torch.float64)
    counts = sel.valid.sum(1)
    for group in region_groups(counts):
        m = int(counts[group].max())
        sub = Selection(sel.idx[group, :m], sel.valid[group, :m], sel.n)
        idx = None if len(group) == b else group
        res = _bound_chunks(walk, sub, shape, region if idx is None else region.select(group), idx,
                            max(1, chunk * b // len(group)), stop)
        lo[group, :m], up[group, :m] = res.lower, res.upper
    return Bounds(lo, up)


def _bound_chunks(walk: Walk, sel: Selection, shape: Sequence[int], region: RegionBatch, idx: torch.Tensor | None, chunk: int,
                  stop: Callable[[], bool]) -> Bounds:
    ups, los = [], []
    for a in range(0, sel.m, chunk):
        z = min(sel.m, a + chunk)
        if stop():
            inf = torch.full((region.batch, sel.m - a), torch.inf, dtype=torch.float64)
            ups.append(inf)
            los.append(-inf)
            break
        lam, lay = unit_rows(sel.idx[:, a:z], sel.valid[:, a:z], shape)
        u = concretise(walk(lam, lay, idx), region)
        ups.append(u[:, :z - a])
        los.append(-u[:, z - a:])
    return Bounds(torch.cat(los, dim=1), torch.cat(ups, dim=1))


def bound_widest(walk: Walk, prior: Bounds, cand: torch.Tensor, shape: Sequence[int], region: RegionBatch, chunk: int,
                 first: int, stop: Callable[[], bool] = lambda: False) -> Bounds:
    """`prior` (B, *shape) tightened by walking candidate neurons (`cand`, (B, n)) widest first, until
    each region's maximum |bound| over the layer is settled: once the widest neuron not yet walked has
    a prior max(|lower|, |upper|) no larger than the current maximum, walking the rest cannot change
    the layer's maximum (each walked bound is met with its prior). Rounds of `first`, 2 `first`, ...
    neurons per region; the reported maximum equals the every-row walk's, at a few rows' cost."""
    b = region.batch
    lo, up = prior.lower.reshape(b, -1).clone(), prior.upper.reshape(b, -1).clone()
    n = lo.shape[1]
    key = torch.where(cand, torch.maximum(lo.abs(), up.abs()), torch.full_like(lo, -1.0))
    order = key.argsort(dim=1, descending=True, stable=True)
    ranked = key.gather(1, order)
    count = cand.sum(1)
    walked = ~cand                          # neurons whose bound is final (not candidates, or walked)
    done, k = 0, max(1, first)
    while done < n and not stop():
        amax = torch.where(walked, torch.maximum(lo.abs(), up.abs()), torch.zeros_like(lo)).max(1).values
        active = (done < count) & (ranked[:, done] > amax)
        if not bool(active.any()):
            break
        take = order[:, done:done + k]
        mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, take, True) & cand & active.unsqueeze(1)
        sel = Selection.of(mask, n)
        if sel is not None:
            res = bound_rows(walk, sel, shape, region, chunk, stop)
            lo = torch.maximum(lo, sel.spread(res.lower, -torch.inf, b))
            up = torch.minimum(up, sel.spread(res.upper, torch.inf, b))
        walked |= mask
        done, k = done + k, 2 * k
    return Bounds(lo.reshape(b, *shape), up.reshape(b, *shape))


def bound_top_rows(walk: Walk, prior: Bounds, cand: torch.Tensor, shape: Sequence[int], region: RegionBatch,
                   chunk: int, first: int, stop: Callable[[], bool] = lambda: False) -> Bounds:
    """`bound_widest` one bound at a time, for bounds that feed nothing but the layer's reported
    maximum: the rows +e_i (neuron i's upper bound) and -e_i (its lower bound) of the candidates are
    walked in decreasing order of the bound each would tighten, max(upper, -lower) being the neuron's
    |bound|, in rounds of `first`, 2 `first`, ... rows per region, until no row left could raise the
    region's maximum. The maximum equals the every-row walk's; typically one side of a few neurons is
    walked (the other side of a neuron keeps its prior when it cannot carry the maximum)."""
    b = region.batch
    lo, up = prior.lower.reshape(b, -1).clone(), prior.upper.reshape(b, -1).clone()
    n = lo.shape[1]
    cand2 = torch.cat([cand, cand], dim=1)                  # rows: +e_i (i < n), -e_i (n + i)
    key = torch.where(cand2, torch.cat([up, -lo], dim=1), torch.full((b, 2 * n), -torch.inf, dtype=lo.dtype))
    order = key.argsort(dim=1, descending=True, stable=True)
    ranked = key.gather(1, order)
    walked = ~cand2                         # rows whose bound is final (not candidates, walked, or no match for it)
    done, k = 0, max(1, first)
    while done < 2 * n and not stop():
        value = torch.cat([up, -lo], dim=1)
        amax = torch.where(walked, value, torch.zeros_like(value)).max(1).values
        active = ranked[:, done] > amax
        if not bool(active.any()):
            break
        act = torch.nonzero(active).flatten()
        take = order[act, done:done + k]
        ok = ranked[act, done:done + k] > amax[act].unsqueeze(1)   # a row at or below the maximum cannot raise it
        width = int(ok.sum(1).max())     # ok is a prefix of each region's rows (ranked descending)
        take, ok = take[:, :width], ok[:, :width]
        sign = torch.where(take < n, 1.0, -1.0).to(torch.float64) * ok
        idx = None if len(act) == b else act
        res = _walk_signed(walk, take % n, sign, shape, region if idx is None else region.select(act), idx,
                           max(1, 2 * chunk * b // len(act)), stop)
        got = torch.full((len(act), 2 * n), torch.inf, dtype=torch.float64).scatter_(
            1, take, torch.where(ok, res, torch.full_like(res, torch.inf)))
        up[act], lo[act] = torch.minimum(up[act], got[:, :n]), torch.maximum(lo[act], -got[:, n:])
        walked[act] = walked[act].scatter(1, take, True)
        done, k = done + k, 2 * k
    return Bounds(lo.reshape(b, *shape), up.reshape(b, *shape))


def _walk_signed(walk: Walk, neuron: torch.Tensor, sign: torch.Tensor, shape: Sequence[int], region: RegionBatch,
                 idx: torch.Tensor | None, chunk: int, stop: Callable[[], bool]) -> torch.Tensor:
    """(Ba, R) upper bounds of the rows sign * e_neuron over the regions `idx` (None: all), `chunk` rows
    at a time; rows not walked once `stop()` says so get +inf."""
    out = torch.full(neuron.shape, torch.inf, dtype=torch.float64)
    for a in range(0, neuron.shape[1], chunk):
        if stop():
            break
        lam, lay = signed_rows(neuron[:, a:a + chunk], sign[:, a:a + chunk], shape)
        out[:, a:a + chunk] = concretise(walk(lam, lay, idx), region)
    return out


def bound_rows_pair(walk_f: Walk, walk_g: Walk, sel: Selection, shape: Sequence[int], region: RegionBatch, chunk: int
                    ) -> tuple[Bounds, Bounds, Bounds]:
    """CROWN bounds on a^f and a^g of the selected neurons, and CROWN on f - g for their Delta."""
    out: list[list[torch.Tensor]] = [[], [], []]
    for a in range(0, sel.m, chunk):
        z = min(sel.m, a + chunk)
        lam, lay = unit_rows(sel.idx[:, a:z], sel.valid[:, a:z], shape)
        ff, fg = walk_f(lam, lay, None), walk_g(lam, lay, None)
        k = z - a
        swap = torch.cat([torch.arange(k, 2 * k), torch.arange(k)])
        fd = ff.plus(fg.take(swap), region)     # rows: e_i over f - e_i over g, then the reverse
        for dst, form in zip(out, (ff, fg, fd)):
            dst.append(concretise(form, region))
    res = []
    for parts in out:
        halves = [p.shape[1] // 2 for p in parts]
        res.append(Bounds(torch.cat([-p[:, h:] for p, h in zip(parts, halves)], 1),
                          torch.cat([p[:, :h] for p, h in zip(parts, halves)], 1)))
    return res[0], res[1], res[2]
