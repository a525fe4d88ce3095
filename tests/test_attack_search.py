"""Attack methods: points stay in the region, values are float64 re-evaluations, runs are seeded,
LP walks end at local maxima, and a planted disagreement is found."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import pairs_and_boxes, random_conv_pair, random_pair

from prunecert.adversarial import attack, attack_many, evaluate, parse_objective
from prunecert.adversarial.lpwalk import PairLP, walk
from prunecert.core.pair import Pair
from prunecert.core.regions import Box, Domain, L2Ball
from prunecert.errors import ConfigError, PairingError, RegionError
from prunecert.network import mlp

FAST = dict(budget_seconds=30.0, progress=False)
GRADIENT = ("random", "pgd", "apgd")
ALL = GRADIENT + ("lp-walk", "auto")
OBJECTIVES = ("max-logit-deviation", "disagreement", "layer:0:neuron:1:min", "layer:1:neuron:0")


def _check_result(pair, region, res, objective):
    """x inside the region exactly, and every reported number equals a fresh float64 forward pass."""
    assert region.contains(res.x), f"{res.method}: x left the region"
    obj = parse_objective(objective).resolve(pair, region.center)
    assert res.objective == objective and res.label == obj.label
    ev = evaluate(pair, obj, res.x[None])
    assert res.value == float(ev.values[0])
    assert (res.class_f, res.class_g) == (int(ev.class_f[0]), int(ev.class_g[0]))
    assert res.logit_deviation == float(ev.logit_deviation[0])
    assert res.trace and all(b >= a for a, b in zip(res.trace, res.trace[1:])), "trace must be best-so-far"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pairs_and_boxes(max_in=3, max_hidden=8), objective=st.sampled_from(OBJECTIVES),
       method=st.sampled_from(ALL))
def test_points_in_box_and_values_reevaluated(case, objective, method):
    pair, lo, hi = case
    region = Box(lo, hi, np.zeros_like(lo), np.ones_like(hi))
    if not (hi > lo).any():
        return
    res = attack(pair, None, region, objective, method, restarts=2, iterations=20, seed=1, **FAST)
    _check_result(pair, region, res, objective)


@pytest.mark.parametrize("method", GRADIENT + ("auto",))
def test_l2_ball_points_inside_ball_and_domain(method):
    pair = random_pair(np.random.default_rng(5), 5, (8, 6), 3, twin="prune")
    centre = np.array([0.02, 0.5, 0.97, 0.3, 0.0])  # near the domain's faces: the clip matters
    region = L2Ball(centre, 0.3, np.zeros(5), np.ones(5))
    res = attack(pair, None, region, "max-logit-deviation", method, restarts=3, iterations=30, **FAST)
    _check_result(pair, region, res, "max-logit-deviation")
    assert np.linalg.norm(res.x - centre) <= 0.3


@pytest.mark.parametrize("method", ["random", "pgd", "apgd", "auto"])
def test_evasive_objective_with_gradient_methods(method):
    """DIVA's objective: the ascent finds points where f keeps its class and g loses confidence in it."""
    pair = random_pair(np.random.default_rng(6), 6, (12, 8), 4, twin="quantise")
    region = Box.around(np.full(6, 0.5), 0.3, np.zeros(6), np.ones(6))
    res = attack(pair, None, region, "evasive:1.5", method, restarts=3, iterations=40, **FAST)
    _check_result(pair, region, res, "evasive:1.5")
    assert -1.5 < res.value < 1.0 and res.sub_objective.startswith("p_f")
    if method in ("apgd", "auto"):  # fixed-step PGD may stall on the flat softmax; APGD's schedule does not
        floor = attack(pair, None, region, "evasive:1.5", "random", **FAST)
        assert res.value >= floor.value - 1e-6


def test_lp_walk_refuses_l2_and_nonlinear_objectives():
    pair = random_pair(np.random.default_rng(5), 3, (4, 4), 2)
    with pytest.raises(ConfigError, match="L2"):
        attack(pair, None, L2Ball(np.full(3, 0.5), 0.1, np.zeros(3), np.ones(3)), method="lp-walk", **FAST)
    with pytest.raises(ConfigError, match="nonlinear"):
        attack(pair, None, Domain(np.zeros(3), np.ones(3)), "evasive", method="lp-walk", **FAST)


