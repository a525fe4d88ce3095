"""What bound methods return (`PairBounds`) and what users get (`CertifyResult`, JSON schema 1).

`PairBounds` is the common currency of every method (naive, diff-interval, diff-linear, LP, MILP,
BaB): per layer l, float64 tensors of shape (B, *out_shape_l) over a batch of B regions. Methods can
be combined by `intersect` (both sound, so the intersection is sound).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt
import torch

from prunecert.certify.verdicts import Agreement, ClassTally, combine_verdicts
from prunecert.core.interval import Bounds

SCHEMA = "prunecert.certify/1"
Array = npt.NDArray[np.float64]


def sub_bounds(a: Bounds, b: Bounds) -> Bounds:
    """Sound bounds of (x - y) for x in a, y in b: one-ulp outward rounding of each difference."""
    lo = torch.nextafter(a.lower - b.upper, torch.full_like(a.lower, -torch.inf))
    hi = torch.nextafter(a.upper - b.lower, torch.full_like(a.upper, torch.inf))
    return Bounds(lo, hi)


def meet(a: Bounds, b: Bounds) -> Bounds:
    """Intersection of two sound bounds on the same quantity."""
    return Bounds(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


class MilpRegionInfo(TypedDict):
    """One region's MILP record (`PairBounds.info["milp"][b]`, written by `milp_bounds`)."""

    binaries: int            # binary columns of the big-M model
    solved: int              # MILPs run
    skipped: int             # coordinates whose bound could not beat the reached max |Delta| (max_abs_only)
    statuses: list[str]      # per coordinate: the solve's status, or "not_started" when out of time
    reached_max_abs: float   # the largest |Delta| reached at a point
    unsound_events: int      # dual bounds refuted by a reached value (see milp.REFUTED)
    closed: bool             # every solve ended "optimal"


class BabRegionInfo(TypedDict):
    """One region's branch-and-bound record (`PairBounds.info["bab"][b]`, written by `bab_bounds`)."""

    nodes: int              # boxes or LP nodes bounded
    open: int               # leaves still open when it stopped
    upper: float            # the certified bound on max_k |Delta_k|
    reached: float          # the largest value reached at an evaluated point
    finished: bool          # upper within rel_gap of reached
    point: Array | None     # where `reached` was reached
    branching: str          # "input", "relu" or "none" (the fast bounds already decided)
    stop: str | None        # why it stopped (see `bab_input.stop_reason`)
    steps: NotRequired[int]       # input splits: bisection rounds
    seconds: NotRequired[float]   # set by bab_bounds


class MethodInfo(TypedDict, total=False):
    """What a bound method reports beside the bounds; the per-region lists have one entry per region."""

    method: str
    optimized: bool                  # diff-linear: the logits' Delta relaxation was optimised
    local_is_delta: list[bool]       # diff-linear/crown-diff passes, per layer: local deviation = Delta there
    diff_optimized: bool             # diff-linear, alpha-crown-diff: the logits' f/g slopes were optimised
    truncated: list[bool]            # the time limit cut the method short (see `truncated_regions`)
    complete: list[bool]             # lp, milp, bab: the LP pass finished before its deadline
    solves: list[int]                # lp, milp, bab: LPs solved
    milp: list[MilpRegionInfo]
    bab: list[BabRegionInfo]


