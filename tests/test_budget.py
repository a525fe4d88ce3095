"""Certified-budget pruning: the search returns a model the certificate really covers, the smallest in its
trace, says when the requirement is out of reach, and the CLI writes model, certificate and trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prunecert.budget import Requirement, prune_to_certificate
from prunecert.certify import certify
from prunecert.cli import app
from prunecert.core.region_options import regions_from_options
from prunecert.data import load_dataset
from prunecert.errors import ConfigError
from prunecert.io import load_model, save_model
from prunecert.io.torch_io import network_from_module
from prunecert.train import fit, mlp

runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def net(digits):
    torch.manual_seed(0)
    module = fit(mlp(64, (40, 20)), digits, epochs=6, seed=0, progress=False)
    return network_from_module(module, digits.input_shape, name="digits-mlp")


def _regions(net, n=12, eps=0.01):
    lo, hi = net.domain()
    return regions_from_options(net.input_shape, lo, hi, centers=[f"digits:test:0-{n - 1}"], eps=eps)


def test_agreement_search_returns_a_certified_model_smaller_than_the_original(net):
    regions = _regions(net)
    req = Requirement(fraction=0.75)
    res = prune_to_certificate(net, regions, req, method="magnitude", coarse_steps=4, progress=False)
    best = res.best
    assert res.trace[0].stage == "full" and res.trace[0].passed
    assert best.passed and best.params == res.model.n_params() < net.n_params()
    assert best.params == min(c.params for c in res.trace if c.passed)
    assert [r["n_kept"] for r in res.model.metadata["pruning"]["layers"]] == list(best.keep.values())
    # an independent certification of the returned pair agrees with the stored certificate
    again = certify(net, res.model, regions, progress=False, samples=8)
    assert req.certified(again) == req.certified(res.certificate) == best.certified >= req.needed(len(regions))
    # every failed candidate that was certified really missed the bar
    assert all(c.certified is None or c.certified < c.needed for c in res.trace if not c.passed)
    rec = res.model.metadata["pruning"]["certified_budget"]
    assert rec["params"] == best.params and len(rec["trace"]) == len(res.trace)
    assert rec["requirement"]["fraction"] == 0.75 and json.dumps(rec)


def test_deviation_search_with_fine_tuning_meets_the_tolerance(net, digits):
    regions = _regions(net, n=8)
    tau = 2.0
    res = prune_to_certificate(net, regions, Requirement(tolerance=tau), method="coreset", fine_tune=2,
                               data=digits, coarse_steps=3, resolution=0.25, progress=False)
    assert np.all(res.certificate.max_abs_logit_deviation <= tau)
    assert res.best.accuracy is not None and res.original_accuracy is not None
    assert res.model.metadata["pruning"]["fine_tune"]["epochs"] == 2
    assert res.model.n_params() < net.n_params()


def test_centres_that_already_fail_skip_certification(net):
    regions = _regions(net, n=6)
    res = prune_to_certificate(net, regions, Requirement(tolerance=1e-6), coarse_steps=2, refine=False,
                               progress=False)
    skipped = [c for c in res.trace[1:] if c.certified is None]
    assert skipped and all("centres already violate" in c.note for c in skipped)
    assert res.best.stage == "full"  # only the unpruned copy is within 1e-6


def test_out_of_reach_requirement_says_so(net):
    wide = _regions(net, n=4, eps=0.5)  # f itself changes its answer inside such boxes
    with pytest.raises(ConfigError, match="not certified even with nothing pruned"):
        prune_to_certificate(net, wide, Requirement(fraction=1.0), progress=False)
    with pytest.raises(ConfigError, match="fraction"):
        Requirement(fraction=1.5)
    with pytest.raises(ConfigError, match="need data"):
        prune_to_certificate(net, wide, Requirement(tolerance=1.0), fine_tune=3, progress=False)


def test_relative_fraction_counts_against_what_the_original_certifies(net):
    regions = _regions(net, n=4, eps=0.08)  # wide enough that f is not proved robust on every box
    res = prune_to_certificate(net, regions, Requirement(fraction=1.0, relative=True), coarse_steps=2,
                               refine=False, progress=False)
    full = res.trace[0]
    assert 0 < full.certified < len(regions) and full.needed == full.certified and full.passed
    assert "unpruned copy" in res.requirement.describe()


def test_time_limit_stops_the_search_early(net):
    res = prune_to_certificate(net, _regions(net, n=4), Requirement(tolerance=5.0), time_limit=1e-9, progress=False)
    assert len(res.trace) == 1 and res.best.stage == "full"


def test_cli_certified_search_writes_model_certificate_and_trace(net, tmp_path):
    save_model(net, tmp_path / "m.pt")
    out, cert = tmp_path / "small.pt", tmp_path / "cert.json"
    res = runner.invoke(app, ["prune", str(tmp_path / "m.pt"), "--out", str(out), "--method", "magnitude",
                              "--certify-agreement", "--certified-fraction", "0.75",
                              "--center", "digits:test:0-7", "--eps", "0.01", "--certificate", str(cert)])
    assert res.exit_code == 0, res.output
    g = load_model(out)
    budget = g.metadata["pruning"]["certified_budget"]
    doc = json.loads(cert.read_text())
    proved = sum(r["agreement"]["verdict"] == "proved" for r in doc["regions"])
    assert proved == budget["certified"] >= 6 and g.n_params() == budget["params"] < net.n_params()
    assert "certified-budget search" in res.output and "BEST" in res.output and "[certified-budget]" in res.output


@pytest.mark.parametrize("args, message", [
    (["--certify-agreement", "--keep", "3", "--center", "digits:test:0", "--eps", "0.01"], "finds the keep counts"),
    (["--certify-agreement", "--certify-deviation", "1", "--center", "digits:test:0", "--eps", "0.01"], "one property"),
    (["--certify-agreement"], "give exactly one region"),
    (["--keep", "3", "--center", "digits:test:0", "--eps", "0.01"], "belong to a certified search"),
    (["--certify-deviation", "1", "--center", "digits:test:0", "--eps", "0.01", "--augment", "shift"], "--fine-tune"),
])
def test_cli_bad_combinations_are_one_line_and_write_nothing(net, tmp_path, args, message):
    save_model(net, tmp_path / "m.pt")
    out = tmp_path / "small.pt"
    res = runner.invoke(app, ["prune", str(tmp_path / "m.pt"), "--out", str(out), "-q", *args])
    assert res.exit_code == 3, res.output
    assert message in res.output and res.output.count("\n") == 1
    assert not out.exists()
