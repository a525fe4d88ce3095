"""`prunecert audit` end to end on a tiny model (digits, 64-16-12-10): a real report, its numbers, exit codes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prunecert.cli import app
from prunecert.io import load_model, save_model, weights_sha256
from prunecert.reports import Audit, read_report
from test_report_write import check_markdown_matches_json

RUN = ["--data", "digits", "--regions", "2", "--eps", "0.02,0.05", "--attack-budget", "0.1", "--samples", "64",
       "--seed", "3", "--certify-method", "diff-interval"]  # the default, diff-linear, is in test_python_api...


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small trained MLP on digits and its coreset-pruned twin, saved as model files."""
    from prunecert.data import load_dataset
    from prunecert.io.torch_io import network_from_module
    from prunecert.prune import prune
    from prunecert.train import fit, mlp

    folder = tmp_path_factory.mktemp("models")
    ds = load_dataset("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        module = fit(mlp(64, (16, 12), 10), ds, epochs=8, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    f = network_from_module(module, ds.input_shape, name="tiny")
    g = prune(f, "coreset", keep=0.5, seed=0, progress=False)
    paths = {"fp": folder / "f.pt", "gp": folder / "g.pt"}
    save_model(f, paths["fp"])
    save_model(g, paths["gp"])
    return {"f": f, "g": g, **paths}


def cli(*args: str):
    return CliRunner().invoke(app, ["audit", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def base(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    res = cli(models["fp"], models["gp"], *RUN, "--tolerance", "1.0", "--out", out, "--quiet")
    assert res.exit_code in (0, 1, 2), res.output
    return {"out": out, "doc": read_report(out / "report.json"), "exit": res.exit_code, "output": res.output}


def test_real_report_validates_and_renders(base):
    out, doc = base["out"], base["doc"]  # read_report validated it against the schema
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert base["exit"] == doc["verdict"]["exit_status"] == {"certified": 0, "violated": 1, "unknown": 2}[
        doc["verdict"]["overall"]]
    check_markdown_matches_json((out / "report.md").read_text(), doc)
    html = (out / "report.html").read_text()
    assert html.count("<svg") == len(doc["layers"]) + 1 and "data:image/png;base64," in html
    assert Audit.from_json(doc).to_json() == doc


def test_real_report_in_browser(base, tmp_path):
    from test_report_html import CHROMIUM, VISIBLE, Browser
    if CHROMIUM is None:
        pytest.skip("chromium not installed")
    b = Browser(tmp_path / "profile")
    try:
        b.open((base["out"] / "report.html").as_uri())
        state = b.evaluate(VISIBLE)
        assert b.errors() == []
    finally:
        b.close()
    doc = base["doc"]
    assert state["verdictText"].strip() == doc["verdict"]["overall"].upper()
    assert state["layerRows"] == len(doc["layers"]) and state["plots"] == len(doc["layers"]) + 1
    assert state["images"] == len(doc["counterexamples"]) > 0 and state["brokenImages"] == 0


def test_report_contents(base, models):
    doc, f, g = base["doc"], models["f"], models["g"]
    assert [r["source"] for r in doc["regions"]][-1] == "domain" and len(doc["regions"]) == 2 * 2 + 1
    centers = doc["settings"]["center_indices"]
    assert [r["source"] for r in doc["regions"][:4]] == [f"digits:test:{i}" for i in centers for _ in (0, 1)]
    assert [r["eps"] for r in doc["regions"][:4]] == [0.02, 0.05, 0.02, 0.05]
    assert doc["original"]["sha256"] == weights_sha256(f) and doc["pruned"]["sha256"] == weights_sha256(g)
    assert doc["metrics"]["compression"]["params_pruned"] == g.n_params()
    assert doc["metrics"]["compression"]["params_removed"] == pytest.approx(1 - g.n_params() / f.n_params())
    records = g.metadata["pruning"]["layers"]
    for rec in records:  # the eps of pruning layer l sits on layer l+1
        layer = doc["layers"][rec["index"]]
        assert layer["neurons_kept"] == rec["n_kept"] and layer["neurons_total"] == rec["n_total"]
        nxt = doc["layers"][rec["index"] + 1]["provable"]
        assert nxt["eps"] == rec["eps_max"] and nxt["from_layer"] == rec["index"]
    assert doc["layers"][0]["provable"] is None
    # accuracy and agreement, recomputed here
    from prunecert.data import load_dataset
    ds = load_dataset("digits")
    pf, pg = f.predict(np.array(ds.x_test)), g.predict(np.array(ds.x_test))
    assert doc["metrics"]["accuracy_original"] == pytest.approx(np.mean(pf == ds.y_test), abs=2 / len(pf))
    assert doc["metrics"]["agreement_rate"] == pytest.approx(np.mean(pf == pg), abs=2 / len(pf))
    assert doc["reproducibility"]["command"].startswith("prunecert audit ")
    assert doc["reproducibility"]["seeds"]["audit"] == 3 and "torch" in doc["reproducibility"]["versions"]
    assert {s["name"].split(" ")[0] for s in doc["timings"]} >= {"load", "measure", "certify", "attack", "report"}


def test_report_numbers_are_a_sound_sandwich(base, models):
    """empirical <= certified per region and layer; test data <= certified on the domain; ratios consistent."""
    doc = base["doc"]
    for r in doc["regions"]:
        for emp, cert in zip(r["empirical"] + r["empirical_local"], r["certified"] + r["certified_local"]):
            assert emp <= cert * (1 + 1e-9) + 1e-12
    domain = doc["regions"][-1]
    for l, layer in enumerate(doc["layers"]):
        assert layer["data"]["end_to_end"] <= domain["certified"][l] * (1 + 1e-9) + 1e-12
        assert layer["certified"]["end_to_end"] == max(r["certified"][l] for r in doc["regions"])
        assert layer["empirical"]["end_to_end"] == max(r["empirical"][l] for r in doc["regions"])
        if layer["empirical"]["end_to_end"] > 0:
            assert layer["ratios"]["certified_over_empirical"] == pytest.approx(
                layer["certified"]["end_to_end"] / layer["empirical"]["end_to_end"])
        if layer["provable"]:
            assert layer["ratios"]["provable_compared_over"] == "domain"
            assert layer["ratios"]["provable_over_certified"] == pytest.approx(
                layer["provable"]["eps"] / layer["certified_domain"]["local"])
    # every counterexample is inside its region and its value re-evaluates exactly
    from prunecert.certify import make_pair
    pair = make_pair(models["f"], models["g"])
    for c in doc["counterexamples"]:
        x = np.array(c["x"]).reshape(c["shape"])
        r = doc["regions"][c["region"]]
        assert x.min() >= 0 and x.max() <= 1
        if r["eps"] is not None:
            assert np.abs(x - np.array(c["center"]).reshape(c["shape"])).max() <= r["eps"] * (1 + 1e-12)
        d = pair.deltas(torch.from_numpy(x[None]))[c["layer"]]
        assert float(d.abs().max()) == c["value"]


def test_exit_status_follows_the_verdict(base, models, tmp_path):
    logits = base["doc"]["layers"][-1]
    cert, emp = logits["certified"]["end_to_end"], logits["empirical"]["end_to_end"]
    assert cert > 1.05 * emp > 0  # the tiny pair leaves a gap, so all three verdicts are reachable
    assert base["output"] == ""  # --quiet
    cases = {"certified": (cert * 1.01, 0), "unknown": (cert * 0.999, 2), "violated": (emp * 0.5, 1)}
    for verdict, (tol, code) in cases.items():
        out = tmp_path / verdict
        res = cli(models["fp"], models["gp"], *RUN, "--tolerance", repr(tol), "--out", out, "--json-only")
        assert res.exit_code == code, (verdict, res.output)
        doc = json.loads(res.stdout)  # --json-only: stdout is exactly the report, and only it is written
        assert doc == json.loads((out / "report.json").read_text()) and len(list(out.iterdir())) == 1
        assert doc["verdict"]["overall"] == doc["layers"][-1]["verdict"] == verdict
        assert doc["verdict"]["exit_status"] == code
        if verdict == "violated":
            cex = next(c for c in doc["counterexamples"] if c["id"] == doc["layers"][-1]["counterexample"])
            assert cex["kind"] == "violation" and cex["value"] > tol


def test_hidden_layer_tolerance_gates_the_verdict(models, tmp_path):
    res = cli(models["fp"], models["gp"], *RUN, "--tolerance", "1e9", "--layer-tolerance", "1e-6,1e-6",
              "--out", tmp_path, "--json-only")
    doc = json.loads(res.stdout)
    assert doc["verdict"]["gated_layers"] == [0, 1, 2]
    layer0 = doc["layers"][0]  # pruning never changes layer 0's pre-activations: certified at any tolerance
    assert layer0["verdict"] == "certified" and layer0["certified"]["end_to_end"] < 1e-6
    assert doc["layers"][1]["verdict"] == "violated"  # the attack easily beats 1e-6
    assert doc["verdict"]["overall"] == doc["layers"][1]["verdict"]
    assert res.exit_code == doc["verdict"]["exit_status"] != 0


@pytest.mark.parametrize("args, message", [
    (["{f}", "{other}", "--tolerance", "1"], "cannot pair"),
    (["{f}", "{g}", "--data", "nosuch", "--tolerance", "1"], "unknown data set 'nosuch'"),
    (["{f}", "{g}", "--tolerance", "0"], "tolerance must be a finite number > 0"),
    (["{f}", "{g}", "--tolerance", "-2"], "tolerance must be a finite number > 0"),
    (["{f}", "{g}"], "--tolerance is required"),
    (["{f}", "{g}", "--tolerance", "1", "--out", "{blocker}"], "exists and is not a folder"),
    (["{f}", "{g}", "--tolerance", "1", "--out", "{blocker}/sub"], "blocker is not a folder"),
    (["{f}", "{g}", "--tolerance", "1", "--data", "mnist5k"], "mnist5k has inputs of shape (1, 28, 28)"),
    (["{f}", "{g}", "--tolerance", "1", "--compression", "0.5"], "either a pruned model or pruning options"),
    (["{f}", "--tolerance", "1"], "exactly one pruning target"),
    (["{f}", "{g}", "--tolerance", "1", "--certify-method", "magic"], "unknown certification method 'magic'"),
    (["{f}", "{g}", "--tolerance", "1", "--layer-tolerance", "1,2,3"], "one per hidden layer (2), got 3"),
    (["{f}", "{g}", "--tolerance", "1", "--data", "digits", "--regions", "100000"], "points (regions around test points) must be in"),
    (["{missing}", "{g}", "--tolerance", "1"], "model file not found"),
])
def test_bad_input_fails_fast_with_one_line(models, tmp_path, monkeypatch, args, message):
    import prunecert.audit
    import prunecert.train

    def never(*a, **k):
        raise AssertionError("long work started before the input was checked")
    monkeypatch.setattr(prunecert.audit, "run_audit", never)
    monkeypatch.setattr(prunecert.train, "train_model", never)
    other = tmp_path / "other.pt"
    from prunecert.network import mlp as make_mlp
    rng = np.random.default_rng(0)
    save_model(make_mlp([rng.normal(size=(7, 64)), rng.normal(size=(10, 7))], [np.zeros(7), np.zeros(10)]), other)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    fill = {"f": models["fp"], "g": models["gp"], "other": other, "blocker": blocker, "missing": tmp_path / "nope.pt"}
    argv = [a.format(**fill) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    res = CliRunner().invoke(app, ["audit", *argv])
    assert res.exit_code == 3, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_python_api_prunes_and_writes(models, tmp_path):
    from prunecert.audit import audit

    report = audit(models["f"], None, out=tmp_path, tolerance=50.0, data="digits", points=1, eps=(0.02,),
                   domain=False, keep=0.75, attack_budget=0.05, samples=16, progress=False)
    assert report.settings["certify_method"] == "diff-linear"  # the default
    assert report.pruning["source"] == "pruned by this audit" and report.pruning["target"] == {"keep": 0.75}
    assert len(report.regions) == 1 and report.layers[1].certified_domain is None
    assert report.layers[1].ratios.provable_compared_over == "regions"
    assert read_report(tmp_path / "report.json") == report.to_json()
    assert all(math.isfinite(l.certified.end_to_end) for l in report.layers)


def test_demo_trains_once_then_uses_the_cache(tmp_path, monkeypatch):
    """--demo on digits, 1 epoch (a fast stand-in for mnist5k, 10): trains and caches, then reuses the cache."""
    import prunecert.cli.audit as cli_audit

    monkeypatch.setitem(cli_audit.DEMO, "epochs", 1)
    monkeypatch.setitem(cli_audit.DEMO, "fine_tune", 1)
    monkeypatch.setenv("PRUNECERT_CACHE", str(tmp_path / "cache"))
    args = ["--demo", "--data", "digits", "--regions", "1", "--eps", "0.02", "--no-domain", "--certify-method", "diff-interval",
            "--attack-budget", "0.05", "--samples", "16"]
    first = CliRunner().invoke(app, ["audit", *args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output  # the demo exits 0 whatever the verdict; the report says it
    verdict = json.loads((tmp_path / "a" / "report.json").read_text())["verdict"]["overall"]
    assert f"demo: verdict {verdict}" in first.stderr
    cached = sorted((tmp_path / "cache").iterdir(), key=lambda p: p.name != "lenet300-digits-e1-s0.pt")
    assert cached[0].name == "lenet300-digits-e1-s0.pt" and "training lenet300" in first.stderr
    # the distilled model and the data-free one (the second pair, OUT/data-free/) are cached too
    assert sorted("fine_tune1" in p.name for p in cached[1:]) == [False, True]
    free = json.loads((tmp_path / "a" / "data-free" / "report.json").read_text())
    assert "--fine-tune 0" in free["reproducibility"]["command"] and free["pruning"]["target"] == {"compression": 0.9}
    second = CliRunner().invoke(app, ["audit", *args, "--out", str(tmp_path / "b")])
    assert "using the cached model" in second.stderr and second.exit_code == first.exit_code
    assert "using the cached pruned model" in second.stderr
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "b"))
    assert a["original"]["sha256"] == b["original"]["sha256"] == weights_sha256(load_model(cached[0]))
    assert a["pruning"]["target"] == {"compression": 0.9}
    for la, lb in zip(a["layers"], b["layers"]):  # attacks cut short by their time budget may differ
        assert (la["certified"], la["data"], la["provable"]) == (lb["certified"], lb["data"], lb["provable"])
    assert a["reproducibility"]["command"].replace(str(tmp_path / "a"), "OUT") == \
        b["reproducibility"]["command"].replace(str(tmp_path / "b"), "OUT")
    assert "--demo" in a["reproducibility"]["command"] and (tmp_path / "a" / "report.html").is_file()


def test_complete_stage_off_where_the_lp_is_too_large(models, tmp_path, monkeypatch):
    """On a pair whose LP the complete stage cannot branch on (here: a limit of 10 columns), the audit
    runs its certify stage without it (before, relu-bab built the CNN's whole LP per open region)."""
    import prunecert.audit
    import prunecert.certify.formulation as formulation
    from prunecert.audit import audit

    seen = []
    real = prunecert.audit.certify
    monkeypatch.setattr(prunecert.audit, "certify", lambda *a, **k: seen.append(k["complete"]) or real(*a, **k))
    monkeypatch.setattr(formulation, "MAX_COLUMNS", 10)
    audit(models["f"], models["g"], out=tmp_path, tolerance=50.0, data="digits", points=1, eps=(0.02,),
          domain=False, attack_budget=0.05, samples=16, progress=False, complete=5.0)
    assert seen == [None]