@dataclass
class PairBounds:
    """Bounds over a batch of B regions, per layer l (the last is the logits).

    - `f[l]`, `g[l]`: each network's pre-activations a_l,
    - `delta[l]`: end-to-end Delta_l = a_l^f - a_l^g,
    - `local[l]`: a_l^f(x) - L_l^g(h_{l-1}^f(x)), the error layer l's own weights add (local[0] = delta[0]),
    - `margin_lower` (optional, (B, C, C)): entry [b, c, j] is a lower bound on *both* f_c - f_j and
      g_c - g_j over region b (the diagonal is meaningless). Agreement is proved on region b when
      some c has margin_lower[b, c, j] > 0 for every j != c.
    """

    f: list[Bounds]
    g: list[Bounds]
    delta: list[Bounds]
    local: list[Bounds]
    margin_lower: torch.Tensor | None = None
    info: MethodInfo = field(default_factory=lambda: MethodInfo())

    @property
    def n_layers(self) -> int:
        return len(self.delta)

    @property
    def batch(self) -> int:
        return int(self.delta[-1].lower.shape[0])

    def intersect(self, other: PairBounds, index: torch.Tensor | None = None) -> PairBounds:
        """Element-wise intersection with another sound result for the same pair and regions; with
        `index`, `other` bounds only those regions of this batch (the others keep this result's bounds)."""
        if index is not None:
            other = self._placed(other, index)
        if self.margin_lower is None or other.margin_lower is None:
            margin = self.margin_lower if other.margin_lower is None else other.margin_lower
        else:
            margin = torch.maximum(self.margin_lower, other.margin_lower)
        return PairBounds([meet(a, b) for a, b in zip(self.f, other.f)],
                          [meet(a, b) for a, b in zip(self.g, other.g)],
                          [meet(a, b) for a, b in zip(self.delta, other.delta)],
                          [meet(a, b) for a, b in zip(self.local, other.local)],
                          margin, {**other.info, **self.info})

    def _placed(self, part: PairBounds, index: torch.Tensor) -> PairBounds:
        """`part` (bounds of the regions `index` of this batch) spread over the batch: infinite bounds
        elsewhere, and there this result's own agreement margins."""
        b = self.batch

        def put(ps: list[Bounds]) -> list[Bounds]:
            out = []
            for p in ps:
                lo = p.lower.new_full((b, *p.lower.shape[1:]), -torch.inf)
                up = p.upper.new_full((b, *p.upper.shape[1:]), torch.inf)
                lo[index], up[index] = p.lower, p.upper
                out.append(Bounds(lo, up))
            return out
        margin = None
        if part.margin_lower is not None:
            margin = self.agreement_margins().clone()
            margin[index] = part.margin_lower
        return PairBounds(put(part.f), put(part.g), put(part.delta), put(part.local), margin, part.info.copy())

    def select(self, index: slice | torch.Tensor) -> PairBounds:
        """The bounds of a subset of the batch (a slice or an index tensor)."""
        def pick(bs: list[Bounds]) -> list[Bounds]:
            return [Bounds(b.lower[index], b.upper[index]) for b in bs]
        margin = None if self.margin_lower is None else self.margin_lower[index]
        return PairBounds(pick(self.f), pick(self.g), pick(self.delta), pick(self.local), margin, self.info.copy())

    @staticmethod
    def concat(parts: Sequence[PairBounds]) -> PairBounds:
        """Join results computed on consecutive chunks of the batch."""
        def cat(attr: str) -> list[Bounds]:
            layers: list[list[Bounds]] = [getattr(p, attr) for p in parts]
            return [Bounds(torch.cat([bs[l].lower for bs in layers]), torch.cat([bs[l].upper for bs in layers]))
                    for l in range(len(layers[0]))]
        margins = [p.margin_lower for p in parts]
        margin = None if any(m is None for m in margins) else torch.cat([m for m in margins if m is not None])
        return PairBounds(cat("f"), cat("g"), cat("delta"), cat("local"), margin, parts[0].info.copy())

    def max_abs_logit_deviation(self, logits: Sequence[int] | None = None) -> torch.Tensor:
        """(B,) upper bound on max_k |Delta_logit_k| over each region (k in `logits`, all by default)."""
        d = self.delta[-1]
        mag = torch.maximum(d.upper, -d.lower).reshape(d.upper.shape[0], -1)
        if logits is not None:
            mag = mag[:, list(logits)]
        return mag.max(dim=1).values

    def agreement_margins(self) -> torch.Tensor:
        """(B, C, C) lower bounds on both f_c - f_j and g_c - g_j (method's own, else interval differences)."""
        if self.margin_lower is not None:
            return self.margin_lower
        return interval_margins(self.f[-1], self.g[-1])

    def proved_agreement(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) bool: argmax f = argmax g = c on the whole region; and that class c (-1 if none)."""
        m = self.agreement_margins()
        b, c, _ = m.shape
        eye = torch.eye(c, dtype=torch.bool).expand(b, c, c)
        ok = torch.where(eye, torch.ones_like(m, dtype=torch.bool), m > 0).all(dim=2)  # (B, C)
        proved = ok.any(dim=1)
        cls = torch.where(proved, ok.to(torch.int64).argmax(dim=1), torch.full((b,), -1, dtype=torch.int64))
        return proved, cls


def interval_margins(f_logits: Bounds, g_logits: Bounds) -> torch.Tensor:
    """min(lower(f_c) - upper(f_j), lower(g_c) - upper(g_j)), rounded down: (B, C, C)."""
    def one(b: Bounds) -> torch.Tensor:
        lo = b.lower.reshape(b.lower.shape[0], -1)
        hi = b.upper.reshape(b.upper.shape[0], -1)
        m = lo.unsqueeze(2) - hi.unsqueeze(1)
        return torch.nextafter(m, torch.full_like(m, -torch.inf))
    return torch.minimum(one(f_logits), one(g_logits))


# ----------------------------------------------------------------------------- user-facing result
@dataclass
class LayerResult:
    """Certified bounds of one layer over every region: arrays (B, *out_shape)."""

    index: int
    name: str
    local_lower: Array
    local_upper: Array
    end_to_end_lower: Array
    end_to_end_upper: Array

    @property
    def max_abs_end_to_end(self) -> Array:
        """(B,) bound on max |Delta_l| over the layer's neurons."""
        b = self.end_to_end_lower.shape[0]
        out: Array = np.maximum(-self.end_to_end_lower, self.end_to_end_upper).reshape(b, -1).max(axis=1)
        return out

    @property
    def max_abs_local(self) -> Array:
        b = self.local_lower.shape[0]
        out: Array = np.maximum(-self.local_lower, self.local_upper).reshape(b, -1).max(axis=1)
        return out


