"""Objective specs: parsing, validation against a pair, and the values they compute."""

import numpy as np
import pytest
import torch
from pairs import random_pair

from prunecert.adversarial.objectives import parse_objective
from prunecert.errors import ConfigError


@pytest.fixture(scope="module")
def pair():
    return random_pair(np.random.default_rng(3), 4, (6, 5), 3, twin="perturb")


def _x(n=7, seed=0):
    return torch.rand(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_max_logit_deviation_is_max_abs_delta(pair):
    obj = parse_objective("max-logit-deviation").resolve(pair, None)
    x = _x()
    af, ag = pair.forward_layers(x)
    assert obj.n_sub == 6
    expected = (af[-1] - ag[-1]).abs().max(1).values
    torch.testing.assert_close(obj.values(af, ag), expected, rtol=0, atol=0)


@pytest.mark.parametrize("layer,neuron,suffix,sign", [(0, 2, "", 1), (1, 4, ":min", -1), (-1, 1, "", 1),
                                                      (2, 0, ":max", 1)])
def test_neuron_objective_is_one_signed_coordinate(pair, layer, neuron, suffix, sign):
    obj = parse_objective(f"layer:{layer}:neuron:{neuron}{suffix}").resolve(pair, None)
    x = _x()
    af, ag = pair.forward_layers(x)
    d = pair.deltas(x)[layer]
    torch.testing.assert_close(obj.values(af, ag), sign * d[:, neuron], rtol=0, atol=1e-15)
    lin_layer, cf, cg = obj.linear_form()
    assert lin_layer == layer % 3 and cf.shape == cg.shape == (1, d.shape[1])


def test_disagreement_is_best_wrong_margin_of_g_against_f_label_at_centre(pair):
    centre = np.full(4, 0.5)
    obj = parse_objective("disagreement").resolve(pair, centre)
    y = int(pair.f.forward(torch.as_tensor(centre)[None]).argmax())
    assert obj.label == y
    x = _x()
    af, ag = pair.forward_layers(x)
    g = ag[-1]
    others = [j for j in range(3) if j != y]
    expected = (g[:, others] - g[:, [y]]).max(1).values
    torch.testing.assert_close(obj.values(af, ag), expected, rtol=0, atol=1e-15)
    # positive exactly where g's argmax differs from y
    assert torch.equal(obj.values(af, ag) > 0, g.argmax(1) != y)


def test_evasive_uses_softmax_of_both_and_is_nonlinear(pair):
    obj = parse_objective("evasive:2.5").resolve(pair, None, label=1)
    x = _x()
    af, ag = pair.forward_layers(x)
    expected = torch.softmax(af[-1], 1)[:, 1] - 2.5 * torch.softmax(ag[-1], 1)[:, 1]
    torch.testing.assert_close(obj.values(af, ag), expected)
    assert not obj.is_linear
    with pytest.raises(ConfigError, match="nonlinear"):
        obj.linear_form()


@pytest.mark.parametrize("spec,match", [
    ("max-logit", "unknown objective"), ("layer:x:neuron:1", "integers"), ("layer:1:neuron:-2", ">= 0"),
    ("layer:1:neuron:2:sideways", ":min or :max"), ("evasive:-1", "positive"), ("evasive:abc", "number"),
    ("disagreement:3", "unknown objective"),
])
def test_malformed_specs_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_objective(spec)


def test_nonexistent_layer_or_neuron_is_named(pair):
    with pytest.raises(ConfigError, match=r"layer 3 does not exist.*0\.\.2"):
        parse_objective("layer:3:neuron:0").resolve(pair, None)
    with pytest.raises(ConfigError, match=r"neuron 6 does not exist in layer 0 .*6 outputs"):
        parse_objective("layer:0:neuron:6").resolve(pair, None)
    with pytest.raises(ConfigError, match="label 7"):
        parse_objective("disagreement").resolve(pair, None, label=7)


def test_unresolved_objective_refuses_to_evaluate(pair):
    obj = parse_objective("max-logit-deviation")
    af, ag = pair.forward_layers(_x())
    with pytest.raises(ConfigError, match="resolved"):
        obj.values(af, ag)


def test_linear_objective_computes_its_coefficients_and_checks_their_length(pair):
    from prunecert.adversarial.objectives import Objective
    rng = np.random.default_rng(0)
    cf, cg = rng.normal(size=5), rng.normal(size=5)
    obj = Objective.linear(-2, cf, cg).resolve(pair, None)
    x = _x()
    af, ag = pair.forward_layers(x)
    assert obj.layer == 1 and obj.n_sub == 1
    torch.testing.assert_close(obj.values(af, ag), af[1] @ torch.as_tensor(cf) + ag[1] @ torch.as_tensor(cg))
    with pytest.raises(ConfigError, match="length 4.*5 outputs"):
        Objective.linear(1, np.ones(4), np.ones(4)).resolve(pair, None)
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        Objective.linear(7, cf, cg).resolve(pair, None)
