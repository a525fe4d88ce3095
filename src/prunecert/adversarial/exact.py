"""The LP-based searches: LP walks from the best gradient points, and the exact MILP maximum.

Both solve linear programs over the certification encoding of the pair, so their points satisfy the
networks' equations up to solver tolerance; the reported value is still the float64 re-evaluation.

The MILP's optimum is checked by an attack (`MilpWitness`). That attack is `api.attack`, which sits
above this module (api runs these searches), so it is passed in: `api.py` builds the witness with
itself, and `witness.milp_witness` does the same for certify's callers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from prunecert.adversarial.gradient import SearchState
from prunecert.adversarial.lpwalk import PairLP, walk
from prunecert.adversarial.objectives import Objective
from prunecert.adversarial.result import AttackResult, MilpDetails, RunFields, best_result
from prunecert.adversarial.space import SearchSpace
from prunecert.certify.milp import LinearObjective, PairMILP, WitnessFactory
from prunecert.core.pair import Pair
from prunecert.core.regions import Array, Box, Region
from prunecert.network import Network
from prunecert.stage_budgets import WITNESS_SECONDS

# apgd restarts before the LP walks: with auto's default 3, whether the seed-302 case of
# tests/test_certify_milp.py is refuted depended on the seed (seeds 0 and 2 of 0-5 missed it); with 6
# restarts seeds 0-7 all find it
WITNESS_RESTARTS = 6


class AttackFn(Protocol):
    """`prunecert.adversarial.attack`, as the witness calls it."""

    def __call__(self, original: Network | Pair, pruned: Network | None, region: Region,
                 objective: str | Objective = ..., method: str = ..., budget_seconds: float = ...,
                 seed: int = ..., restarts: int | None = ..., iterations: int | None = ...,
                 label: int | None = ..., progress: bool = ...) -> AttackResult: ...


# what a MILP witness search returns: the value reached and its point
WitnessPoint = tuple[float, Array]
# per region: the LP walks' end points (W, *input_shape), the trace (best value after each LP), truncated?
WalkResult = tuple[torch.Tensor, list[float], bool]


class StageLog(Protocol):
    """Where a search reports each finished stage (api's `_Log`: one line on the progress channel)."""

    def stage(self, name: str, state: SearchState | None, start: float, value: float | None = None) -> None: ...


@dataclass(frozen=True)
class MilpWitness:
    """(lo, hi) -> witness(objective, x0) for `PairMILP` / `milp_bounds(..., witness=...)`.

    The witness returns (value, x) of the best point `attack` (method `auto`) reaches; x0 (the
    solver's point) is not needed, `milp.py` compares against it itself. A dataclass, not a closure,
    so it pickles: certify ships it to its workers once per run (`attack` pickles by reference).
    """

    pair: Pair
    attack: AttackFn
    budget_seconds: float = WITNESS_SECONDS
    seed: int = 0

    def __call__(self, lo: Array, hi: Array) -> Callable[[LinearObjective, Array | None], WitnessPoint] | None:
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        if (hi - lo <= 4 * np.spacing(np.maximum(np.abs(lo), np.abs(hi)))).all():
            return None  # a single point: the solver's x is the only witness there is
        region = Box(lo, hi)

        def search(objective: LinearObjective, x0: Array | None = None) -> WitnessPoint:
            layer, cf, cg = objective
            r = self.attack(self.pair, None, region, Objective.linear(layer, cf, cg), "auto",
                            budget_seconds=self.budget_seconds, seed=self.seed, restarts=WITNESS_RESTARTS,
                            progress=False)
            return r.value, r.x
        return search


def _sub_value_fn(pair: Pair, objective: Objective, s: int) -> Callable[[Array], float]:
    def value(x: Array) -> float:
        with torch.no_grad():
            xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, *pair.input_shape)
            return float(objective.sub_values(*pair.forward_layers(xt))[0, s])
    return value


def _sub_gradient(pair: Pair, objective: Objective, s: int, x: Array) -> Array:
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, *pair.input_shape).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective.sub_values(*pair.forward_layers(xt))[0, s], xt)
    return np.asarray(grad.reshape(-1).numpy(), dtype=np.float64)