@dataclass
class CertifyResult:
    """Certified deviation bounds for B regions, with verdicts. `to_json()` is the stable format."""

    method: str
    regions: list[dict[str, Any]]              # each region's `describe()`
    layers: list[LayerResult]
    max_abs_logit_deviation: Array             # (B,) certified upper bound
    sampled_max_abs_logit_deviation: Array     # (B,) best value found by the search (a lower bound)
    sampled_points: list[Array]                # (B,) input reaching it
    agreement: list[Agreement]
    tolerance: float | None
    seconds: float
    seed: int = 0
    bounds: PairBounds | None = field(default=None, repr=False)
    truncated: list[bool] = field(default_factory=list)   # per region: a time limit cut the method short
    logits: list[int] | None = None            # the tolerance verdict's logits (None: all)
    delta: float | None = None                 # delta-top-1 equivalence, when asked
    delta_top1: list[Agreement] | None = None

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def verdicts(self) -> list[str | None]:
        """Per region against the tolerance: certified / violated / unknown (None without a tolerance)."""
        if self.tolerance is None:
            return [None] * self.n_regions
        out: list[str | None] = []
        for bound, found in zip(self.max_abs_logit_deviation, self.sampled_max_abs_logit_deviation):
            out.append("certified" if bound <= self.tolerance else
                       "violated" if found > self.tolerance else "unknown")
        return out

    @property
    def verdict(self) -> str | None:
        """Over all regions: violated if any is, certified if all are, else unknown."""
        return combine_verdicts(self.verdicts)

    @property
    def agreement_verdict(self) -> str:
        return ClassTally.of_agreements(self.agreement).verdict

    @property
    def delta_top1_verdict(self) -> str | None:
        return None if self.delta_top1 is None else ClassTally.of_agreements(self.delta_top1).verdict

    def to_json(self) -> dict[str, Any]:
        """The stable JSON document (schema "prunecert.certify/1", see docs/certify.md)."""
        regions = []
        verdicts = self.verdicts
        for b, desc in enumerate(self.regions):
            entry: dict[str, Any] = {"index": b, "region": desc,
                     "max_abs_logit_deviation": float(self.max_abs_logit_deviation[b]),
                     "sampled_max_abs_logit_deviation": float(self.sampled_max_abs_logit_deviation[b]),
                     "agreement": self.agreement[b].to_json(), "verdict": verdicts[b]}
            if verdicts[b] == "violated":
                entry["counterexample"] = [float(v) for v in self.sampled_points[b].reshape(-1)]
            if self.delta_top1 is not None:
                entry["delta_top1"] = self.delta_top1[b].to_json()
            regions.append(entry)
        layers = [{"index": L.index, "name": L.name, "shape": list(L.end_to_end_lower.shape[1:]),
                   "local": {"lower": L.local_lower.tolist(), "upper": L.local_upper.tolist()},
                   "end_to_end": {"lower": L.end_to_end_lower.tolist(), "upper": L.end_to_end_upper.tolist()},
                   "max_abs_local": [float(v) for v in L.max_abs_local],
                   "max_abs_end_to_end": [float(v) for v in L.max_abs_end_to_end]}
                  for L in self.layers]
        out: dict[str, Any] = {
            "schema": SCHEMA, "method": self.method, "seed": int(self.seed), "seconds": float(self.seconds),
            "tolerance": None if self.tolerance is None else float(self.tolerance),
            "logits": self.logits,
            "verdict": self.verdict,
            "max_abs_logit_deviation": float(np.max(self.max_abs_logit_deviation)),
            "agreement": ClassTally.of(r["agreement"] for r in regions).to_json(),
            "truncated": any(self.truncated),
            "truncated_regions": [b for b, t in enumerate(self.truncated) if t],
            "regions": regions, "layers": layers,
        }
        if self.delta_top1 is not None:
            assert self.delta is not None, "delta-top-1 verdicts without their delta"
            out["delta_top1"] = {"delta": float(self.delta),
                                 **ClassTally.of(r["delta_top1"] for r in regions).to_json()}
        return out


def truncated_regions(info: MethodInfo, batch: int) -> list[bool]:
    """Per region, whether the method that produced `info` stopped early (a time limit): every method
    with a time limit says so in `truncated` (lp: its LP pass did not finish; milp: an objective was
    not solved in time; bab: the budget ran out before the gap closed)."""
    return list(info["truncated"]) if "truncated" in info else [False] * batch


def load_schema() -> dict[str, Any]:
    """The JSON schema of `CertifyResult.to_json()` (certify.schema.json, shipped with the package)."""
    schema: dict[str, Any] = json.loads(
        resources.files("prunecert.certify").joinpath("certify.schema.json").read_text("utf-8"))
    return schema
