"""Projected Adam and the stopping rule of the slope searches (`alpha.py`: the Delta walk's relaxation
parameters; `alpha_diff.py`: f's and g's lower slopes on f - g).

Every parameter in [0, 1] gives a sound bound, so a search only *chooses* parameters: it runs in
SEARCH_DTYPE without rounding margins, and its callers evaluate the best parameters seen once more in
float64 with every margin. `minimise` searches K rows at once, each on its own: a row's step count,
stall count and best point depend only on its own bounds, so which rows (or regions) share a batch
decides nothing but float32 rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prunecert.core.interval import Bounds

LEARNING_RATE = 0.5
DECAY = 0.9           # the step size shrinks by this factor per step
SEARCH_DTYPE = torch.float32


@dataclass(frozen=True)
class Stop:
    """A row stops after `patience` steps in a row that improve its bound by < `min_gain` (relative)."""

    patience: int
    min_gain: float


# Measured on the LeNet-300-100 benchmark pair (100 boxes per eps 0.005-0.05, benchmarks/certify.py):
# a longer Delta-parameter search (alpha.py) moves no reported max |Delta|; the f - g slopes
# (alpha_diff.py, warm-started at CROWN's) stopped with (3, 1e-3) come out up to 0.4 % looser than
# searching all 20 steps, with (5, 3e-4) at most 0.01 % (8-14 steps instead of 6-10)
DELTA_STOP = Stop(3, 1e-3)
SLOPE_STOP = Stop(5, 3e-4)


class ProjectedAdam:
    """Projected Adam (Kingma & Ba 2015) onto [0, 1] with an exponentially decaying step.

    Written out (a few lines) because constructing a `torch.optim` optimiser imports torch._dynamo,
    which costs seconds on the first call of every process (every CLI run).
    """

    def __init__(self, leaves: list[torch.Tensor], lr: float = LEARNING_RATE, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, free: Sequence[torch.Tensor | None] | None = None):
        """`free`: optional bool masks (broadcastable to each leaf) of the entries whose gradient may be
        non-zero; the others never move (a zero gradient steps by exactly 0), so the moments and the
        step are kept for the free entries only (on LeNet 5-15 % of the slopes, unstable neurons)."""
        self.leaves, self.lr, self.betas, self.eps, self.t = leaves, lr, betas, eps, 0
        masks = list(free) if free is not None else [None] * len(leaves)
        self.index = [None if f is None or not x.is_contiguous() else f.expand_as(x).reshape(-1).nonzero().squeeze(1)
                      for x, f in zip(leaves, masks)]
        self.packed = [x if i is None else x.reshape(-1)[i] for x, i in zip(leaves, self.index)]
        self.m = [torch.zeros_like(x) for x in self.packed]
        self.rows: dict[int, torch.Tensor] = {}    # each packed entry's row (by its leaf's index tensor)
        self.v = [torch.zeros_like(x) for x in self.packed]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None], active: torch.Tensor | None = None, dim: int = 0) -> None:
        """One step. `active`: optional bool mask over dimension `dim` of every leaf (the searches' rows);
        entries it marks False keep their values, so each row stops on its own."""
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr * DECAY ** (self.t - 1) * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        # rows not active step by -0 x m: exactly their value (and in [0, 1], so the clamp keeps it);
        # active rows by (-lr m) / denominator, the float addcdiv(m, ., value=-lr) computes
        scale = None if active is None else torch.where(active, -lr, 0.0).to(self.leaves[0].dtype)
        for leaf, idx, x, g, m, v in zip(self.leaves, self.index, self.packed, grads, self.m, self.v):
            if g is None:       # a parameter the bound does not depend on
                continue
            if idx is not None:
                g = g.reshape(-1)[idx]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().add_(self.eps)
            if scale is None:
                x.addcdiv_(m, denom, value=-lr)
            elif idx is None:
                x.addcdiv_(m * _along(scale, dim, x.dim()), denom)
            else:   # each packed entry's row: its flat index over the leaf's trailing size, modulo the rows
                if self.rows.get(id(idx)) is None:
                    self.rows[id(idx)] = idx.div(math.prod(leaf.shape[dim + 1:]), rounding_mode="floor") % leaf.shape[dim]
                x.addcdiv_(m * scale[self.rows[id(idx)]], denom)
            x.clamp_(0.0, 1.0)
            if idx is not None:
                leaf.view(-1).index_copy_(0, idx, x)


def _along(mask: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A (K,) mask shaped to broadcast along dimension `dim` of an `ndim`-dimensional leaf."""
    return mask.reshape(*([1] * dim), -1, *([1] * (ndim - dim - 1)))


@dataclass
class Search:
    """What `minimise` found: the best leaves seen per row, the steps taken, whether the deadline cut it."""

    best: list[torch.Tensor]
    steps: int
    cut: bool


Grads = Callable[[], Sequence[torch.Tensor | None]]
Objective = Callable[[list[torch.Tensor]], "torch.Tensor | tuple[torch.Tensor, Grads]"]


def minimise(upper: Objective, leaves: list[torch.Tensor], iterations: int,
             stop: Stop, deadline: float | None = None, dim: int = 0,
             free: Sequence[torch.Tensor | None] | None = None) -> Search:
    """Projected Adam on K rows' upper bounds `upper(leaves)` (shape (K,)); dimension `dim` of every
    leaf indexes the rows. `upper` returns the bounds (differentiated by autograd: leaves that
    require grad), or the bounds and a function computing the gradient of their sum per leaf
    (called only when a step follows: a hand-written backward, `alpha_diff.py`). `free`: the
    entries that may move (`ProjectedAdam`). Each row keeps the best leaves it has seen and stops as `stop` says; the search ends when every row has stopped, after
    `iterations` evaluations, or when the next one might not fit before `deadline` (perf_counter): a
    step starts only if twice the last one's time (the step and the callers' final float64
    evaluation) fits. The last evaluation takes no gradient (no step follows it)."""
    best_leaves = [x.detach().clone() for x in leaves]
    adam = ProjectedAdam(leaves, LEARNING_RATE, free=free)
    best: torch.Tensor | None = None
    stalled: torch.Tensor | None = None
    cut, steps, spent = False, 0, 0.0
    for i in range(iterations):
        start = time.perf_counter()
        if deadline is not None and start + 2 * spent > deadline:
            cut = True
            break
        steps += 1
        out = upper(leaves)
        ub, grads = out if isinstance(out, tuple) else (out, _autograd(out, leaves))
        with torch.no_grad():
            if best is None:
                best = torch.full_like(ub, torch.inf)
                stalled = torch.zeros(ub.shape, dtype=torch.int64)
            assert stalled is not None
            better = ub < best
            rows = better.nonzero().squeeze(1)
            for leaf, keep in zip(leaves, best_leaves):
                if len(rows) == len(better):
                    keep.copy_(leaf)
                elif len(rows):    # (an index copy costs a third of a masked `where` over every row)
                    keep.index_copy_(dim, rows, leaf.index_select(dim, rows))
            gain = best - torch.where(better, ub, best)    # the first step: inf (or nan), never a stall
            best = torch.where(better, ub, best)
            stalled = torch.where(gain <= stop.min_gain * best.abs(), stalled + 1, 0)
            active = stalled < stop.patience
        if i == iterations - 1 or not bool(active.any()):
            break
        adam.step(grads(), active, dim)
        spent = time.perf_counter() - start
    return Search(best_leaves, steps, cut)


def _autograd(ub: torch.Tensor, leaves: list[torch.Tensor]) -> Grads:
    return lambda: torch.autograd.grad(ub.sum(), leaves, allow_unused=True)


def unit_rows(row: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(K, 1, *shape) float64 rows: +e_row for row < n, else -e_(row - n) (n = prod(shape))."""
    n = math.prod(shape)
    out = torch.zeros(len(row), n, dtype=torch.float64)
    out.scatter_(1, (row % n).unsqueeze(1), torch.where(row < n, 1.0, -1.0).to(torch.float64).unsqueeze(1))
    return out.reshape(len(row), 1, *shape)


def each_row(rows: torch.Tensor, shape: Sequence[int], group: int,
             solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Bounds:
    """Bounds of a level of shape `shape` from searches over the chosen rows only: `rows` is a (B, 2n)
    mask (row i < n: +e_i, the upper bound of entry i; row n + i: -e_i, its lower bound). Every chosen
    (region, row) becomes its own one-row region of the search, so regions choosing different rows
    cost no padding; `solve(regions, rows)` gets at most `group` of them at a time and returns their
    (K,) upper bounds. Rows not chosen get infinite bounds."""
    n = math.prod(shape)
    which, row = rows.nonzero(as_tuple=True)
    ub = torch.full((rows.shape[0], 2 * n), torch.inf, dtype=torch.float64)
    for a in range(0, len(row), group):
        idx, r = which[a:a + group], row[a:a + group]
        ub[idx, r] = solve(idx, r)
    return Bounds(-ub[:, n:].reshape(-1, *shape), ub[:, :n].reshape(-1, *shape))
