"""The LP-based searches: LP walks from the best gradient points, and the exact MILP maximum.

Both solve linear programs over the certification encoding of the pair, so their points satisfy the
networks' equations up to solver tolerance; the reported value is still the float64 re-evaluation.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from prunecert.adversarial.gradient import SearchState
from prunecert.adversarial.lpwalk import PairLP, walk
from prunecert.adversarial.objectives import Objective
from prunecert.adversarial.result import AttackResult, best_result
from prunecert.adversarial.space import SearchSpace
from prunecert.core.pair import Pair


def _sub_value_fn(pair: Pair, objective: Objective, s: int):
    def value(x: np.ndarray) -> float:
        with torch.no_grad():
            xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, *pair.input_shape)
            return float(objective.sub_values(*pair.forward_layers(xt))[0, s])
    return value


def _sub_gradient(pair: Pair, objective: Objective, s: int, x: np.ndarray) -> np.ndarray:
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, *pair.input_shape).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective.sub_values(*pair.forward_layers(xt))[0, s], xt)
    return grad.reshape(-1).numpy()


def walk_search(pair: Pair, objectives: list[Objective], space: SearchSpace, state: SearchState, walks: int,
                start: float, budget: float, log) -> list[tuple[torch.Tensor, list[float], bool]]:
    """Per region: LP walks from the `walks` best points of `state` (distinct sub-objectives first).

    Region g may use the time left until start + budget * (g + 1). Returns per region the walks' end
    points, the trace (best value after each LP) and whether the budget cut a walk short. L2 balls
    get no walk (the LP cannot express them): decided per region, so a region's result does not
    depend on the other regions of its chunk.
    """
    out = []
    picks = state.best_per_group(space.n_groups, walks)
    for g, objective in enumerate(objectives):
        if space.l2[g]:
            out.append((torch.empty(0, *pair.input_shape, dtype=torch.float64), [], False))
            continue
        deadline = start + budget * (g + 1)
        layer, cf, cg = objective.linear_form()
        lo, hi = (t.numpy() for t in (space.lo[g], space.hi[g]))
        lp = PairLP(pair, lo, hi)
        ends, trace, truncated, best = [], [], False, -np.inf
        for i in picks[g]:
            if time.perf_counter() >= deadline:
                truncated = True
                break
            s = int(state.sub[i])
            x0 = space.ensure_inside(state.x[i], g).numpy().reshape(-1)
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


def milp_search(pair: Pair, objective: Objective, space: SearchSpace, g: int, budget: float, fields: dict,
                log) -> AttackResult:
    """The exact maximum: one MILP per sub-objective (`PairMILP.solve`), most promising first.

    Sub-objectives are ordered by their rigorous LP-relaxation bound and skipped once that bound
    cannot beat the best value reached, so max-logit-deviation rarely needs all 2C MILPs. The result's
    `methods["milp"]` holds the sound upper bound on the maximum and whether every needed MILP closed
    (then `value` is the exact maximum, up to the solver's tolerances, which the bound accounts for).
    Every optimum is checked by the `auto` witness (`witness.py`): a refuted one is not "closed".
    """
    from prunecert.adversarial.witness import milp_witness
    from prunecert.certify.milp import PairMILP

    start = time.perf_counter()
    deadline = start + budget
    milp = PairMILP(pair, space.regions[g], witness=milp_witness(pair, seed=fields.get("seed", 0)))
    layer, cf, cg = objective.linear_form()
    subs = [(layer, cf[s].numpy(), cg[s].numpy()) for s in range(len(cf))]
    lp = [milp.lp_bound(milp.objective_vector(o)) for o in subs]
    order = sorted(range(len(subs)), key=lambda s: (-lp[s], s))
    points, trace, best, upper, closed, solved = [], [], -np.inf, -np.inf, True, 0
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
        points.append(space.center(g))
    cand = torch.stack(points)
    info = {"upper": float(upper), "closed": bool(closed), "milps": solved, "sub_objectives": len(subs),
            "binaries": milp.n_binaries}
    res = best_result(pair, objective, space, cand, torch.full((len(cand),), g, dtype=torch.long), g,
                      trace=trace or [float("-inf")], truncated=not closed, evaluations=len(points),
                      seconds=time.perf_counter() - start, methods={"milp": info}, **fields)
    log.stage(f"milp ({solved} MILPs, {milp.n_binaries} binaries, upper bound {upper:.6g})", None, start, res.value)
    return res
