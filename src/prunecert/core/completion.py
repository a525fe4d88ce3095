"""Completion: a compact pruned network mapped back onto its original's shape (DESIGN §3).

A removed neuron keeps the original's incoming weights and bias and gets zero outgoing weights, so
the completed network computes exactly the compact one's function while every neuron of the original
has a twin: certification and attacks pair them coordinate by coordinate.

The pruning record comes from a file, i.e. it is untrusted: every mismatch (weights hash, layer count,
kept indices out of range or unsorted, shapes) is a `PairingError` naming the layer and the problem.
"""

from __future__ import annotations

import numbers
from typing import cast

import torch

from prunecert.core.pair import Pair, architecture_mismatch
from prunecert.core.surgery import _next_in, cut_layer, layer_spans
from prunecert.errors import ConfigError, PairingError
from prunecert.io import weights_sha256
from prunecert.network import Conv2d, Linear, Network, Op


def _kept_lists(pruned: Network, original: Network) -> dict[int, list[int]]:
    """Validated kept indices per hidden layer of the original (all neurons for layers without a record)."""
    rec = (pruned.metadata or {}).get("pruning")
    if not isinstance(rec, dict) or not isinstance(rec.get("layers"), list):
        raise PairingError(f"{pruned.name}: no pruning record (metadata['pruning']['layers']) to complete it with")
    spans_o, spans_p = layer_spans(original), layer_spans(pruned)
    if len(spans_o) != len(spans_p):
        raise PairingError(f"{pruned.name} has {len(spans_p)} layers but its original {original.name} has "
                           f"{len(spans_o)}")
    hidden = [s.index for s in spans_o if s.relu]
    kept: dict[int, list[int]] = {}
    for r in rec["layers"]:
        index = r.get("index") if isinstance(r, dict) else None
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or int(index) not in hidden:
            raise PairingError(f"{pruned.name}: pruning record names layer {index!r}, not a hidden layer of "
                               f"{original.name} (hidden: {hidden})")
        index = int(index)
        n = _neurons(original, spans_o[index].stop - 1, index)
        ks = r.get("kept")
        if not isinstance(ks, list) or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in ks):
            raise PairingError(f"{pruned.name}: layer {index} kept indices must be a list of ints, got {ks!r:.80}")
        ks = [int(k) for k in ks]
        if not ks or any(k < 0 or k >= n for k in ks):
            bad = [k for k in ks if k < 0 or k >= n][:5]
            raise PairingError(f"{pruned.name}: layer {index} kept indices {bad or ks} out of range for the "
                               f"original's {n} neurons")
        if any(b <= a for a, b in zip(ks, ks[1:])):
            raise PairingError(f"{pruned.name}: layer {index} kept indices are not strictly increasing")
        if index in kept:
            raise PairingError(f"{pruned.name}: layer {index} appears twice in the pruning record")
        kept[index] = ks
    for index in hidden:
        ks = kept.setdefault(index, list(range(_neurons(original, spans_o[index].stop - 1, index))))
        have = _neurons(pruned, spans_p[index].stop - 1, index)
        if have != len(ks):
            raise PairingError(f"{pruned.name}: layer {index} has {have} neurons but the pruning record keeps "
                               f"{len(ks)} of the original's")
    return kept


def _neurons(net: Network, op_index: int, layer: int) -> int:
    op = net.ops[op_index]
    if not isinstance(op, (Linear, Conv2d)):
        raise PairingError(f"{net.name}: layer {layer} ends with {op.kind}, not a Linear/Conv2d: cannot map neurons")
    return int(op.weight.shape[0])


def _check_hash(pruned: Network, original: Network) -> None:
    """Checked first: a pair of unrelated models is named as such, not as an index out of range."""
    rec = (pruned.metadata or {}).get("pruning")
    if not isinstance(rec, dict):
        return
    want = rec.get("original_weights_sha256")
    if want is not None and want != weights_sha256(original):
        name = rec.get("original_name")
        raise PairingError(f"{pruned.name} was pruned from " + (f"{name!r} " if name else "a network ")
                           + f"(weights sha256 {str(want)[:12]}...), not from {original.name} "
                           f"({weights_sha256(original)[:12]}...): the two models are not a pair")


def _expected_compact(original: Network, kept: dict[int, list[int]]) -> Network:
    g = original
    for index, ks in kept.items():
        g = cut_layer(g, index, torch.as_tensor(ks).numpy(), torch.ones(len(ks), dtype=torch.float64).numpy())
    return g


