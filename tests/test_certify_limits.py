"""Limits: time limits cut diff-linear / crown-diff short soundly and the result says so (JSON, schema),
and no piece of work starts that would end past them; certify chunks fit a memory budget;
methods that encode the pair as one LP refuse oversized pairs before any work, with advice that fits;
`attack --method auto` keeps its gradient results when the LP walk cannot run."""

from __future__ import annotations

import time

import highspy
import jsonschema
import numpy as np
import pytest
import torch
from pairs import assert_contains, random_box, random_conv_pair, random_pair, sample_deltas

import prunecert.adversarial.api as attack_api
import prunecert.certify as certify_api
import prunecert.certify.formulation as formulation
import prunecert.certify.settle as settle_mod
from prunecert.adversarial import attack
from prunecert.certify import Box, certify
from prunecert.certify import diff_linear
from prunecert.certify.chunks import MAX_BATCH, certify_batch_size
from prunecert.certify.classprop import ClassProperty, open_classes
from prunecert.certify.diff_linear import crown_diff_bounds, diff_linear_bounds
from prunecert.certify.formulation import RegionBounds, build_encoding
from prunecert.certify.highs import HighsModel
from prunecert.certify.lp import initial_bounds, unit
from prunecert.certify.relu_verdict import relu_settle
from prunecert.certify.result import load_schema
from prunecert.certify.settle import complete_fits, settle
from prunecert.core.pair import Pair
from prunecert.core.region_batch import RegionBatch
from prunecert.errors import ConfigError
from prunecert.io.torch_io import network_from_module
from prunecert.train import small_vgg

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


def test_complete_stage_refuses_oversized_pairs_up_front(conv_case, monkeypatch):
    """The complete stage branches on ReLUs on nets with many inputs; on a pair whose LP is too large
    (the CNN's 60588 columns) it built that LP for every open region until its budget ran out. Now
    certify refuses --complete before any chunk is bounded, settle refuses ReLU splits before any
    sampling, and the audit turns the stage off (`complete_fits`)."""
    pair, lo, hi = conv_case    # 128 inputs: ReLU splits
    assert complete_fits(pair)
    monkeypatch.setattr(formulation, "MAX_COLUMNS", 100)
    assert not complete_fits(pair)
    monkeypatch.setattr(certify_api, "certify_chunk", lambda *a: pytest.fail("a chunk was bounded"))
    with pytest.raises(ConfigError, match="--complete.*columns.*limit 100.*leave out --complete"):
        certify(pair, None, Box(lo, hi), method="diff-linear", complete=5, progress=False)
    monkeypatch.setattr(settle_mod, "_sampled", lambda *a: pytest.fail("settle sampled"))
    with pytest.raises(ConfigError, match="ReLU branch and bound.*columns"):
        settle(pair, lo, hi, ClassProperty.agreement(), 5.0)
    few = random_pair(np.random.default_rng(1), 3, (6, 5), 3, "perturb")   # input splits need no LP
    assert complete_fits(few)


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


def test_a_walk_that_would_end_past_the_limit_is_not_started(monkeypatch):
    """diff-linear's stop: past the deadline, or when the next piece of work, taking as long as the
    last one (the time since the previous check), would end past it (a chunk of CNN rows ran 1.7 s
    past its check)."""
    clock = iter([0.0, 4.0, 8.5])
    monkeypatch.setattr(diff_linear.time, "perf_counter", lambda: next(clock))
    pair = random_conv_pair(np.random.default_rng(3), in_shape=(1, 6, 6))
    lo, hi = random_box(np.random.default_rng(4), (1, 6, 6), 0.2, 0.4)
    region = RegionBatch(torch.as_tensor(lo)[None], torch.as_tensor(hi)[None])
    st = diff_linear._Bounder(pair, region, [], deadline=10.0)
    assert not st.stop()                  # t = 0: nothing measured yet
    assert not st.stop()                  # t = 4: the last piece took 4 s; 4 + 4 <= 10
    assert st.stop() and st.truncated     # t = 8.5, before the deadline, but 8.5 + 4.5 > 10
    assert st.stop()                      # stopped for good (the clock is not read again)


def test_relu_settle_out_of_time_solves_nothing():
    """Past its deadline the ReLU branch and bound returns unknown before any LP (a CNN pair's root
    LPs ran with no limit and overran a 5 s budget several times)."""
    pair = random_pair(np.random.default_rng(1), 3, (6, 5), 3, "perturb")
    lo, hi = np.zeros(3), np.ones(3)
    bounds = initial_bounds(pair, RegionBatch(torch.as_tensor(lo)[None], torch.as_tensor(hi)[None]))
    s = relu_settle(pair, lo, hi, ClassProperty.agreement(), time.perf_counter() - 1.0, bounds)
    assert open_classes(bounds, ClassProperty.agreement()).any()   # the bounds leave the question open
    assert (s.verdict, s.stage) == ("unknown", "time") and s.details["nodes"] == 0
    assert s.details["gap"] is None


def test_certify_chunks_follow_the_memory_budget():
    small = random_pair(np.random.default_rng(2), 4, (8, 6), 3, "prune")
    assert certify_batch_size(small) == MAX_BATCH
    assert certify_batch_size(small, budget=1) == 1   # a region always fits, alone
    vgg = Pair(*(network_from_module(small_vgg((1, 28, 28), 10), (1, 28, 28)) for _ in range(2)))
    assert certify_batch_size(vgg) == 10              # its bound state: ~27 MB per region


def test_an_lp_stopped_by_its_time_limit_gives_the_box_bound_with_side_rows():
    """relu-bab's LPs now get a time limit; a stopped one falls back to the box bound (y = 0), whose
    multipliers must cover the side rows added to the model (sized by the encoding, it crashed)."""
    pair = random_pair(np.random.default_rng(1), 3, (6, 5), 3, "perturb")
    lo, hi = np.zeros(3), np.ones(3)
    bounds = initial_bounds(pair, RegionBatch(torch.as_tensor(lo)[None], torch.as_tensor(hi)[None]))
    enc = build_encoding(pair, lo, hi, RegionBounds.from_pair_bounds(bounds, 0))
    model = HighsModel(enc)
    last = pair.n_layers - 1
    model.add_side_row(np.array([enc.af[last][0], enc.af[last][1]]), np.array([1.0, -1.0]), 0.0, np.inf)
    c = unit(enc, enc.ag[last][1], enc.ag[last][0])
    solved = model.maximize_lp(c)

    class Stopped:     # HiGHS as it answers when the time limit ends a solve
        def __init__(self, highs):
            self.highs = highs

        def __getattr__(self, name):
            return getattr(self.highs, name)

        def getModelStatus(self):
            return highspy.HighsModelStatus.kTimeLimit

    model.highs = Stopped(model.highs)
    cut = model.maximize_lp(c, time_limit=1e-9)
    assert cut.v is None and cut.bound >= solved.bound