def walk_search(pair: Pair, objectives: list[Objective], space: SearchSpace, state: SearchState, walks: int,
                start: float, budget: float, log: StageLog) -> list[WalkResult]:
    """Per region: LP walks from the `walks` best points of `state` (distinct sub-objectives first).

    Region k (0-based) may use the time left until start + budget * (k + 1). Returns per region the walks' end
    points, the trace (best value after each LP) and whether the budget cut a walk short. L2 balls
    get no walk (the LP cannot express them): decided per region, so a region's result does not
    depend on the other regions of its chunk.
    """
    out: list[WalkResult] = []
    picks = state.best_per_group(space.n_groups, walks)
    for group, objective in enumerate(objectives):
        if space.l2[group]:
            out.append((torch.empty(0, *pair.input_shape, dtype=torch.float64), [], False))
            continue
        deadline = start + budget * (group + 1)
        layer, cf, cg = objective.linear_form()
        lo, hi = space.lo[group].numpy(), space.hi[group].numpy()
        lp = PairLP(pair, lo, hi)
        ends: list[torch.Tensor] = []
        trace: list[float] = []
        truncated, best = False, -np.inf
        for i in picks[group]:
            if time.perf_counter() >= deadline:
                truncated = True
                break
            s = int(state.sub[i])
            x0 = space.ensure_inside(state.x[i], group).numpy().reshape(-1)
            x, v, tr, _ = walk(lp, _sub_value_fn(pair, objective, s), x0, layer, cf[s].numpy(), cg[s].numpy(),
                               deadline, gradient=_sub_gradient(pair, objective, s, x0))
            ends.append(torch.as_tensor(x).reshape(pair.input_shape))
            for t in tr:
                best = max(best, t)
                trace.append(best)
        truncated = truncated or time.perf_counter() >= deadline
        out.append((torch.stack(ends) if ends else torch.empty(0, *pair.input_shape, dtype=torch.float64),
                    trace, truncated))
        log.stage(f"lp-walk ({lp.solves} LPs, {lp.n_neurons} unstable neurons)", None, start,
                  best if ends else float("nan"))
    return out


def milp_search(pair: Pair, objective: Objective, space: SearchSpace, group: int, budget: float, fields: RunFields,
                log: StageLog, witness: WitnessFactory | None) -> AttackResult:
    """The exact maximum: one MILP per sub-objective (`PairMILP.solve`), most promising first.

    Sub-objectives are ordered by their rigorous LP-relaxation bound and skipped once that bound
    cannot beat the best value reached, so max-logit-deviation rarely needs all 2C MILPs. The result's
    `methods["milp"]` holds the sound upper bound on the maximum and whether every needed MILP closed
    (then `value` is the exact maximum, up to the solver's tolerances, which the bound accounts for).
    Every optimum is checked by `witness` (api.py passes `MilpWitness` with its `auto` attack): a
    refuted one is not "closed".
    """
    start = time.perf_counter()
    deadline = start + budget
    milp = PairMILP(pair, space.regions[group], witness=witness)
    layer, cf, cg = objective.linear_form()
    subs = [(layer, cf[s].numpy(), cg[s].numpy()) for s in range(len(cf))]
    lp = [milp.lp_bound(milp.objective_vector(o)) for o in subs]
    order = sorted(range(len(subs)), key=lambda s: (-lp[s], s))
    points: list[torch.Tensor] = []
    trace: list[float] = []
    best, upper, closed, solved = -np.inf, -np.inf, True, 0
    for s in order:
        if lp[s] <= best:  # cannot beat what is reached: its bound is the LP bound
            upper = max(upper, lp[s])
            continue
        left = deadline - time.perf_counter()
        if left <= 0:
            closed = False
            upper = max(upper, lp[s])
            continue
        r = milp.solve(subs[s], time_limit=left)
        solved += 1
        if r.x is not None:
            points.append(torch.as_tensor(r.x, dtype=torch.float64).reshape(pair.input_shape))
            best = max(best, r.value)
        closed = closed and r.status == "optimal"
        upper = max(upper, r.upper)
        trace.append(best)
    if not points:  # no incumbent at all: the centre keeps the result a point of the region
        points.append(space.center(group))
    cand = torch.stack(points)
    info = MilpDetails(upper=float(upper), closed=bool(closed), milps=solved, sub_objectives=len(subs),
                       binaries=milp.n_binaries)
    res = best_result(pair, objective, space, cand, torch.full((len(cand),), group, dtype=torch.long), group,
                      trace=trace or [float("-inf")], truncated=not closed, evaluations=len(points),
                      seconds=time.perf_counter() - start, methods={"milp": info}, **fields)
    log.stage(f"milp ({solved} MILPs, {milp.n_binaries} binaries, upper bound {upper:.6g})", None, start, res.value)
    return res
