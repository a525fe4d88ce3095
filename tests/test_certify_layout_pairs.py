"""Rows walked in pairs (`layout.Patches.split/read/join`): rows [+e_j; -e_j] share their windows, so
the walk reads every per-neuron tensor once per pair. Against the same rows read one by one (pairing
switched off): the relaxation steps, window dots and magnitudes give the same floats, whole walks the
same bounds; and the bounds stay sound against sampling on small random conv pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, random_box, random_conv_pair, sample_deltas, sample_points

import prunecert.certify.diff_linear as dl
from prunecert.certify.layout import Patches, abs_dot
from prunecert.certify.relax import DeltaParams, DeltaRelax, SideRelax, relax_delta, relax_side
from prunecert.certify.rows import unit_rows
from prunecert.core.interval import Bounds

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bounds(rng: np.random.Generator, shape: tuple[int, ...], b: int) -> Bounds:
    """Random bounds with stable (active, inactive) and unstable neurons."""
    c = rng.normal(size=(b, *shape))
    w = rng.uniform(0, 2, size=(b, *shape)) * (rng.random((b, *shape)) < 0.8)
    return Bounds(torch.as_tensor(c - w), torch.as_tensor(c + w))


def _paired_rows(rng: np.random.Generator, shape: tuple[int, int, int], b: int, half: int
                 ) -> tuple[torch.Tensor, Patches, Patches]:
    """Random rows on windows whose halves share corners (as walked from [+e_j; -e_j]), the paired
    layout and the same layout with pairing switched off."""
    c, h, _ = shape
    k = int(rng.integers(1, h + 1))
    corner = torch.as_tensor(rng.integers(-k + 1, h, size=(int(rng.choice([1, b])), half, 2)))
    corner = torch.cat([corner, corner], dim=1)
    paired, single = Patches(corner, (k, k), shape), Patches(corner, (k, k), shape)
    single._paired = False
    lam = torch.as_tensor(rng.normal(size=(b, 2 * half, c, k, k))) * paired.inside()
    lam = lam * torch.as_tensor(rng.random(lam.shape) < 0.7)
    return lam, paired, single


def test_unit_rows_are_paired_and_stay_paired_through_ops():
    neuron = torch.tensor([[0, 5, 17], [3, 3, 30]])
    lam, lay = unit_rows(neuron, torch.ones_like(neuron, dtype=torch.bool), (2, 4, 4))
    assert isinstance(lay, Patches) and lay.paired()
    other = Patches(torch.tensor([[[0, 0], [1, 1], [0, 0], [2, 1]]]), (1, 1), (2, 4, 4))
    assert not other.paired()
    assert not Patches(torch.zeros(1, 3, 2, dtype=torch.long), (1, 1), (2, 4, 4)).paired()   # odd count


@settings(max_examples=40, **SLOW)
@given(st.integers(0, 2**32 - 1))
def test_paired_reads_are_the_rows_reads(seed):
    rng = np.random.default_rng(seed)
    h = int(rng.integers(3, 8))
    shape = (int(rng.integers(1, 4)), h, h)
    b = int(rng.integers(1, 4))
    lam, paired, single = _paired_rows(rng, shape, b, int(rng.integers(1, 5)))
    x = torch.as_tensor(rng.normal(size=(b, *shape)))
    assert paired.paired()
    assert torch.equal(paired.join(paired.read(x).expand_as(paired.split(lam))), single.at(x).expand_as(lam))
    assert torch.equal(paired.join(paired.split(lam)), lam)
    torch.testing.assert_close(paired.dot(lam, x), single.dot(lam, x), rtol=1e-15, atol=0)
    m = x.abs()
    torch.testing.assert_close(abs_dot(paired, lam, m), abs_dot(single, lam, m), rtol=1e-15, atol=0)


@settings(max_examples=40, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_paired_relaxation_steps_give_the_same_floats(seed, free):
    """relax_side / relax_delta on paired windows: coefficients and biases bit-for-bit those of the
    rows read one by one, magnitudes equal up to the order of their sums."""
    rng = np.random.default_rng(seed)
    h = int(rng.integers(3, 8))
    shape = (int(rng.integers(1, 4)), h, h)
    b = int(rng.integers(1, 4))
    lam, paired, single = _paired_rows(rng, shape, b, int(rng.integers(1, 5)))
    af, ag = _bounds(rng, shape, b), _bounds(rng, shape, b)
    d = Bounds(af.lower - ag.upper, af.upper - ag.lower)
    side = SideRelax.of(af)
    alpha = torch.as_tensor(rng.uniform(-0.5, 1.5, size=lam.shape)) if free else None
    one, two = relax_side(side, lam, alpha, True, paired), relax_side(side, lam, alpha, True, single)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    at = single.at    # the step written out: lam s where lam >= 0, lam alpha elsewhere; lam+ . t
    lower = at(side.alpha) if alpha is None else torch.where(at(side.unstable), alpha.clamp(0, 1), at(side.alpha))
    assert torch.equal(one[0], lam * torch.where(lam >= 0, at(side.s), lower))
    assert torch.equal(one[1], (lam.clamp_min(0.0) * at(side.t)).flatten(2).sum(-1))
    assert one[2] is not None and two[2] is not None
    torch.testing.assert_close(one[2], two[2], rtol=1e-14, atol=0)
    rel = DeltaRelax.of(af, ag, d)
    p = DeltaParams()
    if free:
        p = DeltaParams(*(torch.as_tensor(rng.uniform(-0.2, 1.2, size=lam.shape)) for _ in DeltaParams.FIELDS))
    one_d, two_d = relax_delta(rel, lam, p, True, paired), relax_delta(rel, lam, p, True, single)
    for x, y in zip(one_d[:3], two_d[:3]):
        assert torch.equal(x, y)
    assert one_d[3] is not None and two_d[3] is not None
    torch.testing.assert_close(one_d[3], two_d[3], rtol=1e-14, atol=0)


def _preactivations(pair, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, f's pre-activations at the points x (n, *shape)."""
    out, h = [], x
    with torch.no_grad():
        for layer in pair.layers_f:
            out.append(layer.forward(h))
            h = out[-1].clamp_min(0.0)
    return [(a.min(0).values, a.max(0).values) for a in out]


