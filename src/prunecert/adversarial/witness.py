"""The attack that checks every MILP optimum (`prunecert.certify.milp`'s `witness` hook).

HiGHS's MIP dual bound is the one number in the exact solver we cannot re-prove, and it has been
wrong (see `certify/highs.py`). After each solve, `auto` (apgd, then LP walks) searches the box for
the same linear objective; a reached value above the dual bound makes the MILP fall back to its
rigorous LP bound. The attack lives here, not in `certify`, so that `certify` does not depend on
`adversarial`: callers that want the check pass `milp_witness(pair)` in. (`MilpWitness` itself is
defined in `exact.py`, with the attack as a field, because `attack(method="milp")` checks itself too.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from prunecert.adversarial.api import attack
from prunecert.adversarial.exact import MilpWitness
from prunecert.core.pair import Pair
from prunecert.core.regions import Array, Box
from prunecert.stage_budgets import WITNESS_SECONDS

__all__ = ["MilpWitness", "ReachSearch", "ClassSearcher", "milp_witness", "reach_search", "class_search",
           "certify_searches", "WITNESS_SECONDS"]


@dataclass(frozen=True)
class ReachSearch:
    """(lo, hi, seconds) -> the input of largest max |Delta_logit| `apgd` reaches in the box: the
    lower-bound search `certify.bab` runs first (`bab_bounds(..., reach=...)`)."""

    pair: Pair
    seed: int = 0

    def __call__(self, lo: Array, hi: Array, seconds: float) -> Array:
        r = attack(self.pair, None, Box(np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)),
                   "max-logit-deviation", "apgd", budget_seconds=seconds, seed=self.seed, progress=False)
        return np.asarray(r.x, dtype=np.float64)


@dataclass(frozen=True)
class ClassSearcher:
    """(lo, hi, property, seconds) -> an input where g leaves f's class, or None: the counterexample
    search `certify.settle` runs before branch and bound (`certify(..., class_search=...)`).

    It attacks top-1 disagreement (g's best other class over f's class at the centre); `settle`
    replays the point against the property itself (for delta-top-1, f must also be confident)."""

    pair: Pair
    seed: int = 0

    def __call__(self, lo: Array, hi: Array, prop: object, seconds: float) -> Array | None:
        r = attack(self.pair, None, Box(np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)),
                   "disagreement", "auto", budget_seconds=seconds, seed=self.seed, progress=False)
        return np.asarray(r.x, dtype=np.float64) if r.disagreement else None


def milp_witness(pair: Pair, budget_seconds: float = WITNESS_SECONDS, seed: int = 0) -> MilpWitness:
    """The MILP witness for `pair` (see `MilpWitness`)."""
    return MilpWitness(pair, attack, budget_seconds, seed)


def reach_search(pair: Pair, seed: int = 0) -> ReachSearch:
    """The search bab starts from (see `ReachSearch`)."""
    return ReachSearch(pair, seed)


def class_search(pair: Pair, seed: int = 0) -> ClassSearcher:
    """The counterexample search of complete verdicts (see `ClassSearcher`)."""
    return ClassSearcher(pair, seed)


class CertifySearches(TypedDict, total=False):
    """The keyword arguments of `certify` that inject searches (see `certify_searches`)."""

    class_search: ClassSearcher
    witness: MilpWitness
    reach: ReachSearch


def certify_searches(method: str, pair: Pair, seed: int = 0) -> CertifySearches:
    """Every search a caller of `certify` injects (certify sits below adversarial, docs/architecture.md):
    the counterexample search of complete verdicts (`class_search`) always, and for the methods that
    use one, `milp`'s witness (its one trust in a solver's word, checked by attack) or `bab`'s
    starting attack (`reach`). The CLI and the audit pass `**certify_searches(...)` to certify."""
    out = CertifySearches(class_search=class_search(pair, seed))
    if method == "milp":
        out["witness"] = milp_witness(pair, seed=seed)
    elif method == "bab":
        out["reach"] = reach_search(pair, seed)
    return out
