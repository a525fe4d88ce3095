"""alpha-CROWN on the difference network (alpha-crown-diff): sound against sampling, gradient ascent and
the exact MILP; never looser than crown-diff, neuron by neuron; diff-linear never looser than it, neuron
by neuron; the slope search really tightens, honours its deadline and handles L2 balls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, extremes, pairs_and_boxes, random_box, random_conv_pair, random_pair, sample_deltas

import prunecert.certify.adam as adam
import prunecert.certify.alpha_diff as alpha_diff
import prunecert.certify.diff_linear as dl
from prunecert.certify import Box, certify, get_method
from prunecert.certify.adam import unit_rows
from prunecert.certify.backsub import Engine
from prunecert.certify.diff_linear import alpha_crown_diff_bounds, crown_diff_bounds, diff_linear_bounds
from prunecert.certify.result import load_schema
from prunecert.errors import ConfigError

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _not_looser(inner, outer, what: str, slack: float = 0.0) -> None:
    """`inner` within `outer`, up to `slack` (relative to the bound's size, for bounds that two runs
    may round differently in their last bits)."""
    lo_slack = slack * (1 + outer.lower.abs())
    up_slack = slack * (1 + outer.upper.abs())
    assert (inner.lower >= outer.lower - lo_slack).all(), f"{what}: lower bound looser by {(outer.lower - inner.lower).max()}"
    assert (inner.upper <= outer.upper + up_slack).all(), f"{what}: upper bound looser by {(inner.upper - outer.upper).max()}"


def _check(pair, lo, hi, e2e, what: str) -> None:
    """alpha-crown-diff contains `e2e` on every layer, is within crown-diff everywhere (equal on hidden
    layers: only the logit rows are optimised), and diff-linear is within it on every layer (with and
    without `all_rows`, which only widens diff-linear's own Delta optimisation)."""
    cd, acd = crown_diff_bounds(pair, lo, hi), alpha_crown_diff_bounds(pair, lo, hi)
    every, b = diff_linear_bounds(pair, lo, hi, all_rows=True), diff_linear_bounds(pair, lo, hi)
    assert acd.info["optimized"] and acd.info["truncated"] == [False] * len(acd.info["truncated"])
    for l in range(pair.n_layers):
        assert_contains(acd.delta[l].lower, acd.delta[l].upper, e2e[l], f"{what}: alpha-crown-diff layer {l}")
        _not_looser(acd.delta[l], cd.delta[l], f"{what}: alpha-crown-diff vs crown-diff, layer {l}")
        _not_looser(every.delta[l], acd.delta[l], f"{what}: diff-linear (all rows) vs alpha-crown-diff, layer {l}")
        _not_looser(b.delta[l], acd.delta[l], f"{what}: diff-linear vs alpha-crown-diff, layer {l}")


def test_registered_and_in_the_schema():
    assert get_method("alpha-crown-diff").bounds is alpha_crown_diff_bounds
    assert "alpha-crown-diff" in load_schema()["properties"]["method"]["enum"]


@settings(max_examples=25, **SLOW)
@given(pairs_and_boxes())
def test_dense_pairs(case):
    pair, lo, hi = case
    _check(pair, lo, hi, sample_deltas(pair, lo, hi, 400), "dense")


@settings(max_examples=8, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["perturb", "prune", "quantise"]),
       st.sampled_from([(1, 6, 6), (3, 8, 8), (2, 12, 14)]))
def test_conv_pairs(seed, twin, in_shape):
    """Conv pairs: sound against sampling and gradient ascent of the logits' Delta."""
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin=twin, in_shape=in_shape)
    lo, hi = random_box(rng, in_shape)
    _check(pair, lo, hi, extremes(pair, lo, hi, 300, layers=[-1], seed=seed), "conv")


def test_against_milp():
    """The exact MILP extremes of the logits' Delta lie within alpha-crown-diff's bounds."""
    milp = pytest.importorskip("prunecert.certify.milp", reason="prunecert.certify.milp not available")
    rng = np.random.default_rng(34)
    for twin in ("prune", "quantise", "perturb", "prune"):
        pair = random_pair(rng, 3, (6, 5), 2, twin=twin)
        lo, hi = random_box(rng, 3)
        exact = milp.milp_bounds(pair, lo, hi, local=False).delta[-1]
        acd = alpha_crown_diff_bounds(pair, lo, hi).delta[-1]
        gap = 1e-6 * (1 + exact.upper.abs() + exact.lower.abs())
        assert (acd.upper >= exact.upper - gap).all() and (acd.lower <= exact.lower + gap).all()


