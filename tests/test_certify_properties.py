"""Properties beyond max |Delta|: --logits, delta-top-1 equivalence, complete verdicts (API and CLI)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from pairs import random_pair
from typer.testing import CliRunner
from wallclock import DECIDE_SECONDS

from prunecert.certify import certify
from prunecert.certify.classprop import ClassProperty, violations
from prunecert.certify.result import load_schema
from prunecert.cli import app
from prunecert.core.regions import Box, Domain
from prunecert.errors import ConfigError
from prunecert.io import save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def pair():
    return random_pair(np.random.default_rng(23), 3, (6, 5), 3, "perturb")


def test_logits_restrict_the_tolerance_verdict(pair):
    box = [Domain(np.zeros(3), np.ones(3))]
    every = certify(pair, None, box, progress=False)
    for k in range(3):
        one = certify(pair, None, box, progress=False, logits=[k])
        d = one.bounds.delta[-1]
        assert one.max_abs_logit_deviation[0] == pytest.approx(max(float(d.upper[0, k]), -float(d.lower[0, k])))
        assert one.max_abs_logit_deviation[0] <= every.max_abs_logit_deviation[0]
        assert one.sampled_max_abs_logit_deviation[0] <= one.max_abs_logit_deviation[0]
    with pytest.raises(ConfigError, match="logits"):
        certify(pair, None, box, progress=False, logits=[3])


def test_complete_verdicts_replay_and_match_the_schema(pair):
    regions = [Box(np.full(3, 0.2), np.full(3, 0.6), np.zeros(3), np.ones(3)), Domain(np.zeros(3), np.ones(3))]
    res = certify(pair, None, regions, progress=False, delta=0.6, complete=DECIDE_SECONDS)
    jsonschema.validate(res.to_json(), load_schema())
    for verdicts, prop in ((res.agreement, ClassProperty.agreement()), (res.delta_top1, ClassProperty.delta_top1(0.6))):
        for v in verdicts:
            assert v.verdict in ("proved", "refuted")       # 3 inputs: input splitting settles them
            if v.verdict == "refuted" and v.stage != "search":
                assert bool(violations(pair, torch.as_tensor(v.point).reshape(1, 3), prop)[0])
    assert res.to_json()["delta_top1"]["delta"] == 0.6


def test_cli_delta_logits_and_bab(pair, tmp_path):
    save_model(pair.f, tmp_path / "f.pt")
    save_model(pair.g, tmp_path / "g.pt")
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["certify", str(tmp_path / "f.pt"), str(tmp_path / "g.pt"), "--region", "domain",
                              "--delta", "0.6", "--method", "bab", "--time-limit", "5", "--json", str(out), "-q"])
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, load_schema())
    assert res.exit_code == {"proved": 0, "refuted": 1, "unknown": 2}[doc["delta_top1"]["verdict"]]
    res = runner.invoke(app, ["certify", str(tmp_path / "f.pt"), str(tmp_path / "g.pt"), "--region", "domain",
                              "--logits", "0,x", "-q"])
    assert res.exit_code == 3 and "--logits" in res.output
    res = runner.invoke(app, ["certify", str(tmp_path / "f.pt"), str(tmp_path / "g.pt"), "--region", "domain",
                              "--delta", "1.5", "-q"])
    assert res.exit_code == 3 and "delta" in res.output


def test_bab_reached_point_refutes_the_tolerance(pair):
    """bab's injected attack point counts as a counterexample (certify's own search sees only the centre)."""
    lo, hi = np.zeros(3), np.ones(3)
    x = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        dev = pair.deltas(x)[-1].abs().max(1).values
        centre = float(pair.deltas(torch.full((1, 3), 0.5, dtype=torch.float64))[-1].abs().max())
    best = x[int(dev.argmax())].numpy()
    tol = (centre + float(dev.max())) / 2
    assert centre < tol < float(dev.max())
    res = certify(pair, None, [Domain(lo, hi)], method="bab", tolerance=tol, time_limit=5, samples=1,
                  progress=False, reach=lambda a, b, s: best)
    assert res.verdict == "violated"
    assert res.to_json()["regions"][0]["counterexample"] == pytest.approx(best.tolist())
