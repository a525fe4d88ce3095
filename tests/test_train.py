"""Architectures, training, distillation, evaluation and train_model's conversion to a Network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunecert.data import load_dataset
from prunecert.errors import ConfigError, DataError, ShapeMismatchError
from prunecert.network import Network, mlp as ir_mlp
from prunecert.train import (build_arch, distillation_loss, evaluate, fit, lenet_300_100, mlp, small_vgg,
                             train_model)

IR_OPS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.AvgPool2d)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _ir_copy(module: nn.Sequential) -> Network:
    """The same MLP as an IR Network, built by hand (independent of io.torch_io)."""
    linears = [m for m in module if isinstance(m, nn.Linear)]
    return ir_mlp([m.weight.detach().numpy() for m in linears], [m.bias.detach().numpy() for m in linears])


# ----------------------------------------------------------------------------- architectures
def test_lenet_300_100_shape_and_size():
    m = lenet_300_100()
    assert [l.out_features for l in m if isinstance(l, nn.Linear)] == [300, 100, 10]
    assert sum(p.numel() for p in m.parameters()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 12, 10)])
def test_small_vgg_uses_only_ir_ops(shape):
    m = small_vgg(shape, classes=7)
    assert all(isinstance(layer, IR_OPS) for layer in m)
    assert not any(isinstance(layer, nn.MaxPool2d) for layer in m.modules())
    assert m(torch.zeros(2, *shape)).shape == (2, 7)


def test_build_arch_errors():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet'.*lenet300.*vgg-small"):
        build_arch("resnet", (1, 28, 28), 10)
    with pytest.raises(ShapeMismatchError, match="vgg-small needs"):
        build_arch("vgg-small", (64,), 10)
    with pytest.raises(ShapeMismatchError, match="too small"):
        small_vgg((1, 3, 3))
    assert build_arch("lenet300", (1, 8, 8), 10)[1].in_features == 64


# ----------------------------------------------------------------------------- training
def test_fit_learns_and_is_reproducible(digits):
    torch.manual_seed(0)
    a = mlp(64, (32, 16), 10)
    init = _state(a)
    kwargs = dict(epochs=4, lr=1e-2, batch_size=32, progress=False)
    before = evaluate(a, digits.x_test, digits.y_test)
    fit(a, digits, seed=3, **kwargs)
    after = evaluate(a, digits.x_test, digits.y_test)
    assert before < 0.3 and after > 0.9
    assert not a.training

    b = mlp(64, (32, 16), 10)
    b.load_state_dict(init)
    fit(b, digits, seed=3, **kwargs)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())

    c = mlp(64, (32, 16), 10)
    c.load_state_dict(init)
    fit(c, digits, seed=4, **kwargs)  # only the batch order differs
    assert not torch.equal(a.state_dict()["1.weight"], c.state_dict()["1.weight"])


def test_fit_accepts_arrays_and_shows_progress(digits, capsys):
    torch.manual_seed(0)
    m = mlp(64, (8,), 10)
    fit(m, (digits.x_train[:200], digits.y_train[:200]), epochs=2, progress=True)
    assert "train epochs" in capsys.readouterr().err


def test_evaluate_module_and_network_agree(digits):
    torch.manual_seed(1)
    m = mlp(64, (20, 12), 10)
    fit(m, digits, epochs=2, progress=False)
    net = _ir_copy(m)
    acc = evaluate(m, digits.x_test, digits.y_test)
    assert acc == evaluate(net, digits.x_test, digits.y_test)
    pred = m(torch.from_numpy(np.array(digits.x_test))).argmax(1).numpy()
    assert acc == pytest.approx(np.mean(pred == digits.y_test))
    with pytest.raises(DataError, match="3 inputs but 2 labels"):
        evaluate(m, digits.x_test[:3], digits.y_test[:2])


@pytest.mark.parametrize("kwargs,message", [
    ({"epochs": 0}, "epochs must be >= 1"), ({"lr": -1.0}, "learning rate"), ({"batch_size": 0}, "batch size"),
    ({"temperature": 0.0}, "temperature"), ({"alpha": 1.5}, "alpha must lie in"),
])
def test_fit_config_errors(digits, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fit(mlp(64, (4,), 10), digits, **kwargs, progress=False)


def test_fit_shape_errors(digits):
    with pytest.raises(ShapeMismatchError, match=r"model: cannot take inputs of shape \(1, 8, 8\)"):
        fit(lenet_300_100(784, 10), digits, epochs=1, progress=False)
    with pytest.raises(ShapeMismatchError, match="does not cover the 10 classes"):
        fit(mlp(64, (4,), 3), digits, epochs=1, progress=False)
    with pytest.raises(ShapeMismatchError, match="teacher"):
        fit(mlp(64, (4,), 10), digits, epochs=1, teacher=mlp(64, (4,), 12), progress=False)
    with pytest.raises(DataError, match="need x of shape"):
        fit(mlp(64, (4,), 10), (digits.x_train[:5], digits.y_train[:4]), epochs=1, progress=False)


# ----------------------------------------------------------------------------- distillation
def test_distillation_loss_properties():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    assert distillation_loss(t, t, y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(16, 10, generator=g)
    assert distillation_loss(s, t, y, 4.0, 1.0).item() > 0
    assert distillation_loss(s, t, y, 2.0, 0.0).item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())


@pytest.fixture(scope="module")
def teacher(digits):
    torch.manual_seed(0)
    return fit(mlp(64, (64, 32), 10), digits, epochs=6, lr=1e-2, batch_size=32, seed=0, progress=False)


def test_distillation_follows_the_teacher_not_the_labels(digits, teacher):
    """alpha=1 ignores the labels: scrambled labels give the same student; the student mimics the teacher."""
    rng = np.random.default_rng(0)
    scrambled = rng.permutation(digits.y_train)
    students = []
    for labels in (digits.y_train, scrambled):
        torch.manual_seed(5)
        students.append(fit(mlp(64, (16,), 10), (digits.x_train, labels), epochs=6, lr=1e-2, batch_size=32,
                            seed=1, teacher=teacher, alpha=1.0, progress=False))
    assert all(torch.equal(students[0].state_dict()[k], v) for k, v in students[1].state_dict().items())
    x = torch.from_numpy(np.array(digits.x_test))
    agree = np.mean((students[0](x).argmax(1) == teacher(x).argmax(1)).numpy())
    assert agree > 0.85
    # trained on scrambled labels alone, the same student learns nothing
    torch.manual_seed(5)
    blind = fit(mlp(64, (16,), 10), (digits.x_train, scrambled), epochs=6, lr=1e-2, batch_size=32, seed=1,
                progress=False)
    assert evaluate(blind, digits.x_test, digits.y_test) < 0.3 < evaluate(students[1], digits.x_test, digits.y_test)


def test_network_teacher_equals_module_teacher(digits, teacher):
    runs = []
    for t in (teacher, _ir_copy(teacher)):
        torch.manual_seed(2)
        runs.append(fit(mlp(64, (12,), 10), digits, epochs=2, seed=0, teacher=t, progress=False))
    for k, v in runs[0].state_dict().items():
        torch.testing.assert_close(runs[1].state_dict()[k], v, rtol=1e-4, atol=1e-5)
    assert teacher.training is False


# ----------------------------------------------------------------------------- train_model
def test_train_model_converts_and_records_provenance(digits):
    net = train_model("lenet300", "digits", epochs=3, seed=7, lr=5e-3, progress=False)
    assert isinstance(net, Network) and net.input_shape == (1, 8, 8)
    lo, hi = net.domain()
    assert lo.min() == 0.0 and hi.max() == 1.0
    record = net.metadata["training"]
    assert record["arch"] == "lenet300" and record["dataset"] == "digits" and record["seed"] == 7
    assert record["epochs"] == 3 and record["lr"] == 5e-3
    assert record["test_accuracy"] == evaluate(net, digits.x_test, digits.y_test) > 0.9
    # the same seed reproduces the same weights; the Network equals the trained module
    again = train_model("lenet300", "digits", epochs=3, seed=7, lr=5e-3, progress=False)
    for a, b in zip(net.ops, again.ops):
        for key, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[key])
    torch.manual_seed(7)
    module = fit(build_arch("lenet300", (1, 8, 8), 10), digits, epochs=3, seed=7, lr=5e-3, progress=False)
    x = torch.from_numpy(np.array(digits.x_test[:50]))
    torch.testing.assert_close(net.forward(x.double()), module(x).double(), rtol=1e-4, atol=1e-4)


def test_train_model_vgg_small(digits):
    net = train_model("vgg-small", "digits", epochs=1, seed=0, progress=False)
    kinds = [op.kind for op in net.ops]
    assert "conv2d" in kinds and "avgpool2d" in kinds and net.output_shape == (10,)
    assert net.metadata["training"]["test_accuracy"] == evaluate(net, digits.x_test, digits.y_test)


def test_train_model_unknown_arch_fails_before_loading_data():
    with pytest.raises(ConfigError, match="unknown architecture"):
        train_model("resnet", "no-such-data", epochs=1, progress=False)