def test_slope_search_tightens_crown_diff():
    """On random dense pairs with unstable neurons the optimised slopes beat CROWN's default ones (the
    search is not a no-op), and 0 iterations give crown-diff's bounds."""
    rng = np.random.default_rng(0)
    gained = 0.0
    for _ in range(5):
        pair = random_pair(rng, 4, (12, 10), 3, twin="prune")
        lo, hi = random_box(rng, 4)
        cd = crown_diff_bounds(pair, lo, hi).delta[-1]
        gained += float(cd.width.sum() - alpha_crown_diff_bounds(pair, lo, hi).delta[-1].width.sum())
        plain = alpha_crown_diff_bounds(pair, lo, hi, iterations=0)
        assert not plain.info["optimized"]
        assert torch.equal(plain.delta[-1].lower, cd.lower) and torch.equal(plain.delta[-1].upper, cd.upper)
    assert gained > 0.1


def test_deadline_ends_the_search_soundly(monkeypatch):
    """A deadline already past when the slope search starts: no step, the result says it was
    truncated, and it is still sound and within crown-diff; a deadline with room for two steps gives
    finite bounds on the chosen rows."""
    rng = np.random.default_rng(3)
    pair = random_pair(rng, 4, (12, 10), 3, twin="prune")
    lo, hi = random_box(rng, 4, 0.2, 0.8)
    search = dl.optimise_diff_rows
    monkeypatch.setattr(dl, "optimise_diff_rows", lambda *a, **k: search(*a[:-1], 0.0, **k))
    cut = alpha_crown_diff_bounds(pair, lo, hi)
    assert cut.info["truncated"] == [True]
    e2e = sample_deltas(pair, lo, hi, 400)
    assert_contains(cut.delta[-1].lower, cut.delta[-1].upper, e2e[-1], "cut search")
    _not_looser(cut.delta[-1], crown_diff_bounds(pair, lo, hi).delta[-1], "cut search vs crown-diff")
    # a clock that ticks 1 s per reading and a deadline at 5 s: two steps fit, the third would not
    clock = iter(range(1, 1000))
    monkeypatch.setattr(adam, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: float(next(clock)))}))
    seen = []
    monkeypatch.setattr(dl, "optimise_diff_rows",
                        lambda *a, **k: seen.append((search(*a[:-1], 5.0, **k), k["rows"])) or seen[-1][0])
    two = alpha_crown_diff_bounds(pair, lo, hi)
    ((bounds, cut), rows), = seen    # the deadline ends the rounds of row selection too
    chosen = torch.cat([bounds.upper, -bounds.lower], 1)
    assert cut and two.info["truncated"] == [True] and rows.any()
    assert bool(torch.isfinite(chosen[rows]).all()) and bool(torch.isinf(chosen[~rows]).all())
    assert_contains(two.delta[-1].lower, two.delta[-1].upper, e2e[-1], "two steps")
    with pytest.raises(ConfigError, match="iterations"):
        alpha_crown_diff_bounds(pair, lo, hi, iterations=-1)
    with pytest.raises(ConfigError, match="time_limit"):
        alpha_crown_diff_bounds(pair, lo, hi, time_limit=0)


def test_l2_ball_and_batches():
    """Two regions at once, one of them an L2 ball: sound on points of the ball, within crown-diff."""
    rng = np.random.default_rng(8)
    n_in = 5
    pair = random_pair(rng, n_in, (10, 8), 3, twin="perturb")
    centre, radius = rng.uniform(0.3, 0.7, size=(2, n_in)), 0.2
    lo, hi = np.clip(centre - radius, 0, 1), np.clip(centre + radius, 0, 1)
    l2 = (torch.from_numpy(centre), torch.tensor([radius, 10.0], dtype=torch.float64))   # 10: the box binds
    acd = alpha_crown_diff_bounds(pair, lo, hi, l2=l2)
    _not_looser(acd.delta[-1], crown_diff_bounds(pair, lo, hi, l2=l2).delta[-1], "l2 vs crown-diff")
    d = rng.normal(size=(3000, n_in))
    d *= radius * rng.uniform(0, 1, size=(3000, 1)) ** (1 / n_in) / np.linalg.norm(d, axis=1, keepdims=True)
    x = torch.from_numpy(np.clip(centre[0] + d, 0, 1))
    ds = pair.deltas(x)[-1]
    assert_contains(acd.delta[-1].lower[0], acd.delta[-1].upper[0], (ds.min(0).values, ds.max(0).values), "l2 ball")
    box = sample_deltas(pair, lo[1], hi[1], 400)[-1]
    assert_contains(acd.delta[-1].lower[1], acd.delta[-1].upper[1], box, "box region")


