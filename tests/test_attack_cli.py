"""`prunecert attack`: counterexample files, replay, and one-line errors that leave no files behind."""

import json

import numpy as np
import pytest
import torch
from pairs import random_pair
from typer.testing import CliRunner

from prunecert.adversarial import load_counterexample, replay
from prunecert.adversarial.save import image_shape
from prunecert.cli import app
from prunecert.errors import DataError
from prunecert.io import load_model, save_model, weights_sha256

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 64-input pair (drawn as 8x8 images), saved as native model files, and a centre .npy."""
    d = tmp_path_factory.mktemp("models")
    pair = random_pair(np.random.default_rng(0), 64, (12, 8), 3, twin="prune")
    save_model(pair.f, d / "f.pt")
    save_model(pair.g, d / "g.pt")
    np.save(d / "centre.npy", np.random.default_rng(1).uniform(0.1, 0.9, 64))
    other = random_pair(np.random.default_rng(2), 5, (4,), 3).f
    save_model(other, d / "other.pt")
    return d


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_attack_saves_and_replays(models, tmp_path):
    out = tmp_path / "cex"
    res = _run("attack", models / "f.pt", models / "g.pt", "--center", models / "centre.npy", "--eps", "0.05",
               "--method", "apgd", "--budget-seconds", "20", "--seed", "3", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["schema"] == "prunecert.attack/1" and doc["x_path"] == "x.npz" and doc["seed"] == 3
    assert doc["method"] == "apgd" and doc["objective"] == "max-logit-deviation"
    assert sorted(doc["images"]) == ["x.png", "x_minus_center.png"]
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in doc["images"])
    saved = load_counterexample(out / "x.npz")
    assert float(saved["value"]) == doc["value"] and doc["trace"][-1] == pytest.approx(doc["value"], rel=1e-12)
    f, g = load_model(models / "f.pt"), load_model(models / "g.pt")
    assert str(saved["sha256_original"]) == weights_sha256(f) == doc["models"]["original"]["sha256"]
    # the saved point reproduces its value with a fresh forward pass, and lies in the region
    r = replay(out / "x.npz", f, g)
    assert r.reproduced and r.inside and r.value == doc["value"]
    cli = _run("attack", "--replay", out / "x.npz", models / "f.pt", models / "g.pt")
    assert cli.exit_code == 0 and "reproduced" in cli.output and "NOT" not in cli.output
    # against another pruned model the hashes no longer match: not reproduced, exit 1
    cli = _run("attack", "--replay", out / "x.npz", models / "f.pt", models / "f.pt")
    assert cli.exit_code == 1 and "NOT reproduced" in cli.output


def test_tolerance_sets_the_exit_status(models, tmp_path):
    base = ["attack", models / "f.pt", models / "g.pt", "--center", models / "centre.npy", "--eps", "0.05",
            "--method", "random", "-q"]
    assert _run(*base, "--tolerance", "1e-9").exit_code == 1   # a counterexample above tau
    assert _run(*base, "--tolerance", "1e9").exit_code == 2    # nothing found: unknown


def test_several_centres_write_one_folder_each(models, tmp_path):
    np.save(tmp_path / "c2.npy", np.full(64, 0.5))
    out = tmp_path / "many"
    res = _run("attack", models / "f.pt", models / "g.pt", "--center", models / "centre.npy", "--center",
               tmp_path / "c2.npy", "--eps", "0.02", "--method", "pgd", "--objective", "disagreement", "--out", out,
               "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert len(doc["regions"]) == 2 and doc["x_path"] == f"region{doc['best_region']}/x.npz"
    assert (out / "region0" / "x.npz").is_file() and (out / "region1" / "result.json").is_file()


@pytest.mark.parametrize("extra,match", [
    (["--eps", "0"], "zero volume"),
    (["--eps", "0.1", "--budget-seconds", "0"], "budget_seconds"),
    (["--eps", "0.1", "--objective", "layer:7:neuron:0"], "layer 7 does not exist"),
    (["--eps", "0.1", "--objective", "layer:0:neuron:99"], "neuron 99 does not exist"),
    (["--eps", "0.1", "--objective", "wiggle"], "unknown objective"),
    (["--eps", "0.1", "--method", "lp-walk", "--norm", "2"], "L2"),
    (["--eps", "0.1", "--lowest-margin", "0"], "--lowest-margin must be >= 1"),
    (["--eps", "0.1", "--lowest-margin", "2"], "k must be between 1 and the number of regions (1)"),
])
def test_bad_input_is_one_line_error_and_no_files(models, tmp_path, extra, match):
    out = tmp_path / "none"
    res = _run("attack", models / "f.pt", models / "g.pt", "--center", models / "centre.npy", *extra, "--out", out,
               "-q")
    assert res.exit_code == 3, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]
    assert not out.exists()


def test_mismatched_models_error(models, tmp_path):
    res = _run("attack", models / "f.pt", models / "other.pt", "--region", "domain", "--out", tmp_path / "x", "-q")
    assert res.exit_code == 3 and "cannot pair" in res.output and not (tmp_path / "x").exists()


def test_replay_rejects_foreign_files(models, tmp_path):
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    f, g = load_model(models / "f.pt"), load_model(models / "g.pt")
    with pytest.raises(DataError, match="missing"):
        replay(tmp_path / "foreign.npz", f, g)
    with pytest.raises(DataError, match="not a readable"):
        replay(tmp_path / "junk.npz", f, g)
    res = _run("attack", "--replay", tmp_path / "nothere.npz", models / "f.pt", models / "g.pt")
    assert res.exit_code == 3 and "not found" in res.output


def test_help_has_an_example():
    res = _run("attack", "--help")
    assert res.exit_code == 0 and "Example: prunecert attack" in res.output


@pytest.mark.parametrize("shape,expected", [((784,), (28, 28)), ((1, 28, 28), (28, 28)), ((3, 8, 8), (8, 8, 3)),
                                            ((10,), None), ((5, 3), None), ((2, 8, 8), None)])
def test_image_shape(shape, expected):
    assert image_shape(shape) == expected


def test_lowest_margin_attacks_the_least_sure_centres_first(models, tmp_path):
    from prunecert.adversarial import agreement_margin
    from prunecert.core.completion import make_pair
    pair = make_pair(load_model(models / "f.pt"), load_model(models / "g.pt"))
    rng = np.random.default_rng(5)
    files = []
    for i in range(6):
        files.append(tmp_path / f"c{i}.npy")
        np.save(files[-1], rng.uniform(0.1, 0.9, 64))
    margins = agreement_margin(pair, torch.from_numpy(np.stack([np.load(f) for f in files]))).numpy()
    out = tmp_path / "low"
    centres = [a for f in files for a in ("--center", f)]
    res = _run("attack", models / "f.pt", models / "g.pt", *centres, "--eps", "0.02", "--lowest-margin", "2",
               "--method", "pgd", "--objective", "disagreement", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    picked = [r["region"]["source"] for r in doc["regions"]]
    assert picked == [str(files[i]) for i in np.argsort(margins, kind="stable")[:2]]
