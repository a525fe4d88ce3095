"""Augmentation and deviation-aware (adversarial) distillation: what `fit` adds on top of plain training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunecert.data import load_dataset
from prunecert.errors import ConfigError
from prunecert.io.torch_io import network_from_module, network_to_module
from prunecert.objectives import Adversarial, adversarial_points, augment_batch
from prunecert.prune import prune
from prunecert.prune.finetune import fine_tune
from prunecert.train import fit, mlp


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(digits):
    """A small MLP trained on digits (64 -> 64 -> 32 -> 10), as a Network over [0, 1]."""
    torch.manual_seed(0)
    module = fit(mlp(64, (64, 32)), digits, epochs=8, seed=0, progress=False)
    return network_from_module(module, digits.input_shape, name="digits-mlp")


def test_shift_moves_each_image_by_at_most_two_pixels_and_is_seeded():
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one lit pixel in the middle
    out = augment_batch(x, "shift", torch.Generator().manual_seed(0))
    again = augment_batch(x, "shift", torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == x.shape
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert out.sum() == 64 and (rows - 4).abs().max() == 2 and (cols - 4).abs().max() == 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 10  # offsets vary across the batch
    one = augment_batch(x, "shift1", torch.Generator().manual_seed(0))[:, 0].flatten(1).argmax(1)
    assert ((one // 9 - 4).abs().max(), (one % 9 - 4).abs().max()) == (1, 1)


def test_shift_flip_mirrors_and_flat_inputs_pass_through():
    x = torch.zeros(200, 1, 5, 5)
    x[:, 0, 2, 0] = 1.0  # left edge, middle row
    out = augment_batch(x, "shift-flip", torch.Generator().manual_seed(1))
    cols = out[:, 0].flatten(1).argmax(1) % 5
    right = (out.flatten(1).sum(1) > 0) & (cols >= 2)
    assert right.any()  # only a flip can carry a left-edge pixel to the right half (shifts of 2 fall off)
    flat = torch.rand(4, 10)
    assert augment_batch(flat, "shift", torch.Generator()) is flat


def test_adversarial_points_stay_in_the_box_and_raise_the_deviation(digits, teacher):
    g = prune(teacher, "coreset", keep=0.1, seed=0, progress=False)
    fm, gm = network_to_module(teacher), network_to_module(g)
    x = torch.tensor(np.array(digits.x_test[:50]), dtype=torch.float32)
    eps = 0.05
    xa = adversarial_points(gm, fm, x, Adversarial(eps=eps, steps=10), 0.0, 1.0, torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        clean = (fm(x) - gm(x)).square().sum(1)
        attacked = (fm(xa) - gm(xa)).square().sum(1)
    assert (attacked >= clean - 1e-4).float().mean() > 0.9 and attacked.mean() > clean.mean()
    assert all(p.grad is None for p in gm.parameters())  # PGD leaves the student's gradients alone


def test_adversarial_distillation_shrinks_the_worst_deviation_near_data(digits, teacher):
    """Deviation-aware fine-tuning lowers the attacked max |f - g| in boxes around test points compared
    with plain distillation at the same epochs."""
    g = prune(teacher, "coreset", keep=0.1, seed=0, progress=False)
    fm = network_to_module(teacher)
    x = torch.tensor(np.array(digits.x_test[:200]), dtype=torch.float32)

    def worst(h) -> float:
        hm = network_to_module(h)
        xa = adversarial_points(hm, fm, x, Adversarial(eps=0.02, steps=20), 0.0, 1.0, torch.Generator().manual_seed(1))
        with torch.no_grad():
            return float((fm(xa) - hm(xa)).abs().amax(1).mean())

    plain = fine_tune(g, teacher, digits, 6, seed=0, progress=False)
    adv = fine_tune(g, teacher, digits, 6, seed=0, progress=False, adversarial={"eps": 0.02, "steps": 3, "weight": 2.0})
    assert adv.metadata["pruning"]["fine_tune"]["mode"] == "adversarial-distill"
    assert plain.metadata["pruning"]["fine_tune"]["mode"] == "distill"
    assert worst(adv) < worst(plain)


def test_bad_settings(digits, teacher):
    with pytest.raises(ConfigError, match="eps must lie"):
        Adversarial(eps=0)
    with pytest.raises(ConfigError, match="unknown augmentation"):
        fit(mlp(64, (8,)), digits, epochs=1, augment="rotate", progress=False)
    with pytest.raises(ConfigError, match="needs a teacher"):
        fit(mlp(64, (8,)), digits, epochs=1, adversarial=Adversarial(), progress=False)
    g = prune(teacher, keep=0.5, progress=False)
    with pytest.raises(ConfigError, match="distill=False"):
        fine_tune(g, teacher, digits, 1, distill=False, adversarial={"eps": 0.01}, progress=False)
