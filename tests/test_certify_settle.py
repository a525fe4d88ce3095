"""Complete verdicts for class properties (`certify.settle`): checked against exhaustive enumeration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pairs import random_pair
from wallclock import DECIDE_SECONDS

from prunecert.certify.classprop import ClassProperty, open_classes, violations
from prunecert.certify.exhaustive import enumerate_max
from prunecert.certify.lp import initial_bounds
from prunecert.certify.milp import PairMILP
from prunecert.certify.settle import settle
from prunecert.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
AMBIGUOUS = 1e-6   # ground truths this close to 0 are ties: either verdict is right


def truth(pair, lo, hi, prop: ClassProperty) -> float:
    """max over classes c, j of g_j - g_c on {x in box: f_c - f_k >= m for all k != c}: > 0 iff refuted."""
    n = pair.n_classes
    best = -np.inf
    for c in range(n):
        side = []
        for k in range(n):
            if k != c:
                sf = np.zeros(n)
                sf[c], sf[k] = 1.0, -1.0
                side.append((sf, np.zeros(n), prop.margin))
        for j in range(n):
            if j != c:
                cg = np.zeros(n)
                cg[j], cg[c] = 1.0, -1.0
                best = max(best, enumerate_max(pair, lo, hi, (-1, np.zeros(n), cg), side=side).value)
    return best


def near_boundary_box(pair, rng, radius: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """A box of `radius` around the sampled point where f's top-2 logit gap is closest to `margin`:
    close to f's decision (or confidence) boundary, where bounds alone rarely decide."""
    x = torch.as_tensor(rng.uniform(0, 1, (512, pair.f.n_inputs)))
    with torch.no_grad():
        top2 = pair.f.forward(x).reshape(len(x), -1).topk(2, dim=1).values
    centre = x[int(((top2[:, 0] - top2[:, 1]) - margin).abs().argmin())].numpy()
    return np.clip(centre - radius, 0, 1), np.clip(centre + radius, 0, 1)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(["prune", "quantise", "perturb"]),
       st.sampled_from(["agreement", "delta"]), st.sampled_from(["input", "relu"]),
       st.sampled_from([0.05, 0.1, 0.2]))
@example(23, "perturb", "agreement", "input", 0.2)   # refuted by input splitting (truth 1.2e-3)
@example(23, "perturb", "agreement", "relu", 0.2)    # refuted at an LP leaf
@example(1, "quantise", "agreement", "relu", 0.1)
def test_settle_matches_exhaustive_enumeration(seed, twin, which, branching, radius):
    rng = np.random.default_rng(seed)
    pair = random_pair(rng, 3, (6, 5), 3, twin)
    prop = ClassProperty.agreement() if which == "agreement" else ClassProperty.delta_top1(0.6)
    lo, hi = near_boundary_box(pair, rng, radius, prop.margin + 0.05)
    t = truth(pair, lo, hi, prop)
    # a decidable case gets room to decide whatever the machine's load (5 s ran out at load 6-8); a
    # tie (|t| <= AMBIGUOUS) may never close, so it keeps a short budget
    budget = DECIDE_SECONDS if abs(t) > AMBIGUOUS else 5.0
    s = settle(pair, lo, hi, prop, budget, branching=branching, samples=0)   # the BaB itself must refute
    if s.verdict == "proved":
        assert t <= AMBIGUOUS, f"proved, but g prefers another class by {t} where f is confident"
    elif s.verdict == "refuted":
        assert t > 0
        x = torch.as_tensor(s.point).reshape(1, *pair.input_shape)
        assert bool(violations(pair, x, prop)[0]) and s.class_f != s.class_g
        assert np.all(s.point.reshape(-1) >= lo - 1e-12) and np.all(s.point.reshape(-1) <= hi + 1e-12)
    if abs(t) > AMBIGUOUS:   # tiny nets: complete
        assert s.verdict == ("refuted" if t > 0 else "proved"), (s, t)


@pytest.fixture(scope="module")
def agreeing_across_the_boundary():
    """A box across f's decision boundary where g agrees (enumeration: max g_j - g_c = -0.0085 < 0)."""
    rng = np.random.default_rng(209)
    pair = random_pair(rng, 3, (6, 5), 3, "perturb")
    lo, hi = near_boundary_box(pair, rng, 0.3, 0.02)
    return pair, lo, hi, truth(pair, lo, hi, ClassProperty.agreement())


