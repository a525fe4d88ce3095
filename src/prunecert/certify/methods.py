"""The bound methods in one typed registry: name -> function, its options, and a one-line summary.

Every method has the signature `(pair, region, **options) -> PairBounds`, `region` being the
`core.region_batch.RegionBatch` certify builds once per chunk (boxes, and L2 balls when the chunk's
regions are balls); its options are the keyword parameters after `region`, read once from the
function itself, so the registry and the code cannot disagree. `certify` forwards its own arguments
(time_limit, tolerance, seed, progress, logits) to the methods that take them, and rejects any other option a method does not take, naming the valid
ones: a misspelt `itertions=500` is an error, never silently ignored. The CLI builds its `--method`
choices and help from `METHODS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prunecert.certify.bab import bab_bounds
from prunecert.certify.diff_interval import diff_interval_bounds
from prunecert.certify.diff_linear import alpha_crown_diff_bounds, crown_diff_bounds, diff_linear_bounds
from prunecert.certify.lp import lp_bounds
from prunecert.certify.milp import milp_bounds
from prunecert.certify.naive import naive_bounds
from prunecert.certify.result import PairBounds
from prunecert.errors import ConfigError


@dataclass(frozen=True)
class BoundMethod:
    """One registered bound method."""

    name: str
    bounds: Callable[..., PairBounds]   # (pair, region, **options) -> PairBounds
    summary: str                        # one line for --help and docs
    encodes_pair: bool = False          # one LP/MILP of the whole pair: refused up front on large nets
    options: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        params = list(inspect.signature(self.bounds).parameters.values())
        if [p.name for p in params[:2]] != ["pair", "region"]:
            raise TypeError(f"bound method {self.name!r}: signature must start (pair, region), got {params[:2]}")
        object.__setattr__(self, "options", tuple(p.name for p in params[2:]))

    def arguments(self, common: Mapping[str, object], extra: Mapping[str, object]) -> dict[str, object]:
        """Keyword arguments for one call: the `common` ones (certify's own) this method takes and are
        set, plus every `extra` option, each of which it must take (ConfigError otherwise)."""
        unknown = sorted(set(extra) - set(self.options))
        if unknown:
            raise ConfigError(f"method {self.name!r} takes no option {', '.join(map(repr, unknown))}; "
                              f"its options: {', '.join(self.options) or 'none'}")
        args = {k: v for k, v in common.items() if k in self.options and v is not None}
        args.update(extra)
        return args


METHODS: dict[str, BoundMethod] = {m.name: m for m in (
    BoundMethod("naive", naive_bounds, "intervals for f and g separately, subtracted (the baseline)"),
    BoundMethod("diff-interval", diff_interval_bounds, "ReluDiff: f, g and Delta propagated together"),
    BoundMethod("diff-linear", diff_linear_bounds, "symbolic linear bounds on Delta, intersected with "
                "alpha-crown-diff (the default)"),
    BoundMethod("crown-diff", crown_diff_bounds, "CROWN on the merged difference network f - g"),
    BoundMethod("alpha-crown-diff", alpha_crown_diff_bounds, "alpha-CROWN on f - g: crown-diff with the logit "
                "rows' ReLU slopes optimised"),
    BoundMethod("lp", lp_bounds, "triangle LP of both networks over the shared input, rigorous duals",
                encodes_pair=True),
    BoundMethod("milp", milp_bounds, "exact MILP (small nets); optima cross-checked", encodes_pair=True),
    BoundMethod("bab", bab_bounds, "branch and bound to reach --tolerance or the time limit", encodes_pair=True),
)}


def get_method(name: str) -> BoundMethod:
    """The method registered as `name` (ConfigError naming the valid ones if unknown)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown certification method {name!r}; valid: {', '.join(METHODS)}") from None


def methods_help() -> str:
    """The --method help text: every method with its summary."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + "."