def test_conv_pair_points_in_region():
    pair = random_conv_pair(np.random.default_rng(2), twin="prune")
    centre = np.random.default_rng(0).uniform(0, 1, (1, 6, 6))
    region = Box.around(centre, 0.05, np.zeros((1, 6, 6)), np.ones((1, 6, 6)))
    for method in ("apgd", "lp-walk"):
        res = attack(pair, None, region, "max-logit-deviation", method, restarts=2, iterations=20, **FAST)
        _check_result(pair, region, res, "max-logit-deviation")


@pytest.mark.parametrize("method", ALL)
def test_same_seed_same_point(method):
    pair = random_pair(np.random.default_rng(11), 4, (10, 8), 3, twin="perturb")
    region = Box.around(np.full(4, 0.4), 0.2, np.zeros(4), np.ones(4))
    kw = dict(objective="max-logit-deviation", method=method, restarts=2, iterations=25, **FAST)
    a = attack(pair, None, region, seed=7, **kw)
    b = attack(pair, None, region, seed=7, **kw)
    assert not a.truncated and np.array_equal(a.x, b.x) and a.value == b.value and a.trace == b.trace
    if method in ("random", "pgd"):  # a different seed draws different points (PGD may still end at the same corner)
        c = attack(pair, None, region, seed=8, **kw)
        assert a.trace != c.trace


def test_ascent_methods_beat_random_sampling():
    """On a wider net every ascent must climb above the sampled floor."""
    pair = random_pair(np.random.default_rng(0), 30, (40, 30), 5, twin="prune")
    region = Box.around(np.random.default_rng(1).uniform(0.2, 0.8, 30), 0.05, np.zeros(30), np.ones(30))
    vals = {m: attack(pair, None, region, "max-logit-deviation", m, **FAST).value for m in ALL}
    for m in ("pgd", "apgd", "lp-walk", "auto"):
        assert vals[m] > vals["random"], (m, vals)


def test_lp_walk_ends_at_a_local_maximum():
    """No point in a small neighbourhood of a walk's end beats it (the walk stops only when stuck)."""
    rng = np.random.default_rng(4)
    for t in range(4):
        pair = random_pair(rng, 3, (8, 6), 3, twin=("prune", "quantise", "perturb")[t % 3])
        lo, hi = np.full(3, 0.1), np.full(3, 0.9)
        obj = parse_objective("max-logit-deviation").resolve(pair, None)
        layer, cf, cg = obj.linear_form()
        lp = PairLP(pair, lo, hi)
        for s in range(obj.n_sub):
            def value(x, s=s, obj=obj, pair=pair):
                return float(obj.sub_values(*pair.forward_layers(torch.as_tensor(x).reshape(1, -1)))[0, s])
            x0 = rng.uniform(lo, hi)
            x, v, trace, n_lp = walk(lp, value, x0, layer, cf[s].numpy(), cg[s].numpy(), deadline=float("inf"))
            assert v == value(x) and v >= value(x0) and trace == sorted(trace)
            near = np.clip(x + rng.uniform(-1, 1, (3000, 3)) * 1e-4, lo, hi)
            sv = obj.sub_values(*pair.forward_layers(torch.as_tensor(near)))[:, s]
            assert float(sv.max()) <= v + 1e-9 * (1 + abs(v)), f"walk stopped below a local max (sub {s})"


def planted_pair() -> Pair:
    """f says class 0 on all of [0,1]^4; g says class 1 only where x0+x1+x2+x3 > 3.9512 (volume ~2.4e-7).

    Both share the hidden layer h = (relu(s - 2), relu(s - 3.94)), s = sum x; logits f = (1.2, 0.5 h0),
    g = (1.2, 0.5 h0 + 20 h1). Random sampling misses the corner; the margin's slope leads ascent to it.
    """
    w1 = np.array([[1.0] * 4, [1.0] * 4])
    b1 = np.array([-2.0, -3.94])
    f = mlp([w1, np.array([[0.0, 0.0], [0.5, 0.0]])], [b1, np.array([1.2, 0.0])], name="f")
    g = mlp([w1, np.array([[0.0, 0.0], [0.5, 20.0]])], [b1, np.array([1.2, 0.0])], name="g")
    return Pair(f, g)


