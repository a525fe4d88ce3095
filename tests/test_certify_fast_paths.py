"""The shortcuts that make diff-linear cheap on completed pruned pairs (LeNet-300-100 speed work):
structurally zero Deltas (a removed neuron keeps f's incoming weights), alpha optimisation of the
logit rows that matter only, and the skipped zero rows / cached weights of the dense walk. Each is
checked for soundness against sampling and gradient ascent, and against the path without it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, extremes, random_box, random_mlp_weights

import prunecert.certify.diff_linear as dl
from prunecert.certify.diff_linear import crown_diff_bounds, diff_linear_bounds
from prunecert.certify.layout import dense_backward
from prunecert.core.pair import Pair
from prunecert.network import Linear, Network, relu_between

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def completed_pair(rng: np.random.Generator, n_in: int, hidden: list[int], n_out: int) -> tuple[Pair, list]:
    """A random MLP f and a twin g shaped like a coreset-pruned network after completion: in every
    hidden layer some neurons are removed (zero outgoing weights in g; their incoming weights stay
    f's); kept neurons of the first layer keep f's incoming weights, later kept neurons get f's row
    with the removed inputs' columns zeroed and the kept ones re-scaled. Returns the pair and, per
    layer, the neurons whose Delta is 0 by construction (the first layer: all)."""
    ws, bs = random_mlp_weights(rng, n_in, hidden, n_out)
    w2 = [w.copy() for w in ws]
    kept = [rng.random(n) < rng.uniform(0.2, 0.8) for n in hidden]
    zero = [np.ones(hidden[0], dtype=bool)]
    for l in range(1, len(ws)):
        prev = kept[l - 1]
        scale = np.where(prev, rng.uniform(0.6, 1.6, size=len(prev)), 0.0)
        rows = kept[l] if l < len(hidden) else np.ones(n_out, dtype=bool)   # the logits: all re-weighted
        w2[l][rows] = ws[l][rows] * scale
        # a removed neuron copies f's row: its Delta is 0 when every input it reads has Delta 0
        feeds = np.abs(ws[l][:, ~zero[l - 1]]).sum(axis=1) > 0 if (~zero[l - 1]).any() else np.zeros(len(ws[l]), bool)
        zero.append(~rows & ~feeds)

    def net(w, name):
        ops = [Linear(a, b, name=f"{name}.fc{i}") for i, (a, b) in enumerate(zip(w, bs))]
        return Network(relu_between(ops), (n_in,), 0.0, 1.0, name=name)
    return Pair(net(ws, "f"), net(w2, "g")), zero


@settings(max_examples=20, **SLOW)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(2, 10), min_size=2, max_size=3))
def test_structural_zeros_are_exact_and_the_bounds_sound(seed, hidden):
    rng = np.random.default_rng(seed)
    n_in = int(rng.integers(1, 5))
    pair, zero = completed_pair(rng, n_in, hidden, 3)
    lo, hi = random_box(rng, n_in)
    found = extremes(pair, lo, hi, 300, seed=seed)
    found_local = extremes(pair, lo, hi, 300, seed=seed, local=True)
    cd, b = crown_diff_bounds(pair, lo, hi), diff_linear_bounds(pair, lo, hi)
    z = None
    for l, (opsf, opsg) in enumerate(zip(pair.layers_f, pair.layers_g)):
        z = dl._zero_delta(dl._op_pairs(pair)[l], z)
        mask = torch.ones(len(zero[l]), dtype=torch.bool) if z is None else z
        assert mask.tolist() == zero[l].tolist(), f"layer {l}: structural zeros"
        for name, r in (("crown-diff", cd), ("diff-linear", b)):
            assert_contains(r.delta[l].lower, r.delta[l].upper, found[l], f"{name} layer {l}")
            assert (r.delta[l].lower[0][mask] == 0).all() and (r.delta[l].upper[0][mask] == 0).all()
        assert (b.delta[l].lower >= cd.delta[l].lower).all() and (b.delta[l].upper <= cd.delta[l].upper).all()
        if l > 0 and zero[l - 1].all():     # g's layer l sees f's input: local deviation = Delta (its bounds serve)
            assert (b.local[l].lower >= b.delta[l].lower).all() and (b.local[l].upper <= b.delta[l].upper).all()
        assert_contains(b.local[l].lower, b.local[l].upper, found_local[l], f"diff-linear local {l}")


def test_structural_zeros_only_remove_work():
    """Without the shortcut the same pairs get bounds at most a few ulps apart on the logits, and the
    shortcut's zero-Delta neurons are exactly 0 where the walk only got within rounding of it."""
    for seed in range(3):
        rng = np.random.default_rng(70 + seed)
        pair, zero = completed_pair(rng, 3, [12, 10, 8], 3)
        lo, hi = random_box(rng, 3)
        fast = diff_linear_bounds(pair, lo, hi)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(dl, "_zero_delta", lambda ops, z: torch.zeros(ops[-1][0].out_shape, dtype=torch.bool))
            slow = diff_linear_bounds(pair, lo, hi)
        for l in range(pair.n_layers):
            width = slow.delta[l].width[0][torch.as_tensor(zero[l])]
            assert (width <= 1e-9).all(), f"layer {l}: the walk should find Delta ~ 0 there too"
        scale = 1e-9 * (1 + slow.delta[-1].upper.abs().max())
        assert (fast.delta[-1].upper <= slow.delta[-1].upper + scale).all()
        assert (fast.delta[-1].lower >= slow.delta[-1].lower - scale).all()


def test_alpha_on_chosen_rows_only():
    """optimise_rows with a row mask bounds exactly the chosen rows (the others infinite), soundly,
    and never looser than the default relaxation; diff-linear picks the rows near the largest bound."""
    rng = np.random.default_rng(3)
    pair, _ = completed_pair(rng, 4, [12, 10, 8], 4)
    lo, hi = (torch.as_tensor(np.stack(x)) for x in zip(*[random_box(rng, 4) for _ in range(3)]))
    plain = diff_linear_bounds(pair, lo, hi, optimize=False)
    found = [extremes(pair, lo[i], hi[i], 300, seed=i, layers=[-1])[-1] for i in range(3)]
    picked = dl._rows_that_matter(plain.delta[-1])
    ub = torch.cat([plain.delta[-1].upper, -plain.delta[-1].lower], 1)
    top = ub.max(1, keepdim=True).values
    assert picked.any(1).all() and (ub[picked] >= (top - 0.2 * top.abs()).expand_as(ub)[picked]).all()
    width = plain.delta[-1].width
    assert dl._rows_that_matter(plain.delta[-1], 0.0).equal(torch.cat([width, width], 1) > 0)   # all_rows
    mask = torch.zeros_like(picked)
    mask[0, 1], mask[2, :] = True, True          # one row of region 0, none of region 1, all of region 2
    captured = {}
    real = dl.optimise_rows

    def spy(engine, top_layer, region, iterations, deadline=None, rows=None):
        captured["out"] = real(engine, top_layer, region, iterations, deadline, mask)
        return captured["out"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dl, "optimise_rows", spy)
        opt = diff_linear_bounds(pair, lo, hi)
    out = captured["out"]
    n = pair.n_classes
    rows = torch.cat([out.upper, -out.lower], 1)
    assert torch.isinf(rows[~mask]).all() and torch.isfinite(rows[mask]).all()
    for i in range(3):
        assert_contains(out.lower[i], out.upper[i], found[i], f"optimised rows, region {i}")
        assert_contains(opt.delta[-1].lower[i], opt.delta[-1].upper[i], found[i], f"diff-linear, region {i}")
    assert (opt.delta[-1].upper <= plain.delta[-1].upper).all() and (opt.delta[-1].lower >= plain.delta[-1].lower).all()
    assert out.upper.shape == (3, n)


def test_delta_search_leaves_out_rows_its_default_walk_leaves_far_above(monkeypatch):
    """The Delta slope search starts from the default-slope walk, so it skips the logit rows whose walk
    is above the current bound by more than SEARCH_GAP x the region's maximum (`_hopeless`): never
    searched, exactly those rows (gap 0: every row the walk does not tighten; gap inf: none); the
    bounds stay sound and within the every-row search's by float32 search rounding only."""
    rng = np.random.default_rng(7)
    pair, _ = completed_pair(rng, 4, [12, 10, 8], 5)
    lo, hi = (torch.as_tensor(np.stack(x)) for x in zip(*[random_box(rng, 4) for _ in range(4)]))
    found = [extremes(pair, lo[i], hi[i], 200, seed=i, layers=[-1])[-1] for i in range(4)]
    seen: dict[str, torch.Tensor] = {}
    searched: list[torch.Tensor] = []
    hopeless, search = dl._hopeless, dl.optimise_rows

    def spy_hopeless(walk, d):
        seen["walk"], seen["d"], seen["out"] = walk, d, hopeless(walk, d)
        return seen["out"]
    monkeypatch.setattr(dl, "_hopeless", spy_hopeless)
    monkeypatch.setattr(dl, "optimise_rows", lambda *a: searched.append(a[-1].clone()) or search(*a))
    runs = {}
    for gap in (0.0, dl.SEARCH_GAP, float("inf")):
        searched.clear()
        monkeypatch.setattr(dl, "SEARCH_GAP", gap)
        runs[gap] = diff_linear_bounds(pair, lo, hi).delta[-1]
        walk, d, skip = seen["walk"], seen["d"], seen["out"]
        ub_walk = torch.cat([walk.upper, -walk.lower], 1)
        ub = torch.cat([d.upper, -d.lower], 1)
        top = ub.max(1, keepdim=True).values
        assert skip.equal(ub_walk - ub > gap * top), gap
        assert not (torch.stack(searched).any(0) & skip).any() if searched else True, gap
        for i in range(4):
            assert_contains(runs[gap].lower[i], runs[gap].upper[i], found[i], f"gap {gap}, region {i}")
        if gap == 0.0:
            assert skip.any() and (~skip).any()    # the walk is above the CROWN pass's bound on some rows only
        if gap == float("inf"):
            assert not skip.any() and searched
    scale = 1e-6 * (1 + runs[float("inf")].upper.abs().max())
    assert (runs[dl.SEARCH_GAP].upper <= runs[0.0].upper + scale).all()
    assert (runs[float("inf")].upper <= runs[dl.SEARCH_GAP].upper + scale).all()


def test_dense_backward_skips_zero_rows_with_the_same_products():
    rng = np.random.default_rng(0)
    op = Linear(rng.normal(size=(30, 50)), rng.normal(size=30))
    lam = torch.as_tensor(rng.normal(size=(4, 6, 30)))
    lam[:, 2:] = 0.0                                     # padding rows
    lam[1, 0, :] = 0.0
    out = dense_backward(op, lam)
    torch.testing.assert_close(out, lam @ op.weight, rtol=1e-13, atol=0)
    assert (out[:, 2:] == 0).all() and (out[1, 0] == 0).all()


def test_linear_weight_cache_follows_the_weight():
    op = Linear(torch.tensor([[-3.0, 1.0, 0.5], [2.0, -2.0, 4.0]]))
    x = torch.ones(1, 3, dtype=torch.float64)
    assert op.abs_linear(x).tolist() == [[4.5, 8.0]] and op.linear(x).tolist() == [[-1.5, 4.0]]
    op.weight.mul_(2)                                    # in place: the version counter moves
    assert op.abs_linear(x).tolist() == [[9.0, 16.0]] and op.linear(x.float()).tolist() == [[-3.0, 8.0]]
    op.weight = torch.ones(2, 3, dtype=torch.float64)   # replaced
    assert op.abs_linear(x).tolist() == [[3.0, 3.0]]
    assert pickle.loads(pickle.dumps(op))._cache == {}
