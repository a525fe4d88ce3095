"""Branch-and-bound refinement (`certify.bab`): sound at every stop, exact within rel_gap when done."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, HealthCheck, given, settings
from hypothesis import strategies as st

from pairs import _mlp, _twin_weights, random_box, random_mlp_weights, random_pair, sample_deltas
from prunecert.core.pair import Pair
from prunecert.certify import certify
from prunecert.certify.bab import bab_bounds
from prunecert.certify.lp import lp_bounds
from prunecert.certify.milp import milp_bounds
from prunecert.core.regions import Box, L2Ball
from prunecert.errors import ConfigError

FWD = 1e-12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _max_abs_sampled(pair, lo, hi, n=2000) -> float:
    s_min, s_max = sample_deltas(pair, lo, hi, n)[-1]
    return float(max(s_max.max(), -s_min.min()))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(["prune", "quantise", "perturb"]), st.sampled_from(["input", "relu"]))
@example(46, "quantise", "input")  # input splits used to stop at the gap a little above the LP bound
@example(2048, "prune", "input")    # g's logits equal f's on the box: milp reported reached -inf
def test_bab_upper_dominates_exact_and_closes_the_gap(seed, twin, branching):
    rng = np.random.default_rng(seed)
    pair = random_pair(rng, 3, (8, 6), 3, twin)
    lo, hi = random_box(rng, 3)
    rel_gap = 1e-2
    bb = bab_bounds(pair, lo, hi, time_limit=4, rel_gap=rel_gap, branching=branching)
    exact = milp_bounds(pair, lo, hi, time_limit=30)
    info, m_info = bb.info["bab"][0], exact.info["milp"][0]
    upper = float(bb.max_abs_logit_deviation()[0])
    sampled = _max_abs_sampled(pair, lo, hi)
    assert upper >= m_info["reached_max_abs"] - FWD >= sampled - 2 * FWD     # bab >= exact >= sampled
    assert info["reached"] <= float(exact.max_abs_logit_deviation()[0])     # its lower bound is reached
    s_min, s_max = sample_deltas(pair, lo, hi, 1500)[-1]
    assert (bb.delta[-1].upper[0] >= s_max - FWD).all() and (bb.delta[-1].lower[0] <= s_min + FWD).all()
    assert upper <= float(lp_bounds(pair, lo, hi).max_abs_logit_deviation()[0])  # never looser than LP
    if info["finished"]:
        assert upper <= info["reached"] * (1 + rel_gap) + 1e-9


def test_bab_refines_a_loose_lp_bound():
    """A perturbed twin over the whole domain: the LP bound is loose, BaB brings it to the optimum."""
    rng = np.random.default_rng(13)
    pair = random_pair(rng, 3, (12, 10), 3, "perturb")
    lo, hi = np.zeros(3), np.ones(3)
    lp = float(lp_bounds(pair, lo, hi).max_abs_logit_deviation()[0])
    exact = milp_bounds(pair, lo, hi, time_limit=60).info["milp"][0]["reached_max_abs"]
    bb = bab_bounds(pair, lo, hi, time_limit=30, rel_gap=0.01, branching="input")
    upper = float(bb.max_abs_logit_deviation()[0])
    assert lp > 1.05 * exact                     # a case with something to refine
    assert bb.info["bab"][0]["finished"]
    assert bb.info["bab"][0]["nodes"] > 1
    assert exact - FWD <= upper <= 1.05 * exact


def test_tolerance_stops_the_search_both_ways():
    rng = np.random.default_rng(14)
    pair = random_pair(rng, 3, (10, 8), 3, "perturb")
    lo, hi = np.zeros(3), np.ones(3)
    sampled = _max_abs_sampled(pair, lo, hi)
    for branching in ("input", "relu"):
        proved = bab_bounds(pair, lo, hi, tolerance=10 * sampled, time_limit=20, rel_gap=0.0, branching=branching)
        assert float(proved.max_abs_logit_deviation()[0]) <= 10 * sampled
        assert proved.info["bab"][0]["stop"] == "certified"   # stopped by the tolerance, not the budget
        refuted = bab_bounds(pair, lo, hi, tolerance=0.5 * sampled, time_limit=20, rel_gap=0.0, branching=branching)
        assert refuted.info["bab"][0]["reached"] > 0.5 * sampled
        assert refuted.info["bab"][0]["stop"] == "violated"
        assert float(refuted.max_abs_logit_deviation()[0]) >= sampled - FWD


def test_input_splits_certify_the_chosen_logits_despite_a_large_other_one():
    """Logit 2 of g is f's + 100 (|Delta_2| = 100 everywhere); with logits=[0, 1] the input splits
    used to count the closed leaves' bound on Delta_2 too, so the tolerance on logits 0, 1 was never
    met: the search ran to its budget (1603 nodes, stop "time") with its final bound below it."""
    rng = np.random.default_rng(14)
    ws, bs = random_mlp_weights(rng, 3, (10, 8), 3)
    w2, b2 = _twin_weights(rng, ws, bs, "perturb")
    b2[-1] = np.asarray(b2[-1], dtype=np.float64) + np.array([0.0, 0.0, 100.0])
    pair = Pair(_mlp(ws, bs, "f"), _mlp(w2, b2, "g"))
    lo, hi = np.zeros(3), np.ones(3)
    s_min, s_max = sample_deltas(pair, lo, hi, 2000)[-1]
    sampled = float(max(s_max[:2].max(), -s_min[:2].min()))
    bb = bab_bounds(pair, lo, hi, tolerance=1.5 * sampled, time_limit=20, rel_gap=0.0, branching="input",
                    logits=[0, 1])
    info = bb.info["bab"][0]
    assert info["stop"] == "certified"
    assert sampled - FWD <= info["upper"] <= 1.5 * sampled
    assert float(bb.delta[-1].lower[0, 2]) <= -100.0 + 1e-6    # the other logit's bound stays sound


@pytest.mark.parametrize("branching", ["input", "relu"])
def test_tiny_budget_is_still_sound(branching):
    rng = np.random.default_rng(15)
    pair = random_pair(rng, 4, (20, 16), 3, "perturb")
    lo, hi = np.zeros(4), np.ones(4)
    bb = bab_bounds(pair, lo, hi, time_limit=0.05, branching=branching)
    s_min, s_max = sample_deltas(pair, lo, hi, 3000)[-1]
    assert (bb.delta[-1].upper[0] >= s_max - FWD).all() and (bb.delta[-1].lower[0] <= s_min + FWD).all()


def test_bad_options_are_refused():
    rng = np.random.default_rng(16)
    pair = random_pair(rng, 2, (3, 3), 2, "prune")
    with pytest.raises(ConfigError, match="time budget"):
        bab_bounds(pair, np.zeros(2), np.ones(2), time_limit=0)
    with pytest.raises(ConfigError, match="rel_gap"):
        bab_bounds(pair, np.zeros(2), np.ones(2), rel_gap=-1)
    with pytest.raises(ConfigError, match="branching"):
        bab_bounds(pair, np.zeros(2), np.ones(2), branching="sideways")


@pytest.mark.parametrize("method", ["lp", "milp", "bab"])
def test_certify_dispatches_to_the_method(method):
    rng = np.random.default_rng(17)
    pair = random_pair(rng, 3, (6, 5), 3, "prune")
    box = Box(np.full(3, 0.3), np.full(3, 0.5), np.zeros(3), np.ones(3))
    res = certify(pair, None, [box], method=method, tolerance=10.0, time_limit=10, progress=False)
    assert res.method == method and res.verdict == "certified"
    assert res.max_abs_logit_deviation[0] >= res.sampled_max_abs_logit_deviation[0]


def test_bab_on_an_l2_ball_reports_only_points_of_the_ball():
    """bab bounds and attacks an L2 ball's bounding box (sound for the bound); the point it reaches
    counts only when it lies in the ball (it used to be reported, with its larger value, from a corner)."""
    pair = random_pair(np.random.default_rng(0), 3, (6, 5), 3, twin="perturb")
    ball = L2Ball(np.full(3, 0.5), 0.4, 0.0, 1.0)
    r = certify(pair, None, [ball], method="bab", time_limit=2, tolerance=0.1, progress=False, samples=16)
    assert ball.contains(r.sampled_points[0])
    assert r.sampled_max_abs_logit_deviation[0] <= r.max_abs_logit_deviation[0]
    if r.verdicts[0] == "violated":
        assert ball.contains(np.asarray(r.to_json()["regions"][0]["counterexample"]))