def _widen(op_o: Linear | Conv2d, op_p: Linear | Conv2d, rows: list[int] | None,
           cols: tuple[list[int], int] | None) -> Linear | Conv2d:
    """op_o's tensors with the kept rows replaced by op_p's, zero on the removed input channels.

    `cols` = (kept input channels, the original's channel count): a Linear's columns come in equal
    blocks per channel (one column each, or H*W after a Flatten), a Conv2d's are its input channels.
    """
    w, b = op_o.weight.clone(), op_o._bias.clone()
    r = torch.arange(w.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if cols is None:
        block = op_p.weight.clone()
    else:
        c = torch.as_tensor(cols[0], dtype=torch.long)
        block = torch.zeros((len(r), cols[1], *w.shape[2:]) if isinstance(op_o, Conv2d)
                            else (len(r), cols[1], w.shape[1] // cols[1]), dtype=torch.float64)
        block[:, c] = op_p.weight.reshape(len(r), len(c), *block.shape[2:])
        block = block.reshape(len(r), *w.shape[1:])
    w[r] = block
    b[r] = op_p._bias
    if isinstance(op_o, Linear):
        return Linear(w, b, name="completed.linear")
    return Conv2d(w, b, op_o.in_shape, op_o.stride, op_o.padding, name="completed.conv2d")


def complete(pruned: Network, original: Network) -> Network:
    """The compact `pruned` network on `original`'s architecture, computing the same function."""
    _check_hash(pruned, original)
    kept = _kept_lists(pruned, original)
    problem = architecture_mismatch(_expected_compact(original, kept), pruned)
    if problem is not None:
        raise PairingError(f"{pruned.name} does not match {original.name} with its recorded kept neurons: {problem}")
    spans = layer_spans(original)
    rows_of: dict[int, list[int]] = {}
    cols_of: dict[int, tuple[list[int], int]] = {}
    for index, ks in kept.items():
        rows_of[spans[index].stop - 1] = ks
        cols_of[_next_in(original, spans[index])[0]] = (ks, _neurons(original, spans[index].stop - 1, index))
    ops: list[Op] = []
    for i, (op_o, op_p) in enumerate(zip(original.ops, pruned.ops)):
        if isinstance(op_o, (Linear, Conv2d)):
            # architecture_mismatch above: op_p is the same kind of op as op_o
            ops.append(_widen(op_o, cast(Linear | Conv2d, op_p), rows_of.get(i), cols_of.get(i)))
        elif op_o.kind == "scale":
            ops.append(op_p)  # same shape in both (never cut): keep the pruned network's values
        else:
            ops.append(op_o)
    meta = dict(pruned.metadata)
    meta["completed_from"] = pruned.name
    return Network(ops, original.input_shape, original.input_lo, original.input_hi,
                   name=f"{pruned.name}-completed", metadata=meta)


def pair_of(original: Network | Pair, pruned: Network | None) -> Pair:
    """`original` itself when it is a Pair (and `pruned` is None), else `make_pair(original, pruned)`."""
    if isinstance(original, Pair):
        if pruned is not None:
            raise ConfigError(f"got a Pair and a pruned network ({pruned.name}); pass the Pair alone "
                              f"(pruned=None), or the original and the pruned network")
        return original
    if pruned is None:
        raise ConfigError(f"no pruned network to pair with {original.name}; pass it, or a Pair alone")
    return make_pair(original, pruned)


def make_pair(original: Network, pruned: Network) -> Pair:
    """Pair `original` with `pruned`, completing a compact pruned network onto the original's shape."""
    problem = architecture_mismatch(original, pruned)
    if problem is None:
        return Pair(original, pruned)
    if "pruning" not in (pruned.metadata or {}):
        raise PairingError(f"cannot pair {original.name} with {pruned.name}: {problem}; {pruned.name} has no "
                           f"pruning metadata (kept neuron indices) to map it onto the original's shape")
    try:
        completed = complete(pruned, original)
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # the record comes from an untrusted file
        raise PairingError(f"cannot complete {pruned.name} onto {original.name}: malformed or inconsistent "
                           f"pruning record ({type(exc).__name__}: {exc})") from exc
    problem = architecture_mismatch(original, completed)
    if problem is not None:
        raise PairingError(f"completing {pruned.name} onto {original.name} did not give the original's "
                           f"architecture: {problem}")
    return Pair(original, completed)
