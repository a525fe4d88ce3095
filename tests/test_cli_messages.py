"""Small promises of the printed output: no rounding-margin numbers (8.9e-308) or "-0" as bounds, a
mismatched pair named as such, "saved to" naming where the files are, attack progress that never
reports a worse "best"."""

from __future__ import annotations

import re
from itertools import pairwise

import numpy as np
import pytest

from prunecert.cli import ERROR_EXIT, run
from prunecert.io import save_model
from prunecert.network import mlp
from prunecert.prune import prune
from prunecert.reports import fmt


def _net(seed: int, sizes=(64, 8, 6, 10)):
    rng = np.random.default_rng(seed)
    return mlp([rng.normal(size=(b, a)) / np.sqrt(a) for a, b in pairwise(sizes)],
               [0.1 * rng.normal(size=b) for b in sizes[1:]], name=f"net{seed}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("messages")
    f = _net(0)
    save_model(f, d / "f.pt")
    save_model(prune(f, keep={1: 3}, seed=0, progress=False), d / "g.pt")  # layer 0 untouched: Delta_0 = 0
    save_model(_net(1, (64, 4, 6, 10)), d / "other.pt")
    return d


def _run(capsys, *argv):
    capsys.readouterr()
    code = run([str(a) for a in argv])
    return (code, *capsys.readouterr())


def test_number_format_of_bounds():
    assert fmt.num(8.9e-308) == "<1e-300" and fmt.num(-0.0) == "0" and fmt.num(0.5) == "0.5"


def test_certify_prints_no_rounding_margin_or_negative_zero(files, capsys):
    code, out, err = _run(capsys, "certify", files / "f.pt", files / "g.pt", "--region", "domain", "--method",
                          "diff-interval", "-q")
    assert code in (0, 1, 2), err
    assert "e-308" not in out and not re.search(r"(?<![\d.])-0(?![.\d])", out)
    assert re.search(r"layer0\S*\s+│?\s*(0|<1e-300)\s", out), out


def test_unrelated_pair_names_the_mismatch(files, capsys):
    code, _, err = _run(capsys, "certify", files / "other.pt", files / "g.pt", "--region", "domain", "-q")
    assert code == ERROR_EXIT
    assert "was pruned from 'net0'" in err and "not from net1" in err and "not a pair" in err
    assert "out of range" not in err


def test_attack_on_several_regions_says_where_it_saved(files, tmp_path, capsys):
    code, out, err = _run(capsys, "attack", files / "f.pt", files / "g.pt", "--center", "digits:test:0-1", "--eps",
                          "0.05", "--method", "random", "--budget-seconds", "0.2", "--out", tmp_path / "cex", "-q")
    assert code == 0, err
    assert "region0/ .. region1/" in out and (tmp_path / "cex" / "region1" / "x.npz").is_file()


def test_attack_progress_best_never_goes_down(capsys):
    from prunecert.adversarial.api import _Log
    log = _Log(True, 1)
    for stage, value in (("seed", 5.0), ("apgd", 7.0), ("lp-walk", 3.0)):
        log.stage(stage, None, 0.0, value=value)
    bests = [float(v) for v in re.findall(r"best (\S+)", capsys.readouterr().err)]
    assert bests == [5.0, 7.0, 7.0]
