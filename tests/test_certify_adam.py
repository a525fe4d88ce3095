"""The slope searches' projected Adam (certify/adam.py): every row searched on its own, never worse
than its start, projected onto [0, 1], honouring the deadline; the row plumbing scatters correctly."""

from __future__ import annotations

import torch

from prunecert.certify.adam import DELTA_STOP, SLOPE_STOP, Stop, each_row, minimise, unit_rows


def _bowl(target: torch.Tensor):
    """K rows, each a separate quadratic (leaf (K, 3)) with its minimum at `target` (clipped to [0, 1])."""
    def upper(leaves: list[torch.Tensor]) -> torch.Tensor:
        return ((leaves[0] - target) ** 2).sum(1)
    return upper


def test_rows_are_searched_independently_and_never_worse():
    target = torch.tensor([[0.2, 0.9, 0.5], [1.7, -0.3, 0.4], [0.5, 0.5, 0.5]])
    start = torch.full((3, 3), 0.5)
    found = minimise(_bowl(target), [start.clone().requires_grad_(True)], 20, SLOPE_STOP)
    best = found.best[0]
    assert ((best >= 0) & (best <= 1)).all()
    assert (_bowl(target)([best]) <= _bowl(target)([start]) + 1e-12).all()
    assert _bowl(target)([best])[0] < 0.05 and torch.allclose(best[2], start[2])   # row 2 starts optimal
    for k in range(3):    # each row alone: the same parameters (separable rows, per-row stopping)
        one = minimise(_bowl(target[k:k + 1]), [start[k:k + 1].clone().requires_grad_(True)], 20, SLOPE_STOP)
        assert torch.equal(one.best[0][0], best[k])
    assert 1 <= found.steps <= 20 and not found.cut


def test_patience_and_deadline():
    target = torch.full((2, 3), 0.3)
    start = torch.full((2, 3), 0.3)    # already at the minimum: stops after `patience` stalled steps
    for stop in (DELTA_STOP, SLOPE_STOP, Stop(1, 0.0)):
        found = minimise(_bowl(target), [start.clone().requires_grad_(True)], 50, stop)
        assert found.steps == stop.patience + 1
    cut = minimise(_bowl(target), [start.clone().requires_grad_(True)], 50, SLOPE_STOP, deadline=0.0)
    assert cut.cut and cut.steps == 0 and torch.equal(cut.best[0], start)


def test_each_row_scatters_the_chosen_rows():
    rows = torch.tensor([[True, False, False, True], [False, False, False, False], [False, True, True, False]])
    calls = []

    def solve(idx: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        calls.append(len(row))
        return (10 * idx + row).to(torch.float64)   # region 10s, row units
    b = each_row(rows, (2,), 2, solve)
    assert calls == [2, 2]
    assert b.upper.tolist() == [[0.0, torch.inf], [torch.inf, torch.inf], [torch.inf, 21.0]]
    assert b.lower.tolist() == [[-torch.inf, -3.0], [-torch.inf, -torch.inf], [-22.0, -torch.inf]]
    assert unit_rows(torch.tensor([0, 3]), (2,)).flatten(1).tolist() == [[1.0, 0.0], [0.0, -1.0]]


def test_a_hand_written_gradient_takes_autograd_s_place():
    """An objective returning (bounds, gradient function) is searched exactly as the autograd one."""
    target = torch.tensor([[0.2, 0.9, 0.5], [1.7, -0.3, 0.4]])
    start = torch.full((2, 3), 0.5)
    calls = []

    def hand(leaves: list[torch.Tensor]):
        def grads():
            calls.append(1)
            return [2 * (leaves[0] - target)]
        return ((leaves[0] - target) ** 2).sum(1), grads
    with torch.no_grad():
        by_hand = minimise(hand, [start.clone()], 20, SLOPE_STOP)
    auto = minimise(_bowl(target), [start.clone().requires_grad_(True)], 20, SLOPE_STOP)
    assert torch.allclose(by_hand.best[0], auto.best[0], atol=1e-6) and by_hand.steps == auto.steps
    assert len(calls) == by_hand.steps - 1   # no gradient after the last evaluation


def test_free_masks_change_nothing_but_the_work():
    """Moments kept only for the entries that can move (`free`) give bit-identical searches, rows on
    dimension 1 stopping at different steps included; entries outside the mask never move."""
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 4, 6, generator=gen) * 1.4 - 0.2
    free = torch.rand(1, 4, 6, generator=gen) < 0.4
    free[:, 2] = False      # a row with nothing free: stalls at once

    def upper(leaves: list[torch.Tensor]) -> torch.Tensor:
        return (torch.where(free, leaves[0] - target, 0.0) ** 2).sum((0, 2))
    start = torch.full((2, 4, 6), 0.5)
    plain = minimise(upper, [start.clone().requires_grad_(True)], 20, SLOPE_STOP, dim=1)
    packed = minimise(upper, [start.clone().requires_grad_(True)], 20, SLOPE_STOP, dim=1, free=[free])
    assert torch.equal(plain.best[0], packed.best[0]) and plain.steps == packed.steps
    assert torch.equal(packed.best[0][:, ~free[0]], start[:, ~free[0]])
    assert not torch.equal(packed.best[0], start)