@pytest.mark.parametrize("branching", ["input", "relu"])
def test_branch_and_bound_proves_what_the_bounds_leave_open(agreeing_across_the_boundary, branching):
    pair, lo, hi, t = agreeing_across_the_boundary
    s = settle(pair, lo, hi, ClassProperty.agreement(), DECIDE_SECONDS, branching=branching, samples=0)
    assert t < 0
    assert (s.verdict, s.stage) == ("proved", f"{branching}-bab") and s.details["nodes"] > 1


def milp_truth(pair, lo, hi, prop: ClassProperty) -> tuple[float, float]:
    """(best value reached, sound upper bound) of max g_j - g_c under f's side rows, by the exact MILP."""
    milp = PairMILP(pair, None, lo=lo, hi=hi)
    enc, last, n = milp.enc, pair.n_layers - 1, pair.n_classes
    reached, upper = -np.inf, -np.inf
    for c in range(n):
        rows = [milp.model.add_side_row(np.array([enc.af[last][c], enc.af[last][k]]), np.array([1.0, -1.0]),
                                        prop.margin, np.inf) for k in range(n) if k != c]
        for j in range(n):
            if j != c:
                cg = np.zeros(n)
                cg[j], cg[c] = 1.0, -1.0
                r = milp.solve((last, np.zeros(n), cg), time_limit=30)
                if r.status != "infeasible":
                    reached, upper = max(reached, r.value), max(upper, r.upper)
        for row in rows:
            milp.model.set_row_bounds(row, -np.inf, np.inf)
    return reached, upper


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(["prune", "quantise", "perturb"]),
       st.sampled_from(["agreement", "delta"]), st.sampled_from(["input", "relu"]))
@example(19, "quantise", "agreement", "relu")  # the LP optimum sat on f's boundary: nudged inside, refuted
@example(11, "perturb", "agreement", "relu")   # proved by ReLU branch and bound
def test_settle_agrees_with_the_exact_milp(seed, twin, which, branching):
    """Larger pairs than enumeration can take (4 inputs, 12-10 hidden): the MILP with the same side rows."""
    rng = np.random.default_rng(seed)
    pair = random_pair(rng, 4, (12, 10), 3, twin)
    prop = ClassProperty.agreement() if which == "agreement" else ClassProperty.delta_top1(0.6)
    lo, hi = near_boundary_box(pair, rng, 0.15, prop.margin + 0.05)
    s = settle(pair, lo, hi, prop, 5.0, branching=branching, samples=0)
    reached, upper = milp_truth(pair, lo, hi, prop)
    if s.verdict == "proved":
        assert reached <= AMBIGUOUS
    elif s.verdict == "refuted":
        assert upper > 0
    if reached > AMBIGUOUS or upper < -AMBIGUOUS:   # decided by the MILP: settle decides it too
        assert s.verdict == ("refuted" if reached > AMBIGUOUS else "proved"), (s, reached, upper)


def test_a_larger_delta_is_easier():
    """P(m) for a larger margin m asks less: every class open at delta 0.99 is open at delta 0.6."""
    rng = np.random.default_rng(4)
    pair = random_pair(rng, 3, (8, 6), 3, "perturb")
    b = initial_bounds(pair, torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    loose, strict = (open_classes(b, ClassProperty.delta_top1(d)) for d in (0.99, 0.6))
    assert bool((loose <= strict).all())


def test_time_limit_gives_unknown_with_what_is_left():
    rng = np.random.default_rng(5)
    pair = random_pair(rng, 3, (12, 10), 4, "perturb")
    s = settle(pair, np.zeros(3), np.ones(3), ClassProperty.agreement(), 1e-3, branching="input")
    assert s.verdict in ("unknown", "proved", "refuted")
    if s.verdict == "unknown":
        assert s.stage == "time" and s.details["open"] >= 1


def test_an_injected_search_refutes_first():
    rng = np.random.default_rng(1)
    pair = random_pair(rng, 3, (6, 5), 3, "quantise")
    lo, hi = near_boundary_box(pair, rng, 0.1, 0.05)
    prop = ClassProperty.agreement()
    point = settle(pair, lo, hi, prop, DECIDE_SECONDS, branching="input").point
    assert point is not None
    calls = []

    def search(a, b, p, seconds):
        calls.append(seconds)
        return point

    s = settle(pair, lo, hi, prop, 10.0, search=search, samples=0)
    assert calls and s.stage == "search" and np.array_equal(s.point, point)
    # a point outside the box is clipped into it before it is replayed
    s = settle(pair, lo, hi, prop, 10.0, search=lambda *a: np.full(3, 7.0), samples=0)
    assert s.verdict == "refuted" and np.all(s.point >= lo) and np.all(s.point <= hi)


def test_bad_delta_is_refused():
    for d in (0.3, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="delta"):
            ClassProperty.delta_top1(d)
