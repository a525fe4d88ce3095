"""Shared test helpers: random small (original, twin) pairs, random boxes, sampled deviations.

Every bound method's soundness test draws pairs here so all methods face the same population:
2-3 hidden layers of 2-12 neurons, twins that are pruned (completed: zero outgoing weights, kept
columns re-scaled), quantised (weights rounded to a coarse per-layer grid) or perturbed (Gaussian
noise). Inputs live in the domain [0, 1]^n_in; boxes are random sub-boxes of it.

Usage in a test::

    from pairs import pairs_and_boxes, sample_deltas
    @given(pairs_and_boxes())
    def test_sound(case):
        pair, lo, hi = case
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
from hypothesis import strategies as st

from prunecert.core.pair import Pair
from prunecert.network import AvgPool2d, Conv2d, Flatten, Linear, Network, ReLU, Scale, relu_between

TWINS = ("prune", "quantise", "perturb")


def _twin_weights(rng: np.random.Generator, weights: list[np.ndarray], biases: list[np.ndarray], twin: str
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The twin's weights for dense/conv layers given as (out, ...) arrays."""
    w2 = [w.copy() for w in weights]
    b2 = [b.copy() for b in biases]
    if twin == "prune":
        # remove neurons of each hidden layer: zero their outgoing weights; re-scale the kept ones
        for l in range(len(weights) - 1):
            n = weights[l].shape[0]
            keep = rng.random(n) < rng.uniform(0.3, 0.9)
            keep[rng.integers(n)] = True
            scale = np.where(keep, rng.uniform(0.7, 1.5, size=n), 0.0)
            if w2[l + 1].ndim == 2 and w2[l + 1].shape[1] != n:  # conv channels -> flatten (C, H, W) -> dense
                scale = np.repeat(scale, w2[l + 1].shape[1] // n)
                n = len(scale)
            shape = [1, n] + [1] * (w2[l + 1].ndim - 2)
            w2[l + 1] = w2[l + 1] * scale.reshape(shape)
    elif twin == "quantise":
        for l, w in enumerate(weights):
            step = max(np.abs(w).max(), 1e-12) / 7.0  # 4-bit symmetric grid
            w2[l] = np.round(w / step) * step
            b2[l] = np.round(biases[l] / step) * step
    elif twin == "perturb":
        for l, w in enumerate(weights):
            s = rng.uniform(0.01, 0.2) * (np.abs(w).mean() + 1e-12)
            w2[l] = w + rng.normal(0, s, size=w.shape)
            b2[l] = biases[l] + rng.normal(0, s, size=biases[l].shape)
    elif twin == "same":
        pass
    else:
        raise ValueError(f"unknown twin kind {twin!r}")
    return w2, b2


def random_mlp_weights(rng: np.random.Generator, n_in: int, hidden: Sequence[int], n_out: int
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    sizes = [n_in, *hidden, n_out]
    ws, bs = [], []
    for a, b in zip(sizes[:-1], sizes[1:]):
        ws.append(rng.normal(0, 1.0 / np.sqrt(a), size=(b, a)))
        bs.append(rng.normal(0, 0.3, size=b))
    return ws, bs


def _mlp(ws, bs, name: str) -> Network:
    ops = [Linear(w, b, name=f"{name}.fc{i}") for i, (w, b) in enumerate(zip(ws, bs))]
    return Network(relu_between(ops), (ws[0].shape[1],), 0.0, 1.0, name=name)


def random_pair(rng: np.random.Generator, n_in: int = 3, hidden: Sequence[int] = (6, 5), n_out: int = 3,
                twin: str = "prune") -> Pair:
    """A random fully connected pair on [0, 1]^n_in; `twin` in prune | quantise | perturb | same."""
    ws, bs = random_mlp_weights(rng, n_in, hidden, n_out)
    w2, b2 = _twin_weights(rng, ws, bs, twin)
    return Pair(_mlp(ws, bs, "f"), _mlp(w2, b2, f"g_{twin}"))


def random_conv_pair(rng: np.random.Generator, twin: str = "perturb", in_shape=(1, 6, 6), norm: bool = True) -> Pair:
    """A small conv pair: Scale -> Conv(3x3,pad 1) -> ReLU -> AvgPool,Conv(3x3) -> ReLU -> Flatten,Linear
    (`norm` False: no Scale, the first conv acts on the input itself)."""
    c, h, w = in_shape
    c1, c2, n_out = 3, 2, 3
    k1 = rng.normal(0, 1 / np.sqrt(9 * c), size=(c1, c, 3, 3))
    k2 = rng.normal(0, 1 / np.sqrt(9 * c1), size=(c2, c1, 3, 3))
    pooled = (h // 2, w // 2)
    conv2_out = (pooled[0] - 2, pooled[1] - 2)
    n_flat = c2 * conv2_out[0] * conv2_out[1]
    fc = rng.normal(0, 1 / np.sqrt(n_flat), size=(n_out, n_flat))
    ws = [k1, k2, fc]
    bs = [rng.normal(0, 0.2, size=c1), rng.normal(0, 0.2, size=c2), rng.normal(0, 0.2, size=n_out)]
    scale, shift = rng.uniform(0.5, 2.0, size=(c, 1, 1)), rng.normal(0, 0.2, size=(c, 1, 1))
    w2, b2 = _twin_weights(rng, ws, bs, twin)

    def build(ws, bs, name):
        s = Scale(scale, shift, in_shape, name=f"{name}.norm")
        conv1 = Conv2d(ws[0], bs[0], in_shape, stride=1, padding=1, name=f"{name}.conv1")
        pool = AvgPool2d(2, conv1.out_shape)
        conv2 = Conv2d(ws[1], bs[1], pool.out_shape, name=f"{name}.conv2")
        flat = Flatten(conv2.out_shape)
        lin = Linear(ws[2], bs[2], name=f"{name}.fc")
        ops = ([s] if norm else []) + [conv1, ReLU(conv1.out_shape), pool, conv2, ReLU(conv2.out_shape), flat, lin]
        return Network(ops, in_shape, 0.0, 1.0, name=name)

    return Pair(build(ws, bs, "f"), build(w2, b2, f"g_{twin}"))


def random_box(rng: np.random.Generator, n_in: int | Sequence[int], lo: float = 0.0, hi: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """A random sub-box of [lo, hi]^shape (float64), sometimes a thin one, sometimes the whole domain."""
    shape = (n_in,) if isinstance(n_in, (int, np.integer)) else tuple(n_in)
    kind = rng.integers(4)
    if kind == 0:
        return np.full(shape, lo, dtype=np.float64), np.full(shape, hi, dtype=np.float64)
    centre = rng.uniform(lo, hi, size=shape)
    eps = rng.uniform(0.001, 0.05) if kind == 1 else rng.uniform(0.05, 0.5)
    return np.clip(centre - eps, lo, hi), np.clip(centre + eps, lo, hi)


def sample_points(lo, hi, n: int, seed: int = 0) -> torch.Tensor:
    """`n` float64 points of the box [lo, hi]: the centre, random corners, uniform interior points.

    `lo`/`hi` have the input shape (a single box); the result has shape (n, *shape).
    """
    lo_t = torch.as_tensor(np.asarray(lo), dtype=torch.float64)
    hi_t = torch.as_tensor(np.asarray(hi), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    n_corner = n // 4
    corners = torch.where(torch.rand((n_corner, *lo_t.shape), generator=gen, dtype=torch.float64) < 0.5, lo_t, hi_t)
    inner = lo_t + (hi_t - lo_t) * torch.rand((n - n_corner - 1, *lo_t.shape), generator=gen, dtype=torch.float64)
    centre = ((lo_t + hi_t) / 2).unsqueeze(0)
    return torch.cat([centre, corners, inner]).clamp(lo_t, hi_t)


def sample_deltas(pair: Pair, lo, hi, n: int = 2000, seed: int = 0, local: bool = False
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (min, max) over `n` sampled points of Delta_l (end-to-end, or local if `local`).

    Each entry has shape (*out_shape_l). Any sound bound must contain these: lower <= min, max <= upper.
    """
    x = sample_points(lo, hi, n, seed)
    with torch.no_grad():
        ds = pair.local_deltas(x) if local else pair.deltas(x)
    return [(d.min(0).values, d.max(0).values) for d in ds]


SAMPLE_RTOL = 1e-9  # float64 evaluation of a sample is itself rounded (bounds are for exact arithmetic)


def assert_contains(bounds_lower: torch.Tensor, bounds_upper: torch.Tensor, sampled: tuple, what: str = "",
                    rtol: float = SAMPLE_RTOL) -> None:
    """Sampled (min, max) must lie inside [lower, upper] (shapes (*shape) or (1, *shape)).

    `rtol` (relative to 1 + |value|) only absorbs the rounding of the samples' float64 forward pass;
    the exact-arithmetic tests in test_certify_diff_interval.py check the margins without slack.
    """
    lo, hi = bounds_lower.reshape(sampled[0].shape), bounds_upper.reshape(sampled[1].shape)
    bad_lo = (lo > sampled[0] + rtol * (1 + sampled[0].abs())).nonzero()
    bad_hi = (hi < sampled[1] - rtol * (1 + sampled[1].abs())).nonzero()
    assert len(bad_lo) == 0, f"{what}: lower bound above a sampled value at {bad_lo[0].tolist()}: " \
                             f"{lo[tuple(bad_lo[0])]} > {sampled[0][tuple(bad_lo[0])]}"
    assert len(bad_hi) == 0, f"{what}: upper bound below a sampled value at {bad_hi[0].tolist()}: " \
                             f"{hi[tuple(bad_hi[0])]} < {sampled[1][tuple(bad_hi[0])]}"


@st.composite
def pairs_and_boxes(draw, twins: Sequence[str] = TWINS, max_in: int = 4, max_hidden: int = 12):
    """Hypothesis strategy yielding (pair, lo, hi): a random small pair and a box in its domain."""
    seed = draw(st.integers(0, 2**32 - 1))
    n_in = draw(st.integers(1, max_in))
    hidden = draw(st.lists(st.integers(2, max_hidden), min_size=2, max_size=3))
    n_out = draw(st.integers(2, 4))
    twin = draw(st.sampled_from(list(twins)))
    rng = np.random.default_rng(seed)
    pair = random_pair(rng, n_in, hidden, n_out, twin)
    lo, hi = random_box(rng, n_in)
    return pair, lo, hi


def ascend_deltas(pair: Pair, lo, hi, restarts: int = 4, steps: int = 40, seed: int = 0, local: bool = False,
                  layers: Sequence[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (min, max) of Delta_l found by projected sign-gradient ascent on every coordinate.

    All (layer, coordinate, direction, restart) problems run as one batch; a stronger lower estimate of
    the true extremes than sampling (a sound bound must still contain them). `layers` limits the
    coordinates ascended (every layer's values are still recorded along the way).
    """
    lo_t = torch.as_tensor(np.asarray(lo), dtype=torch.float64)
    hi_t = torch.as_tensor(np.asarray(hi), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(np.prod(l.out_shape)) for l in pair.layers_f]
    chosen = {l % len(sizes) for l in (range(len(sizes)) if layers is None else layers)}
    rows = [(l, k, s) for l, n in enumerate(sizes) if l in chosen for k in range(n) for s in (1.0, -1.0)]
    n = len(rows) * restarts
    layer_idx = torch.tensor([r[0] for r in rows] * restarts)
    coord = torch.tensor([r[1] for r in rows] * restarts)
    sign = torch.tensor([r[2] for r in rows] * restarts, dtype=torch.float64)
    x = lo_t + (hi_t - lo_t) * torch.rand((n, *lo_t.shape), generator=gen, dtype=torch.float64)
    step = (hi_t - lo_t) / 8
    fn = pair.local_deltas if local else pair.deltas

    def objective(x):
        ds = [d.reshape(len(x), -1) for d in fn(x)]
        val = torch.zeros(len(x), dtype=torch.float64)
        for l, d in enumerate(ds):
            mask = layer_idx == l
            val = torch.where(mask, d.gather(1, coord.clamp(max=d.shape[1] - 1)[:, None]).squeeze(1), val)
        return val, ds

    best = [(torch.full((s,), torch.inf, dtype=torch.float64), torch.full((s,), -torch.inf, dtype=torch.float64))
            for s in sizes]
    for i in range(steps + 1):
        x = x.detach().requires_grad_(True)
        val, ds = objective(x)
        for l, d in enumerate(ds):
            d = d.detach()
            best[l] = (torch.minimum(best[l][0], d.min(0).values), torch.maximum(best[l][1], d.max(0).values))
        if i == steps:
            break
        (grad,) = torch.autograd.grad((sign * val).sum(), x)
        with torch.no_grad():
            x = torch.maximum(torch.minimum(x + step * (1 - i / steps) * grad.sign(), hi_t), lo_t)
    return [(b[0].reshape(l.out_shape), b[1].reshape(l.out_shape)) for b, l in zip(best, pair.layers_f)]


def extremes(pair: Pair, lo, hi, n: int = 2000, seed: int = 0, local: bool = False,
             layers: Sequence[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (min, max) of Delta_l over dense samples and gradient ascent together."""
    a = sample_deltas(pair, lo, hi, n, seed, local)
    b = ascend_deltas(pair, lo, hi, seed=seed, local=local, layers=layers)
    return [(torch.minimum(x[0], y[0]), torch.maximum(x[1], y[1])) for x, y in zip(a, b)]


def exact_layers(net, x) -> list[list[Fraction]]:
    """Pre-activations of an MLP in exact rational arithmetic."""
    h = [Fraction(float(v)) for v in x]
    out = []
    for op in net.ops:
        if op.kind == "relu":
            h = [max(v, Fraction(0)) for v in h]
            continue
        w, b = op.weight.numpy(), op.bias.numpy()
        h = [sum((Fraction(float(w[r, c])) * h[c] for c in range(len(h))), Fraction(float(b[r])))
             for r in range(w.shape[0])]
        out.append(h)
    return out