def test_through_certify_with_options_and_time_limit():
    """certify() forwards `iterations` and `time_limit`; a cut run is flagged in the schema-valid JSON."""
    jsonschema = pytest.importorskip("jsonschema")
    rng = np.random.default_rng(17)
    pair = random_conv_pair(rng, twin="prune", in_shape=(2, 8, 8))
    lo, hi = random_box(rng, (2, 8, 8), 0.2, 0.6)
    boxes = [Box(lo, hi), Box(np.clip(lo - 0.1, 0, 1), hi)]
    full = certify(pair, None, boxes, method="alpha-crown-diff", iterations=5, progress=False, samples=16)
    cut = certify(pair, None, boxes, method="alpha-crown-diff", time_limit=1e-9, progress=False, samples=16,
                  batch_size=1)
    for res, truncated in ((full, []), (cut, [0, 1])):
        doc = res.to_json()
        jsonschema.validate(doc, load_schema())
        assert doc["method"] == "alpha-crown-diff" and doc["truncated_regions"] == truncated
    assert (cut.max_abs_logit_deviation >= full.max_abs_logit_deviation).all()
    with pytest.raises(ConfigError, match="itertions"):
        certify(pair, None, boxes, method="alpha-crown-diff", itertions=5, progress=False)


def _spy_rows(monkeypatch) -> list[torch.Tensor]:
    """Record the row masks every f - g slope search is given."""
    seen: list[torch.Tensor] = []
    search = dl.optimise_diff_rows
    monkeypatch.setattr(dl, "optimise_diff_rows", lambda *a, **k: seen.append(k["rows"].clone()) or search(*a, **k))
    return seen


def _row_bounds(b) -> torch.Tensor:
    """(B, 2n) upper bounds of the rows +e_k, -e_k (row k: Delta_k's upper bound, n + k: minus its lower)."""
    return torch.cat([b.upper.flatten(1), -b.lower.flatten(1)], 1)


def test_only_the_rows_that_can_carry_the_maximum_are_optimised(monkeypatch):
    """alpha-crown-diff optimises the rows near each region's largest |Delta_k| bound, in rounds, so
    every row left out ends below OPTIMISE_SHARE x the reported maximum; the one that carries
    crown-diff's maximum is in the first round. diff-linear's pass chooses the same rows (with
    `all_rows`, every row after those); the reported maximum is sound and never above crown-diff's."""
    rng = np.random.default_rng(11)
    left_out = 0
    for twin in ("prune", "perturb", "quantise"):
        pair = random_pair(rng, 5, (16, 12), 6, twin=twin)
        boxes = [random_box(rng, 5, 0.2, 0.8) for _ in range(4)]
        lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
        seen = _spy_rows(monkeypatch)
        acd = alpha_crown_diff_bounds(pair, lo, hi)
        chosen = torch.stack(seen).any(0)
        ub, width = _row_bounds(acd.delta[-1]), acd.delta[-1].width.flatten(1).repeat(1, 2)
        top = ub.max(1, keepdim=True).values
        out = ~chosen & (width > 0)
        assert (ub[out] < (dl.OPTIMISE_SHARE * top).expand_as(ub)[out]).all(), twin
        cd = _row_bounds(crown_diff_bounds(pair, lo, hi).delta[-1])
        assert seen[0][torch.arange(len(lo)), cd.argmax(1)].all(), twin
        assert (top[:, 0] <= cd.max(1).values).all()
        left_out += int(out.sum())
        first = len(seen)
        diff_linear_bounds(pair, lo, hi)
        assert all(torch.equal(a, b) for a, b in zip(seen[:first], seen[first:2 * first])), twin
        seen.clear()
        diff_linear_bounds(pair, lo, hi, all_rows=True)
        assert all(torch.equal(a, b) for a, b in zip(seen[:first], seen)), twin
        assert torch.stack(seen).any(0).equal(width > 0), twin
    assert left_out > 0   # the rule does leave rows out (the work shrinks)


