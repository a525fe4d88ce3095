"""Limits: time limits cut diff-linear / crown-diff short soundly and the result says so (JSON, schema);
methods that encode the pair as one LP refuse oversized pairs before any work, with advice that fits;
`attack --method auto` keeps its gradient results when the LP walk cannot run."""

from __future__ import annotations

import jsonschema
import numpy as np
import pytest
from pairs import assert_contains, random_box, random_conv_pair, sample_deltas

import prunecert.adversarial.api as attack_api
import prunecert.certify.formulation as formulation
from prunecert.adversarial import attack
from prunecert.certify import Box, certify
from prunecert.certify.diff_linear import crown_diff_bounds, diff_linear_bounds
from prunecert.certify.result import load_schema
from prunecert.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (2, 8, 8)


@pytest.fixture
def conv_case():
    rng = np.random.default_rng(17)
    pair = random_conv_pair(rng, twin="prune", in_shape=SHAPE)
    return pair, *random_box(rng, SHAPE, 0.2, 0.6)


@pytest.mark.parametrize("fn", [diff_linear_bounds, crown_diff_bounds])
def test_time_limit_truncates_soundly(conv_case, fn):
    pair, lo, hi = conv_case
    full = fn(pair, lo, hi)
    cut = fn(pair, lo, hi, time_limit=1e-9)
    assert cut.info["truncated"] == [True] and full.info["truncated"] == [False]
    e2e = sample_deltas(pair, lo, hi, 300)
    for l in range(pair.n_layers):
        assert_contains(cut.delta[l].lower, cut.delta[l].upper, e2e[l], f"truncated layer {l}")
    assert float(cut.max_abs_logit_deviation()[0]) >= float(full.max_abs_logit_deviation()[0])
    with pytest.raises(ConfigError, match="time_limit"):
        fn(pair, lo, hi, time_limit=0)


def test_truncation_reaches_the_json(conv_case):
    pair, lo, hi = conv_case
    boxes = [Box(lo, hi), Box(np.clip(lo - 0.1, 0, 1), hi)]
    res = certify(pair, None, boxes, method="diff-linear", time_limit=1e-9, progress=False, samples=16, batch_size=1)
    doc = res.to_json()
    jsonschema.validate(doc, load_schema())
    assert doc["truncated"] is True and doc["truncated_regions"] == [0, 1]
    doc = certify(pair, None, boxes[:1], method="crown-diff", progress=False, samples=16).to_json()
    jsonschema.validate(doc, load_schema())
    assert doc["truncated"] is False and doc["truncated_regions"] == [] and doc["method"] == "crown-diff"


def test_encoded_methods_refuse_oversized_pairs_up_front(conv_case, monkeypatch):
    pair, lo, hi = conv_case
    monkeypatch.setattr(formulation, "MAX_COLUMNS", 100)
    for method in ("lp", "milp", "bab"):
        with pytest.raises(ConfigError, match=f"--method {method}.*columns.*diff-linear"):
            certify(pair, None, Box(lo, hi), method=method, progress=False)
    with pytest.raises(ConfigError, match="attack --method lp-walk.*apgd"):
        attack(pair, None, Box(lo, hi), method="lp-walk", budget_seconds=1, progress=False)


def test_auto_attack_keeps_gradient_results_without_lp(conv_case, monkeypatch):
    pair, lo, hi = conv_case
    walks = []
    real_walk = attack_api.walk_search
    monkeypatch.setattr(attack_api, "walk_search", lambda *a, **k: walks.append(1) or real_walk(*a, **k))
    attack(pair, None, Box(lo, hi), method="auto", budget_seconds=1, progress=False)
    assert walks, "auto runs LP walks when the LP fits"
    walks.clear()
    monkeypatch.setattr(formulation, "MAX_COLUMNS", 100)
    res = attack(pair, None, Box(lo, hi), method="auto", budget_seconds=1, progress=False)
    bound = float(diff_linear_bounds(pair, lo, hi).max_abs_logit_deviation()[0])
    assert 0 < res.value <= bound and not walks


@pytest.mark.parametrize("method", ["lp", "milp", "bab"])
def test_solver_methods_cut_short_say_so_in_the_json(method):
    """lp / milp / bab report their own truncation (they used to pass on diff-linear's initial-bounds
    flag, which is always False there, so a run cut short said "truncated": false)."""
    from pairs import random_pair
    pair = random_pair(np.random.default_rng(3), 3, (6, 5), 3)
    boxes = [Box.around(np.full(3, 0.5), 0.3, 0.0, 1.0)]
    cut = certify(pair, None, boxes, method=method, time_limit=1e-6, progress=False, samples=16).to_json()
    jsonschema.validate(cut, load_schema())
    assert cut["truncated"] is True and cut["truncated_regions"] == [0]
    full = certify(pair, None, boxes, method=method, time_limit=30, progress=False, samples=16).to_json()
    assert full["truncated"] is False and full["truncated_regions"] == []
