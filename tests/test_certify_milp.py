"""Exact MILP (`certify.milp`) against exhaustive activation-pattern enumeration and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, HealthCheck, given, settings
from hypothesis import strategies as st

from pairs import random_box, random_pair, sample_deltas, sample_points
from prunecert.certify.diff_linear import diff_linear_bounds
from prunecert.certify.exhaustive import enumerate_max
from prunecert.certify.formulation import RegionBounds
from prunecert.certify.lp import lp_bounds
from prunecert.certify.milp import PairMILP, milp_bounds
from prunecert.core.regions import Box, L2Ball
from prunecert.errors import ConfigError, RegionError

FWD = 1e-12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@st.composite
def tiny_cases(draw):
    """Pairs small enough for enumeration: <= 2 inputs, two hidden layers of 2-4 neurons."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_in = draw(st.integers(1, 2))
    hidden = (draw(st.integers(2, 4)), draw(st.integers(2, 3)))
    twin = draw(st.sampled_from(["prune", "quantise", "perturb"]))
    pair = random_pair(rng, n_in, hidden, 2, twin)
    lo, hi = random_box(rng, n_in)
    k, sign = draw(st.integers(0, 1)), draw(st.sampled_from([1.0, -1.0]))
    return pair, lo, hi, k, sign


def _delta(pair, k, sign, layer=-1):
    n = int(np.prod(pair.layers_f[layer].out_shape))
    cf = np.zeros(n)
    cf[k] = sign
    return layer, cf, -cf


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_cases())
def test_milp_equals_exhaustive_enumeration(case):
    pair, lo, hi, k, sign = case
    objective = _delta(pair, k, sign)
    truth = enumerate_max(pair, lo, hi, objective)
    milp = PairMILP(pair, lo=lo, hi=hi)
    r = milp.solve(objective, time_limit=30)
    assert r.status == "optimal"
    assert abs(r.value - truth.value) <= 1e-7 * (1 + abs(truth.value))   # the MILP finds the optimum
    assert r.upper >= truth.value - 1e-9                                # its bound is never below it
    assert r.gap <= 1e-5                                                # and the margin stays small
    assert milp.unsound_events == 0


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_cases())
def test_milp_margin_objective_equals_enumeration(case):
    """g's wrong-class margin g_1 - g_0 (an attack objective) on the logits."""
    pair, lo, hi, _, _ = case
    objective = (-1, np.zeros(2), np.array([-1.0, 1.0]))
    truth = enumerate_max(pair, lo, hi, objective)
    value, x, status, gap = PairMILP(pair, lo=lo, hi=hi).maximize(objective, time_limit=30)
    assert status == "optimal" and abs(value - truth.value) <= 1e-7 * (1 + abs(truth.value))
    assert (x >= lo).all() and (x <= hi).all()
    with torch.no_grad():
        yg = pair.g.forward(torch.as_tensor(x)[None])[0]
    assert value == pytest.approx(float(yg[1] - yg[0]), abs=1e-12)   # the value is a forward pass at x
    assert gap >= 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(["prune", "quantise", "perturb"]))
@example(302, "perturb")  # HiGHS with presolve off returned a wrong "optimal" here (see certify/highs.py)
@example(369590, "perturb")  # HiGHS (presolve on, seed 0) declared 0.0580 optimal; 0.0652 is reached
def test_milp_bounds_sandwich(seed, twin):
    """sampled max <= exact value <= MILP upper <= LP upper (and the lower side likewise)."""
    rng = np.random.default_rng(seed)
    pair = random_pair(rng, 3, (8, 6), 3, twin)
    lo, hi = random_box(rng, 3)
    mb = milp_bounds(pair, lo, hi, time_limit=30)
    lp = lp_bounds(pair, lo, hi)
    s_min, s_max = sample_deltas(pair, lo, hi, 1500)[-1]
    d = mb.delta[-1]
    assert (d.upper[0] >= s_max - FWD).all() and (d.lower[0] <= s_min + FWD).all()
    assert (d.upper <= lp.delta[-1].upper).all() and (d.lower >= lp.delta[-1].lower).all()
    info = mb.info["milp"][0]
    assert info["closed"] and info["unsound_events"] == 0
    # exact: the bound is within the tolerance margin of a value reached by a real input
    assert float(mb.max_abs_logit_deviation()[0]) <= info["reached_max_abs"] + 1e-5
    for l, s in enumerate(sample_deltas(pair, lo, hi, 500, local=True)):   # other layers: sound LP bounds
        assert (mb.local[l].upper[0] >= s[1] - FWD).all() and (mb.local[l].lower[0] <= s[0] + FWD).all()


