"""`attack` and `attack_many`: find inputs where the pruned network deviates most from the original.

Methods (all return a point inside the region whose value is a fresh float64 forward pass):
  random   uniform sampling; the floor
  pgd      projected gradient ascent, fixed step, sign steps (L-inf) / normalised steps (L2)
  apgd     APGD (Croce & Hein 2020): step-size schedule with momentum and checkpoints
  lp-walk  exact LP ascent through adjacent linear regions (L-inf boxes, linear objectives)
  milp     the exact maximum by `prunecert.certify.milp.PairMILP` (small networks)
  auto     a budgeted portfolio: APGD, then LP walks from its best points (linear objectives, boxes)

Reproducibility: every random choice comes from `seed`; a run is bit-for-bit repeatable unless the
time budget cut it short (`result.truncated`), in which case how far it got depends on the machine.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from rich.console import Console

from prunecert.adversarial.gradient import SearchState, ascend, random_search, seed_starts
from prunecert.adversarial.objectives import Objective, as_objective
from prunecert.adversarial.result import AttackResult, best_result
from prunecert.adversarial.space import SearchSpace, is_l2
from prunecert.certify.formulation import check_encodable, encodable
from prunecert.core.completion import make_pair
from prunecert.core.pair import Pair
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Network
from prunecert.threads import one_torch_thread

METHODS = ("auto", "apgd", "pgd", "lp-walk", "milp", "random")
DEFAULT_RESTARTS = {"pgd": 5, "apgd": 5, "auto": 3, "lp-walk": 6, "random": 0, "milp": 0}
AUTO_WALKS = 6  # LP walks in `auto`, from the best distinct APGD points
DEFAULT_ITERATIONS = {"pgd": 100, "apgd": 100, "auto": 50}
AUTO_GRADIENT_SHARE = 0.4  # of the budget for APGD in `auto`; the rest for LP walks
RANDOM_SAMPLES = 20_000


def attack(original: Network | Pair, pruned: Network | None, region, objective: str | Objective = "max-logit-deviation",
           method: str = "auto", budget_seconds: float = 10.0, seed: int = 0, restarts: int | None = None,
           iterations: int | None = None, label: int | None = None, progress: bool = True) -> AttackResult:
    """Search `region` for the input maximising `objective` of the pair (original, pruned).

    `pruned` may be compact (it is completed onto the original's shape); pass a `Pair` as `original`
    and None as `pruned` to reuse one. `label` overrides the class y of disagreement/evasive
    (default: argmax of the original at the region's centre). `budget_seconds` caps the run.
    """
    return attack_many(original, pruned, [region], objective, method, budget_seconds, seed, restarts,
                       iterations, label, progress)[0]


def attack_many(original: Network | Pair, pruned: Network | None, regions: Sequence,
                objective: str | Objective = "max-logit-deviation", method: str = "auto",
                budget_seconds: float = 10.0, seed: int = 0, restarts: int | None = None,
                iterations: int | None = None, label: int | None = None, progress: bool = True
                ) -> list[AttackResult]:
    """`attack` over many regions; gradient stages run all regions in one torch batch.

    `budget_seconds` is per region. Results are in the order of `regions`.
    """
    with one_torch_thread():
        return _attack_many(original, pruned, regions, objective, method, budget_seconds, seed, restarts,
                            iterations, label, progress)


def _attack_many(original, pruned, regions, objective, method, budget_seconds, seed, restarts, iterations, label,
                 progress) -> list[AttackResult]:
    pair = original if isinstance(original, Pair) and pruned is None else make_pair(original, pruned)
    if method not in METHODS:
        raise ConfigError(f"unknown attack method {method!r}; expected one of {', '.join(METHODS)}")
    try:
        budget = float(budget_seconds)
    except (TypeError, ValueError):
        raise ConfigError(f"budget_seconds must be a number, got {budget_seconds!r}") from None
    if not budget > 0 or budget == float("inf"):
        raise ConfigError(f"budget_seconds must be a positive finite number of seconds, got {budget_seconds!r}")
    regions = list(regions)
    if not regions:
        raise RegionError("no region to attack")
    for r in regions:
        if tuple(r.shape) != tuple(pair.input_shape):
            raise RegionError(f"region {r.describe().get('source', r.describe()['kind'])} has input shape "
                              f"{tuple(r.shape)}, the networks take {tuple(pair.input_shape)}")
    restarts = DEFAULT_RESTARTS[method] if restarts is None else int(restarts)
    if restarts < 0 or (restarts == 0 and method in ("pgd", "apgd", "auto", "lp-walk")):
        raise ConfigError(f"restarts must be >= 1 for method {method}, got {restarts}")
    iterations = DEFAULT_ITERATIONS.get(method, 0) if iterations is None else int(iterations)
    if method in ("pgd", "apgd", "auto") and iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    spec = as_objective(objective)
    objectives = [spec.resolve(pair, r.center, label) for r in regions]
    space = SearchSpace(regions, pair.input_shape)
    if method in ("lp-walk", "milp") and not spec.is_linear:
        objectives[0].linear_form()  # raises the "nonlinear objective" ConfigError
    if method == "lp-walk" and any(space.l2):
        from prunecert.adversarial.lpwalk import check_box
        check_box(next(r for r in regions if is_l2(r)))
    fits = encodable(pair)
    if method in ("lp-walk", "milp") and not fits:
        check_encodable(pair, f"attack --method {method}", "use --method apgd (gradient attacks scale to any size)")
    log = _Log(progress, len(regions))
    start = time.perf_counter()
    deadline = start + budget * len(regions)
    gen = torch.Generator().manual_seed(int(seed))
    fields = dict(method=method, seed=int(seed))
    if method == "random":
        state = random_search(pair, objectives, space, RANDOM_SAMPLES, gen, deadline)
        log.stage("random", state, start)
        return _finish(pair, objectives, space, state, None, start, fields)
    if method == "milp":
        from prunecert.adversarial.exact import milp_search
        return [milp_search(pair, objectives[g], space, g, budget, fields, log) for g in range(len(regions))]
    # auto: LP walks only where the pair's LP fits; otherwise the whole budget goes to APGD
    do_walk = method == "lp-walk" or (method == "auto" and spec.is_linear and not any(space.l2) and fits)
    state = seed_starts(pair, objectives, space, restarts if method != "lp-walk" else 1, gen,
                        oversample=4 if method != "lp-walk" else 64)
    log.stage("seed", state, start)
    if method in ("pgd", "apgd", "auto"):
        share = AUTO_GRADIENT_SHARE if method == "auto" and do_walk else 1.0
        ascend(pair, objectives, space, state, iterations, start + share * budget * len(regions),
               "pgd" if method == "pgd" else "apgd")
        log.stage("pgd" if method == "pgd" else "apgd", state, start)
    walks = None
    if do_walk:
        from prunecert.adversarial.exact import walk_search
        walks = walk_search(pair, objectives, space, state, restarts if method == "lp-walk" else AUTO_WALKS,
                            start, budget, log)
    return _finish(pair, objectives, space, state, walks, start, fields)


def _finish(pair: Pair, objectives: list[Objective], space: SearchSpace, state: SearchState, walks,
            start: float, fields: dict) -> list[AttackResult]:
    """Best point per region (gradient/random state and LP walks together), re-evaluated in float64."""
    out = []
    for g, objective in enumerate(objectives):
        cand_x, cand_g = state.x, state.groups
        trace = [t[g] for t in state.trace]
        truncated = state.truncated
        if walks is not None:
            wx, wtrace, wtrunc = walks[g]
            if len(wx):
                cand_x = torch.cat([cand_x, wx])
                cand_g = torch.cat([cand_g, torch.full((len(wx),), g, dtype=torch.long)])
            best = max(trace) if trace else -np.inf
            trace += [max(best, v) for v in wtrace]
            truncated = truncated or wtrunc
        res = best_result(pair, objective, space, cand_x, cand_g, g, trace=trace, truncated=truncated,
                          evaluations=state.evaluations, seconds=time.perf_counter() - start, **fields)
        out.append(res)
    return out


class _Log:
    """One line per stage on stderr (rich), silent when `progress` is False. "best" is the best value found
    so far by any stage (a later stage, e.g. an LP walk from a weaker start, may find less on its own)."""

    def __init__(self, enabled: bool, n_regions: int):
        self.console = Console(stderr=True) if enabled else None
        self.n_regions = n_regions
        self.best = -math.inf

    def stage(self, name: str, state: SearchState | None, start: float, value: float | None = None) -> None:
        if self.console is None:
            return
        if value is None and state is not None:
            value = float(state.value.max())
        if value is not None:
            self.best = value = max(self.best, value)
        where = f" over {self.n_regions} regions" if self.n_regions > 1 else ""
        self.console.print(f"[bold]attack[/] {name}{where}: best {value:.6g} "
                           f"({time.perf_counter() - start:.2f} s)", highlight=False)