@pytest.mark.parametrize("method", ["pgd", "apgd", "lp-walk", "auto"])
def test_planted_disagreement_is_found(method):
    pair = planted_pair()
    region = Domain(np.zeros(4), np.ones(4))
    res = attack(pair, None, region, "disagreement", method, restarts=2, **FAST)
    assert res.label == 0
    assert res.disagreement and res.class_f == 0 and res.class_g == 1 and res.value > 0
    assert res.x.sum() > 3.9512
    floor = attack(pair, None, region, "disagreement", "random", **FAST)
    assert not floor.disagreement  # the planted region is too small to be sampled


def test_attack_many_matches_single_region_runs():
    pair = random_pair(np.random.default_rng(8), 3, (6, 6), 3, twin="quantise")
    regions = [Box.around(np.full(3, c), 0.1, np.zeros(3), np.ones(3)) for c in (0.2, 0.5, 0.8)]
    many = attack_many(pair, None, regions, "disagreement", "apgd", restarts=2, iterations=20, **FAST)
    assert len(many) == 3
    for region, res in zip(regions, many):
        _check_result(pair, region, res, "disagreement")
        single = attack(pair, None, region, "disagreement", "apgd", restarts=2, iterations=20, **FAST)
        assert res.label == single.label
        assert res.value >= single.value - 1e-9 or single.value >= res.value - 1e-9  # both well defined


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(budget_seconds=0), ConfigError, "budget_seconds"),
    (dict(budget_seconds=-1), ConfigError, "budget_seconds"),
    (dict(method="gradient"), ConfigError, "unknown attack method"),
    (dict(objective="layer:9:neuron:0"), ConfigError, "layer 9 does not exist"),
    (dict(objective="layer:1:neuron:50"), ConfigError, "neuron 50 does not exist"),
    (dict(restarts=0, method="apgd"), ConfigError, "restarts"),
])
def test_bad_arguments_are_one_line_errors(kwargs, error, match):
    pair = random_pair(np.random.default_rng(1), 3, (4, 4), 2)
    region = Box.around(np.full(3, 0.5), 0.1, np.zeros(3), np.ones(3))
    args = dict(objective="max-logit-deviation", method="auto", budget_seconds=5.0, progress=False) | kwargs
    with pytest.raises(error, match=match) as info:
        attack(pair, None, region, **args)
    assert "\n" not in str(info.value)


def test_zero_volume_region_and_wrong_shape_are_region_errors():
    pair = random_pair(np.random.default_rng(1), 3, (4, 4), 2)
    with pytest.raises(RegionError, match="zero"):
        attack(pair, None, Box.around(np.full(3, 0.5), 0.0, np.zeros(3), np.ones(3)), **FAST)
    with pytest.raises(RegionError, match="input shape"):
        attack(pair, None, Box.around(np.full(4, 0.5), 0.1, np.zeros(4), np.ones(4)), **FAST)


def test_mismatched_models_are_a_pairing_error():
    a = random_pair(np.random.default_rng(1), 3, (4, 4), 2).f
    b = random_pair(np.random.default_rng(2), 3, (5, 4), 2).f
    with pytest.raises(PairingError, match="layer 0"):
        attack(a, b, Domain(np.zeros(3), np.ones(3)), **FAST)


def test_a_pair_and_a_pruned_net_together_or_no_pruned_net_is_a_config_error():
    """`attack(pair, net)` and `attack(net, None)` used to fail inside make_pair with an AttributeError."""
    f = mlp([np.eye(2), np.eye(2)], [np.zeros(2), np.zeros(2)], name="f")
    region = Box(np.zeros(2), np.ones(2))
    with pytest.raises(ConfigError, match="pass the Pair alone"):
        attack(Pair(f, f), f, region, method="random", budget_seconds=1)
    with pytest.raises(ConfigError, match="no pruned network to pair with f"):
        attack(f, None, region, method="random", budget_seconds=1)