def test_milp_on_hidden_layer_is_exact():
    rng = np.random.default_rng(3)
    pair = random_pair(rng, 2, (4, 3), 2, "perturb")
    lo, hi = np.zeros(2), np.ones(2)
    mb = milp_bounds(pair, lo, hi, layers=[1], time_limit=30)
    for k in range(3):
        truth = enumerate_max(pair, lo, hi, _delta(pair, k, 1.0, layer=1))
        assert float(mb.delta[1].upper[0, k]) == pytest.approx(truth.value, abs=1e-5)
        assert float(mb.delta[1].upper[0, k]) >= truth.value - 1e-9


def test_identical_pair_needs_no_solve():
    rng = np.random.default_rng(4)
    pair = random_pair(rng, 3, (6, 5), 3, "same")
    mb = milp_bounds(pair, np.zeros(3), np.ones(3))
    assert mb.max_abs_logit_deviation().item() == 0.0
    assert mb.info["milp"][0]["solved"] == 0


def test_time_limit_still_gives_sound_bounds():
    rng = np.random.default_rng(5)
    pair = random_pair(rng, 4, (40, 30), 3, "perturb")
    lo, hi = np.zeros(4), np.ones(4)
    milp = PairMILP(pair, lo=lo, hi=hi)
    r = milp.solve(_delta(pair, 0, 1.0), time_limit=0.01)
    best = pair.deltas(sample_points(lo, hi, 3000))[-1][:, 0].max().item()
    assert r.upper >= best - FWD
    assert r.upper >= r.value


def test_region_objects_and_errors():
    rng = np.random.default_rng(6)
    pair = random_pair(rng, 2, (3, 3), 2, "prune")
    box = Box(np.full(2, 0.2), np.full(2, 0.6), np.zeros(2), np.ones(2))
    PairMILP(pair, box)  # boxes are accepted
    with pytest.raises(RegionError, match="L2"):
        PairMILP(pair, L2Ball(np.full(2, 0.5), 0.1, np.zeros(2), np.ones(2)))
    with pytest.raises(ConfigError, match="time_limit"):
        milp_bounds(pair, np.zeros(2), np.ones(2), time_limit=0)
    with pytest.raises(ConfigError, match="region or lo/hi"):
        PairMILP(pair)


def test_tolerance_margin_is_positive_and_small():
    rng = np.random.default_rng(7)
    pair = random_pair(rng, 3, (8, 6), 3, "perturb")
    milp = PairMILP(pair, lo=np.zeros(3), hi=np.ones(3))
    objective = _delta(pair, 0, 1.0)
    m = milp.tolerance_margin(objective, milp.objective_vector(objective))
    assert 0 < m < 1e-5


def _presolve_off_case():
    """The seed-302 pair on which HiGHS with presolve off reports max Delta_logit[1] < 0 as optimal
    although an input reaches 6.4e-4 (the reason presolve stays on, certify/highs.py)."""
    rng = np.random.default_rng(302)
    pair = random_pair(rng, 3, (8, 6), 3, "perturb")
    lo, hi = random_box(rng, 3)
    return pair, lo, hi


def _wrong_optimum_milp(pair, lo, hi, **kwargs) -> PairMILP:
    """The MILP of `_presolve_off_case` on which HiGHS 1.16 (presolve off, seed 0) errs. Whether it errs
    depends on the big-M constants, so they come from diff-linear's bounds *without* the LP tightening
    (which moved them when diff-linear got tighter); the first assert of each test below says so if a
    later bound engine or HiGHS no longer reproduces the solver's mistake. The constants are those of
    the first op walked in float64 (`firstop.FAST_FIRST` off): its float32 radius part moves them by
    ~1e-6 relative, which was enough for HiGHS not to err."""
    import prunecert.certify.firstop as firstop
    fast, firstop.FAST_FIRST = firstop.FAST_FIRST, False
    try:
        pre = RegionBounds.from_pair_bounds(diff_linear_bounds(pair, lo, hi), 0)
    finally:
        firstop.FAST_FIRST = fast
    milp = PairMILP(pair, pre_bounds=pre, lo=lo, hi=hi, tighten=False, **kwargs)
    milp.model.highs.setOptionValue("presolve", "off")
    return milp


