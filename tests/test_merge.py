"""`prunecert merge`: shards of one certify / attack / audit run join into the whole run's result;
files of different runs (models, settings, schema) are refused with one line, exit 3, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pairs import random_pair
from typer.testing import CliRunner

from prunecert.cli import app
from prunecert.io import save_model
from prunecert.reports import read_report

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    pair = random_pair(np.random.default_rng(0), 4, (8, 6), 3, twin="perturb")
    other = random_pair(np.random.default_rng(1), 4, (8, 6), 3, twin="perturb")
    save_model(pair.f, d / "f.pt")
    save_model(pair.g, d / "g.pt")
    save_model(other.g, d / "h.pt")
    for i in range(4):
        np.save(d / f"c{i}.npy", np.random.default_rng(i).random(4))
    return d


def _certify(d, out, centres, *extra, pruned="g.pt"):
    args = ["certify", d / "f.pt", d / pruned, *[a for c in centres for a in ("--center", d / f"c{c}.npy")],
            "--eps", "0.05", "--samples", "32", "--tolerance", "0.3", "--json", out, "-q", "--workers", "1", *extra]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code in (0, 1, 2), res.output
    return json.loads(out.read_text())


def _merge(*args):
    return runner.invoke(app, ["merge", *map(str, args), "-q"])


def test_certify_shards_merge_into_the_whole_run(models, tmp_path):
    whole = _certify(models, tmp_path / "all.json", [0, 1, 2, 3])
    _certify(models, tmp_path / "a.json", [0, 1])
    _certify(models, tmp_path / "b.json", [2, 3])
    res = _merge(tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    merged = json.loads((tmp_path / "m.json").read_text())
    merged.pop("seconds"), whole.pop("seconds")  # every region is seeded by itself: shards = the whole run
    # ... up to the last bits of the bounds: BLAS rounds a product of 2 regions and one of 4 differently
    _assert_same(merged, whole)


def _assert_same(a, b, path="") -> None:
    """Equal documents, floats to 1e-12 relative (everything else exactly)."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("change, message", [
    ({"pruned": "h.pt"}, "pruned model's weights"),
    ({"extra": ("--seed", "4")}, "setting seed"),
    ({"extra": ("--method", "naive")}, "setting method"),
])
def test_merge_refuses_files_of_different_runs(models, tmp_path, change, message):
    _certify(models, tmp_path / "a.json", [0])
    _certify(models, tmp_path / "b.json", [1], *change.get("extra", ()), pruned=change.get("pruned", "g.pt"))
    res = _merge(tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "m.json")
    assert res.exit_code == 3
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "b.json" in lines[0]
    assert not (tmp_path / "m.json").exists()


def test_merge_refuses_other_schemas_and_unreadable_files(models, tmp_path):
    _certify(models, tmp_path / "a.json", [0])
    (tmp_path / "x.json").write_text(json.dumps({"schema": "prunecert.attack/1", "models": {}}))
    res = _merge(tmp_path / "a.json", tmp_path / "x.json", "--out", tmp_path / "m.json")
    assert res.exit_code == 3 and "schema" in res.output
    (tmp_path / "bad.json").write_text("{not json")
    res = _merge(tmp_path / "a.json", tmp_path / "bad.json", "--out", tmp_path / "m.json")
    assert res.exit_code == 3 and "bad.json" in res.output and "not a readable JSON" in res.output
    assert not (tmp_path / "m.json").exists()


def test_attack_shards_merge(models, tmp_path):
    for name, centres in (("a", [0, 1]), ("b", [2])):
        args = ["attack", models / "f.pt", models / "g.pt", *[a for c in centres for a in ("--center", models / f"c{c}.npy")],
                "--eps", "0.05", "--method", "pgd", "--out", tmp_path / name, "-q", "--workers", "1"]
        assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    res = _merge(tmp_path / "a" / "result.json", tmp_path / "b" / "result.json", "--out", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    merged = json.loads((tmp_path / "m.json").read_text())
    assert len(merged["regions"]) == 3
    values = [r["value"] for r in merged["regions"]]
    assert merged["value"] == max(values) and merged["best_region"] == int(np.argmax(values))
    assert all((tmp_path / r["x_path"]).is_file() for r in merged["regions"])


AUDIT = ["--data", "digits", "--eps", "0.02", "--attack-budget", "0.1", "--samples", "32", "--seed", "3",
         "--certify-method", "diff-interval", "--tolerance", "1.0", "--quiet", "--workers", "1", "--method", "coreset"]


def test_audit_shards_merge_and_mismatches_are_refused(tmp_path):
    import torch

    from prunecert.data import load_dataset
    from prunecert.io.torch_io import network_from_module
    from prunecert.train import mlp
    torch.manual_seed(0)
    f = network_from_module(mlp(64, (12, 10), 10), load_dataset("digits").input_shape, name="tiny")
    save_model(f, tmp_path / "f.pt")
    for name, spec in (("a", "digits:test:0-1"), ("b", "digits:test:2-3")):
        res = runner.invoke(app, ["audit", str(tmp_path / "f.pt"), "--keep", "0.5", "--center", spec, *AUDIT,
                                  "--out", str(tmp_path / name)])
        assert res.exit_code in (0, 1, 2), res.output
    res = _merge(tmp_path / "a" / "report.json", tmp_path / "b" / "report.json", "--out", tmp_path / "m")
    assert res.exit_code == 0, res.output
    merged = read_report(tmp_path / "m" / "report.json")  # schema-validated
    a, b = read_report(tmp_path / "a" / "report.json"), read_report(tmp_path / "b" / "report.json")
    assert merged["settings"]["center_indices"] == [0, 1, 2, 3]
    assert [r["source"] for r in merged["regions"]] == ["digits:test:0", "digits:test:1", "digits:test:2",
                                                        "digits:test:3", "domain"]
    for l, layer in enumerate(merged["layers"]):
        assert layer["certified"]["end_to_end"] == max(a["layers"][l]["certified"]["end_to_end"],
                                                       b["layers"][l]["certified"]["end_to_end"])
    assert (tmp_path / "m" / "report.html").is_file()
    # a shard with other settings is refused
    res = runner.invoke(app, ["audit", str(tmp_path / "f.pt"), "--keep", "0.5", "--center", "digits:test:4",
                              *AUDIT[:2], "--eps", "0.03", *AUDIT[4:], "--out", str(tmp_path / "c")])
    res = _merge(tmp_path / "a" / "report.json", tmp_path / "c" / "report.json", "--out", tmp_path / "m2")
    assert res.exit_code == 3 and "setting eps" in res.output
    assert not (tmp_path / "m2" / "report.json").exists()
