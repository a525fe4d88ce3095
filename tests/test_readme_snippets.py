"""Every ```python block of README.md runs as written, each on its own, in a folder holding the files the
README's commands make (`lenet.pt`, `lenet-pruned.pt`: here a LeNet-300-100 with random weights and its
coreset-pruned copy, so the test needs no training)."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from prunecert.io import save_model
from prunecert.network import mlp
from prunecert.prune import prune

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.fixture(scope="module")
def lenet_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    sizes = (784, 300, 100, 10)
    net = mlp([rng.normal(size=(b, a)) / np.sqrt(a) for a, b in pairwise(sizes)],
              [np.zeros(b) for b in sizes[1:]], name="lenet")
    save_model(net, d / "lenet.pt")
    save_model(prune(net, keep=0.1, seed=0, progress=False), d / "lenet-pruned.pt")
    return d


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(index, lenet_folder, monkeypatch, one_torch_thread):
    monkeypatch.chdir(lenet_folder)
    code = compile(SNIPPETS[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": f"readme_{index}"})  # noqa: S102 - the README's own code
