"""`prunecert train` and `prunecert info`: happy paths, help texts, and one-line errors with exit 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from prunecert.cli import ERROR_EXIT, app, main
from prunecert.io import load_model, save_model
from prunecert.network import mlp

runner = CliRunner()


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process (as the `prunecert` script would); return (code, out, err)."""
    monkeypatch.setattr(sys, "argv", ["prunecert", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == ERROR_EXIT
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line
    for fragment in fragments:
        assert fragment in line


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "digits.pt"
    result = runner.invoke(app, ["train", "--arch", "lenet300", "--data", "digits", "--epochs", "1", "--seed", "0",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and str(out) in result.output
    return out


def test_train_writes_a_loadable_model_with_provenance(trained):
    net = load_model(trained)
    record = net.metadata["training"]
    assert record["dataset"] == "digits" and record["epochs"] == 1 and record["arch"] == "lenet300"
    assert net.input_shape == (1, 8, 8) and 0.5 < record["test_accuracy"] <= 1.0
    assert leftovers(trained.parent) == ["digits.pt"]  # no temporary files left behind


def test_info_table_on_trained_model(trained):
    result = runner.invoke(app, ["info", str(trained)])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("layer0:linear", "layer2:linear:logits", "300", "total params 50,610", "FLOPs",
                 "[0, 1]", "training.test_accuracy", "training.dataset", "digits", "weights sha256"):
        assert text in out, text


def test_info_json_and_pruning_metadata(tmp_path):
    rng = np.random.default_rng(0)
    net = mlp([rng.normal(size=(5, 4)), rng.normal(size=(3, 5))], [np.zeros(5), np.zeros(3)], lo=-1.0, hi=2.0,
              name="tiny")
    net.metadata["pruning"] = {"method": "coreset", "seed": 4,
                               "layers": [{"layer": 0, "kept": 3, "total": 5, "eps": 0.25}]}
    path = tmp_path / "tiny.pt"
    save_model(net, path)
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"] == 5 * 4 + 5 + 3 * 5 + 3 and data["flops"] == 5 * 4 + 3 * 5
    assert [row["neurons"] for row in data["layers"]] == [5, 3]
    assert data["domain"] == {"lo_min": -1.0, "lo_max": -1.0, "hi_min": 2.0, "hi_max": 2.0}
    assert data["metadata"]["pruning"]["layers"][0]["kept"] == 3
    table = runner.invoke(app, ["info", str(path)]).output
    assert "pruning.method" in table and "coreset" in table and "[-1, 2]" in table
    assert "pruning.layers[0]" in table and "kept=3" in table and "eps=0.25" in table


@pytest.mark.parametrize("command", ["train", "info"])
def test_help_shows_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example: prunecert " + command in result.output


def test_unknown_data_set_is_one_line_error_and_no_output(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.pt"
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", "cifar", "--epochs", "1", "--out", str(out), "-q")
    assert_one_line_error(code, err, "unknown data set 'cifar'", "mnist5k")
    assert leftovers(tmp_path) == []


def test_unknown_arch_and_bad_epochs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.pt"
    code, _, err = run_main(monkeypatch, capsys, "train", "--arch", "resnet", "--data", "digits", "--out", str(out))
    assert_one_line_error(code, err, "unknown architecture 'resnet'")
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", "digits", "--epochs", "0", "--out", str(out))
    assert_one_line_error(code, err, "epochs must be >= 1")
    assert leftovers(tmp_path) == []


def test_info_missing_and_truncated_model(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.pt"
    code, _, err = run_main(monkeypatch, capsys, "info", str(missing))
    assert_one_line_error(code, err, str(missing), "not found")

    rng = np.random.default_rng(1)
    net = mlp([rng.normal(size=(6, 4)), rng.normal(size=(2, 6))], [np.zeros(6), np.zeros(2)])
    path = tmp_path / "cut.pt"
    save_model(net, path)
    path.write_bytes(path.read_bytes()[:300])
    code, _, err = run_main(monkeypatch, capsys, "info", str(path))
    assert_one_line_error(code, err, str(path))


def test_python_dash_m_end_to_end(tmp_path):
    """The real console path: a subprocess, exit status 3 and a one-line message on stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"\x80\x04 not a torch file")
    proc = subprocess.run([sys.executable, "-m", "prunecert", "info", str(bad)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, str(bad), "not a readable torch model file")
    assert proc.stdout == ""