def test_second_opinion_corrects_a_wrong_optimum():
    """With presolve off HiGHS's seed-0 run declares a wrong optimum; the seed-1 run does not, and the
    merged answer keeps the larger (correct) dual bound and the better point."""
    pair, lo, hi = _presolve_off_case()
    milp = _wrong_optimum_milp(pair, lo, hi)
    objective = _delta(pair, 1, 1.0)
    c = milp.objective_vector(objective)
    milp.model.set_objective(c)
    runs = [milp.model._run_milp(seed, 30) for seed in (0, 1)]
    assert runs[0].status == "optimal" and runs[0].dual_bound < 0 < runs[1].dual_bound, \
        f"the case no longer reproduces HiGHS's wrong optimum: {runs}"   # one opinion is wrong
    merged = milp.model.maximize_milp(c, 30)
    assert merged.dual_bound == max(r.dual_bound for r in runs) and merged.status == "optimal"
    r = milp.solve(objective, 30)
    assert r.upper >= r.value > 0 and r.value == pytest.approx(milp.evaluate(objective, r.x), abs=0)


def test_a_missing_opinion_is_not_called_optimal(monkeypatch):
    import prunecert.certify.highs as highs
    pair, lo, hi = _presolve_off_case()
    milp = PairMILP(pair, lo=lo, hi=hi)
    clock = iter([0.0, 0.0] + [1e9] * 10)   # deadline, first run (30 s), then no time left
    monkeypatch.setattr(highs.time, "perf_counter", lambda: next(clock))
    sol = milp.model.maximize_milp(milp.objective_vector(_delta(pair, 1, 1.0)), 30)
    assert sol.status == highs.UNCONFIRMED and sol.opinions_missing == len(highs.OPINION_SEEDS) - 1


def test_witness_refutes_a_wrong_dual_bound_and_falls_back_to_the_lp_bound(monkeypatch):
    import prunecert.certify.highs as highs
    from prunecert.adversarial.witness import milp_witness
    from prunecert.certify.milp import REFUTED
    monkeypatch.setattr(highs, "OPINION_SEEDS", (0,))   # one opinion only: the wrong one
    pair, lo, hi = _presolve_off_case()
    plain = _wrong_optimum_milp(pair, lo, hi)   # reproduce the solver's wrong "optimal"
    objective = _delta(pair, 1, 1.0)
    wrong = plain.solve(objective, 30)
    assert wrong.status == "optimal" and wrong.upper < 0   # the unsound answer without a witness
    checked = _wrong_optimum_milp(pair, lo, hi, witness=milp_witness(pair))
    r = checked.solve(objective, 30)
    lp = checked.lp_bound(checked.objective_vector(objective))
    assert r.value > wrong.upper and r.value == pytest.approx(checked.evaluate(objective, r.x), abs=0)
    assert np.all(r.x >= lo) and np.all(r.x <= hi)
    assert r.status == REFUTED and r.upper == lp and checked.unsound_events == 1


def test_milp_bounds_with_witness_reports_the_refuted_region_as_not_closed(monkeypatch):
    """A dual bound the witness beats is never reported as exact, and the bound stays sound."""
    from prunecert.adversarial.witness import milp_witness
    import prunecert.certify.highs as highs
    pair, lo, hi = _presolve_off_case()
    real = highs.HighsModel.maximize_milp

    def lying(self, c, time_limit):   # a solver whose dual bound is far too low
        sol = real(self, c, time_limit)
        sol.dual_bound -= 1.0
        return sol
    monkeypatch.setattr(highs.HighsModel, "maximize_milp", lying)
    mb = milp_bounds(pair, lo, hi, time_limit=30, max_abs_only=True, witness=milp_witness(pair))
    info = mb.info["milp"][0]
    assert not info["closed"] and info["unsound_events"] >= 1
    s_min, s_max = sample_deltas(pair, lo, hi, 1500)[-1]
    d = mb.delta[-1]
    assert (d.upper[0] >= s_max - FWD).all() and (d.lower[0] <= s_min + FWD).all()