def test_batch_composition_moves_bounds_only_by_search_rounding():
    """Each (region, row) is searched as its own one-row region that stops on its own, so a region's
    bounds do not depend on which regions share its batch beyond float32 rounding of the search."""
    rng = np.random.default_rng(5)
    pair = random_pair(rng, 4, (14, 10), 4, twin="prune")
    boxes = [random_box(rng, 4, 0.1, 0.9) for _ in range(4)]
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    batched = alpha_crown_diff_bounds(pair, lo, hi).max_abs_logit_deviation()
    single = torch.cat([alpha_crown_diff_bounds(pair, l, h).max_abs_logit_deviation() for l, h in boxes])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-9)


def _search_args(monkeypatch, pair, lo, hi) -> tuple:
    """The engines, top layer and regions the f - g slope search of alpha-crown-diff is given."""
    seen: list[tuple] = []
    search = dl.optimise_diff_rows
    monkeypatch.setattr(dl, "optimise_diff_rows", lambda *a, **k: seen.append(a) or search(*a, **k))
    alpha_crown_diff_bounds(pair, lo, hi)
    return seen[0][:4]


@pytest.mark.parametrize("kind", ["prune", "perturb", "conv-prune", "conv-perturb"])
def test_hand_written_search_gradient_equals_autograd(monkeypatch, kind):
    """The f - g search's objective with its gradient written out (`alpha_diff._hand_upper`) gives the
    very floats of the autograd objective (`_search_upper`) and the same gradient (float32 rounding
    apart), at CROWN's slopes and at random ones, with layer 0's forms merged (prune twins) or not."""
    rng = np.random.default_rng(5)
    twin = kind.split("-")[-1]
    if kind.startswith("conv"):
        pair, shape = random_conv_pair(rng, twin=twin, in_shape=(2, 8, 8)), (2, 8, 8)
    else:
        pair, shape = random_pair(rng, 4, (12, 10), 3, twin=twin), 4
    lo, hi = random_box(rng, shape, 0.2, 0.8)
    engine_f, engine_g, top, region = _search_args(monkeypatch, pair, lo, hi)
    assert all(c.dop is None for c in engine_f.ctx[0]) == (twin == "prune")
    n = math.prod(engine_f.ctx[top][-1].op.out_shape)
    row = torch.arange(2 * n).repeat(region.batch)[: 2 * n * region.batch]
    idx = torch.arange(region.batch).repeat_interleave(2 * n)
    ef, eg = engine_f.select(idx), engine_g.select(idx)
    sf, sg = (Engine(e.ctx, [s.to(torch.float32) for s in e.side], exact=False) for e in (ef, eg))
    rows = unit_rows(row, engine_f.ctx[top][-1].op.out_shape).to(torch.float32)
    reg = region.select(idx).to(torch.float32)
    auto = alpha_diff._search_upper(sf, sg, top, rows, reg)
    hand = alpha_diff._hand_upper(sf, sg, top, rows, reg)
    cuts = alpha_diff._offsets(ef, top)
    start = torch.cat([t.detach().flatten(1) for t in alpha_diff._slopes(ef, top) + alpha_diff._slopes(eg, top)], 1)
    free = torch.cat([s.unstable.flatten(1) for s in ef.side[:top] + eg.side[:top]], 1)
    for flat in (start, torch.where(free, torch.rand(start.shape, generator=torch.Generator().manual_seed(1)), start)):
        leaf = flat.unsqueeze(1)
        leaves = [t.clone().requires_grad_(True) for t in alpha_diff._split(leaf, ef, top, cuts)]
        ub = auto(leaves)
        want = torch.cat([g.flatten(1) for g in torch.autograd.grad(ub.sum(), leaves)], 1)
        with torch.no_grad():
            got, grads = hand([leaf])
            got_grad = grads()[0][:, 0]
        assert torch.equal(got, ub.detach())
        scale = want.abs().amax(1, keepdim=True) + 1e-6
        assert ((got_grad - want).abs() <= 1e-4 * scale).all()
        assert bool((want != 0).any())   # the rows do depend on free slopes