@settings(max_examples=6, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["perturb", "prune", "quantise"]))
def test_conv_pairs_walked_in_pairs_same_bounds_and_sound(seed, twin):
    """crown-diff and diff-linear on a small random conv pair (rows on windows through conv, pool and
    the input scaling): the same bounds with pairs read once as with every row read, and every layer
    of f and of the difference contains sampled values."""
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin=twin, in_shape=(1, 12, 12))
    boxes = [random_box(rng, (1, 12, 12)) for _ in range(2)]
    lo, hi = np.stack([x[0] for x in boxes]), np.stack([x[1] for x in boxes])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dl, "FULL_COST", 0)
        cd, b = dl.crown_diff_bounds(pair, lo, hi), dl.diff_linear_bounds(pair, lo, hi)
        m.setattr(Patches, "paired", lambda self: False)
        cd0, b0 = dl.crown_diff_bounds(pair, lo, hi), dl.diff_linear_bounds(pair, lo, hi)
    for new, old in ((cd, cd0), (b, b0)):
        for part in ("f", "g", "delta", "local"):
            for x, y in zip(getattr(new, part), getattr(old, part)):
                assert torch.equal(x.lower, y.lower) and torch.equal(x.upper, y.upper), part
    for r in range(2):
        e2e = sample_deltas(pair, lo[r], hi[r], 300, seed=r)
        pre = _preactivations(pair, sample_points(lo[r], hi[r], 300, seed=r))
        for name, res in (("crown-diff", cd), ("diff-linear", b)):
            for l in range(pair.n_layers):
                assert_contains(res.delta[l].lower[r], res.delta[l].upper[r], e2e[l], f"{name} Delta {l}, box {r}")
                assert_contains(res.f[l].lower[r], res.f[l].upper[r], pre[l], f"{name} f {l}, box {r}")
