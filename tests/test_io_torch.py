"""torch interop: nn.Sequential <-> Network, BatchNorm folding, state_dicts with every kind of architecture."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunecert.errors import ModelFormatError, UnsupportedLayerError
from prunecert.io import load_model
from prunecert.io.torch_io import ScaleModule, network_from_module, network_from_state_dict, network_to_module
from prunecert.network import Scale


def _randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen))
            bn.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            bn.weight.data.copy_(torch.randn(n, generator=gen))
            bn.bias.data.copy_(torch.randn(n, generator=gen))
    return module.eval()


def _close(net, module, x, tol=1e-6):
    with torch.no_grad():
        want = module(x)
    assert float((net.forward(x) - want).abs().max()) < tol


def test_batchnorm1d_folding_nested_sequential_dropout_identity():
    torch.manual_seed(1)
    m = nn.Sequential(nn.BatchNorm1d(6),  # no affine op before it: becomes a Scale
                      nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)),
                      nn.ReLU(), nn.Identity(), nn.Linear(8, 3, bias=False), nn.BatchNorm1d(3))
    m = _randomise_bn(m).double()
    net = network_from_module(m, (6,))
    assert [op.kind for op in net.ops] == ["scale", "linear", "relu", "linear"]
    x = torch.rand(11, 6, dtype=torch.float64)
    _close(net, m, x, 1e-12)
    back = network_to_module(net)
    assert next(back.parameters()).dtype == torch.float32
    assert any(isinstance(mod, ScaleModule) for mod in back)
    _close(net, back.double(), x)


def test_batchnorm2d_after_relu_and_conv_stride_padding_pairs():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0)), nn.ReLU(), nn.BatchNorm2d(4),
                      nn.AvgPool2d(2, stride=1, padding=1), nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                      nn.Flatten(), nn.Linear(2 * 4 * 5, 5))
    m = _randomise_bn(m, seed=3).double()
    net = network_from_module(m, (2, 9, 7), lo=-1.0, hi=1.0, name="cnn")
    assert isinstance(net.ops[2], Scale) and net.name == "cnn" and net.domain()[0].min() == -1.0
    x = torch.rand(5, 2, 9, 7, dtype=torch.float64) * 2 - 1
    _close(net, m, x, 1e-10)
    back = network_from_module(network_to_module(net), (2, 9, 7))
    _close(back, m, x)


@pytest.mark.parametrize("layer", [nn.MaxPool2d(2), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(), nn.Conv2d(2, 2, 3, groups=2),
                                   nn.Conv2d(2, 2, 3, dilation=2), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")])
def test_unsupported_modules_named_with_index_and_type(layer):
    m = nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(2, 2, 1), layer))
    with pytest.raises(UnsupportedLayerError, match=rf"module 1\.1 \({type(layer).__name__}\)"):
        network_from_module(m, (2, 8, 8))


def test_nan_weight_in_module_is_refused():
    m = nn.Sequential(nn.Linear(3, 2))
    m[0].weight.data[1, 0] = float("nan")
    with pytest.raises(ModelFormatError, match=r"module 0 \(Linear\)\.weight.*non-finite.*\[1, 0\]"):
        network_from_module(m, (3,))


def test_state_dict_keys_are_matched_by_name_not_order(tmp_path):
    torch.manual_seed(4)
    m = nn.Sequential(*[mod for _ in range(6) for mod in (nn.Linear(4, 4), nn.ReLU())][:-1]).double()
    sd = dict(sorted(m.state_dict().items()))  # "10.weight" sorts before "2.weight"
    assert list(sd)[:2] == ["0.bias", "0.weight"] and list(sd)[2] == "10.bias"
    torch.save(sd, tmp_path / "sorted.pt")
    net = load_model(tmp_path / "sorted.pt")
    _close(net, m, torch.rand(7, 4, dtype=torch.float64), 0.0 + 1e-15)


def test_state_dict_keeps_float64_values_and_checkpoint_wrapper(tmp_path):
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    torch.save({"state_dict": m.state_dict(), "epoch": 7}, tmp_path / "ckpt.pth")
    net = load_model(tmp_path / "ckpt.pth", arch="mlp:5-3-2")
    assert torch.equal(net.ops[0].weight, m[0].weight.detach())  # bit-exact, no float32 detour


def test_state_dict_with_batchnorm_json_arch(tmp_path):
    torch.manual_seed(6)
    m = _randomise_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)))
    torch.save(m.state_dict(), tmp_path / "bn.pt")  # float32 file, with num_batches_tracked
    arch = {"input_shape": [6], "input_lo": -2, "input_hi": 2,
            "layers": [{"type": "linear", "out_features": 5}, {"type": "batchnorm"}, {"type": "relu"},
                       {"type": "linear", "out_features": 2}]}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    net = load_model(tmp_path / "bn.pt", arch=str(tmp_path / "arch.json"))
    assert [op.kind for op in net.ops] == ["linear", "relu", "linear"] and net.domain()[1].max() == 2.0
    x = torch.rand(9, 6) * 4 - 2
    _close(net, m.double(), x.double())


def test_state_dict_errors_name_keys_shapes_and_layers(tmp_path):
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    sd = m.state_dict()
    with pytest.raises(ModelFormatError, match=r"missing keys \['2\.bias'\]"):
        network_from_state_dict({k: v for k, v in sd.items() if k != "2.bias"}, "mlp:4-3-2", "a.pt")
    with pytest.raises(ModelFormatError, match=r"unexpected keys \['4\.weight'\]"):
        network_from_state_dict({**sd, "4.weight": torch.ones(2, 2)}, "mlp:4-3-2", "a.pt")
    with pytest.raises(ModelFormatError, match=r"2\.weight has 3 inputs.*2 outputs"):
        network_from_state_dict({**sd, "0.weight": torch.ones(2, 4), "0.bias": torch.ones(2)}, None, "a.pt")
    with pytest.raises(ModelFormatError, match=r"a\.pt.*non-finite"):
        network_from_state_dict({**sd, "0.bias": torch.tensor([0.0, float("inf"), 0.0])}, None, "a.pt")
    with pytest.raises(ModelFormatError, match="bad architecture 'mlp:4-x-2'"):
        network_from_state_dict(sd, "mlp:4-x-2", "a.pt")
    with pytest.raises(ModelFormatError, match="neither 'mlp:N-N-...' nor a JSON file"):
        network_from_state_dict(sd, str(tmp_path / "missing.json"), "a.pt")
    (tmp_path / "bad.json").write_text('{"input_shape": [4], "layers": [{"type": "lstm"}]}')
    with pytest.raises(UnsupportedLayerError, match="layer 0 has unsupported type 'lstm'"):
        network_from_state_dict(sd, str(tmp_path / "bad.json"), "a.pt")
    (tmp_path / "broken.json").write_text('{"input_shape": [4], "layers": [')
    with pytest.raises(ModelFormatError, match="broken.json: malformed architecture JSON"):
        network_from_state_dict(sd, str(tmp_path / "broken.json"), "a.pt")
    with pytest.raises(ModelFormatError, match="cannot infer the architecture"):
        network_from_state_dict({"0.weight": torch.ones(2, 1, 3, 3)}, None, "c.pt")
    with pytest.raises(ModelFormatError, match="state_dict of tensors"):
        network_from_state_dict([torch.ones(2)], None, "l.pt")


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 8), min_size=2, max_size=5), seed=st.integers(0, 2**31 - 1),
       flatten=st.booleans())
def test_random_mlp_module_and_state_dict_roundtrip_property(tmp_path_factory, sizes, seed, flatten):
    torch.manual_seed(seed)
    mods = [nn.Flatten()] if flatten else []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        mods += ([nn.ReLU()] if i else []) + [nn.Linear(a, b)]
    m = nn.Sequential(*mods).double()
    x = torch.rand(4, sizes[0], dtype=torch.float64)
    net = network_from_module(m, (sizes[0],))
    _close(net, m, x, 1e-12)
    _close(net, network_to_module(net).double(), x, 1e-6)
    path = tmp_path_factory.mktemp("sd") / "m.pt"
    torch.save(m.state_dict(), path)
    arch = "mlp:" + "-".join(map(str, sizes))
    for a in (None, arch):
        _close(load_model(path, arch=a), m, x, 1e-12)
