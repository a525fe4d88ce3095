"""`attack` and `attack_many`: find inputs where the pruned network deviates most from the original.

Methods (all return a point inside the region whose value is a fresh float64 forward pass):
  random   uniform sampling; the floor
  pgd      projected gradient ascent, fixed step, sign steps (L-inf) / normalised steps (L2)
  apgd     APGD (Croce & Hein 2020): step-size schedule with momentum and checkpoints
  lp-walk  exact LP ascent through adjacent linear regions (L-inf boxes, linear objectives)
  milp     the exact maximum by `prunecert.certify.milp.PairMILP` (small networks)
  auto     a budgeted portfolio: APGD, then LP walks from its best points (linear objectives, boxes)

Reproducibility: every random choice for a region comes from a generator seeded by `seed` and the
region's exact bounds (`prunecert.scale.seeds`) and no batch operation mixes regions, so neither the
executor, the number of workers nor the chunk size (regions per gradient batch, chosen by
`batching.attack_chunk_size` to fit a memory budget) changes a result; a run is bit-for-bit
repeatable unless the time budget cut it short (`result.truncated`), in which case how far it got
depends on the machine.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prunecert.adversarial.gradient import (
    SearchState,
    ascend,
    random_search,
    seed_starts,
)
from prunecert.adversarial.batching import MAX_CHUNK, attack_chunk_size
from prunecert.adversarial.exact import MilpWitness, milp_search, walk_search
from prunecert.adversarial.lpwalk import check_box
from prunecert.adversarial.methods import get_attack
from prunecert.adversarial.objectives import Objective, as_objective
from prunecert.adversarial.exact import WalkResult
from prunecert.adversarial.result import AttackResult, RunFields, best_result
from prunecert.adversarial.space import SearchSpace, is_l2
from prunecert.certify.formulation import check_encodable, encodable
from prunecert.core.completion import pair_of
from prunecert.core.pair import Pair
from prunecert.core.regions import Region
from prunecert.errors import ConfigError, RegionError
from prunecert.network import Network
from prunecert.progress import progress_task, stage_line
from prunecert.scale import (
    Executor,
    InProcessExecutor,
    chunk_slices,
    open_executor,
    region_generator,
)
from prunecert.stage_budgets import ATTACK_SECONDS, AUTO_GRADIENT_SHARE, AUTO_WALKS
from prunecert.threads import one_torch_thread


def attack(original: Network | Pair, pruned: Network | None, region: Region,
           objective: str | Objective = "max-logit-deviation", method: str = "auto", budget_seconds: float = ATTACK_SECONDS, seed: int = 0, restarts: int | None = None,
           iterations: int | None = None, label: int | None = None, progress: bool = True) -> AttackResult:
    """Search `region` for the input maximising `objective` of the pair (original, pruned).

    `pruned` may be compact (it is completed onto the original's shape); pass a `Pair` as `original`
    and None as `pruned` to reuse one. `label` overrides the class y of disagreement/evasive
    (default: argmax of the original at the region's centre). `budget_seconds` caps the run.
    """
    return attack_many(original, pruned, [region], objective, method, budget_seconds, seed, restarts,
                       iterations, label, progress)[0]


def attack_many(original: Network | Pair, pruned: Network | None, regions: Iterable[Region],
                objective: str | Objective = "max-logit-deviation", method: str = "auto",
                budget_seconds: float = ATTACK_SECONDS, seed: int = 0, restarts: int | None = None,
                iterations: int | None = None, label: int | None = None, progress: bool = True,
                workers: int | None = 1, scheduler: str | None = None, threads: int | None = None,
                executor: Executor | None = None, chunk_size: int | None = None) -> list[AttackResult]:
    """`attack` over many regions, in order. Regions go in chunks of `chunk_size` (gradient stages run
    a chunk in one torch batch; None: as many as fit `batching.MEMORY_BUDGET`) to `executor`, or one made from `workers` (None: every usable core) /
    `scheduler` (a Dask address or "local"). Every region's random choices come from its own
    generator (seeded from `seed` and the region itself), so results do not depend on the executor.
    `budget_seconds` is per region. For many regions `attack_stream` yields chunks as they finish.
    """
    return [r for _, part in attack_stream(original, pruned, regions, objective, method, budget_seconds, seed,
                                           restarts, iterations, label, progress, workers, scheduler, threads,
                                           executor, chunk_size) for r in part]


@dataclass
class AttackSetup:
    """What every chunk of one attack run shares (shipped to each worker once)."""

    pair: Pair
    objective: str | Objective
    method: str
    budget: float
    seed: int
    restarts: int
    iterations: int
    label: int | None
    log: bool = False


def attack_stream(original: Network | Pair, pruned: Network | None, regions: Iterable[Region],
                  objective: str | Objective = "max-logit-deviation", method: str = "auto",
                  budget_seconds: float = ATTACK_SECONDS, seed: int = 0, restarts: int | None = None,
                  iterations: int | None = None, label: int | None = None, progress: bool = True,
                  workers: int | None = 1, scheduler: str | None = None, threads: int | None = None,
                  executor: Executor | None = None, chunk_size: int | None = None
                  ) -> Iterator[tuple[int, list[AttackResult]]]:
    """`attack_many`, chunk by chunk: yields (index of the chunk's first region, its results) in order,
    holding only a few chunks at a time."""
    pair = pair_of(original, pruned)
    # a Sequence is kept as it is (LazyRegions: built per chunk)
    region_list = regions if isinstance(regions, Sequence) else list(regions)
    setup = _check(pair, region_list, objective, method, budget_seconds, seed, restarts, iterations, label,
                   MAX_CHUNK if chunk_size is None else chunk_size)
    if chunk_size is None:
        n_sub = as_objective(objective).resolve(pair, region_list[0].center, label).n_sub
        chunk_size = attack_chunk_size(pair, get_attack(method), setup.restarts, n_sub)
    slices = chunk_slices(len(region_list), chunk_size)
    with contextlib.ExitStack() as stack:
        if executor is None:
            executor = stack.enter_context(open_executor(workers, scheduler, threads, n_items=len(slices)))
        setup.log = progress and len(slices) == 1 and isinstance(executor, InProcessExecutor)
        shared = executor.share(setup)
        chunks = ((s.start, region_list[s]) for s in slices)
        with progress_task(f"attack ({method})", len(region_list), progress and not setup.log) as task:
            for s, part in zip(slices, executor.map(attack_chunk, shared, chunks)):
                task.advance(s.stop - s.start)
                yield s.start, part


def _check(pair: Pair, regions: Sequence[Region], objective: str | Objective, method: str, budget_seconds: float,
           seed: int, restarts: int | None, iterations: int | None, label: int | None, chunk_size: int
           ) -> AttackSetup:
    """Every option and region checked before any work starts; the normalised settings."""
    m = get_attack(method)
    try:
        budget = float(budget_seconds)
    except (TypeError, ValueError):
        raise ConfigError(f"budget_seconds must be a number, got {budget_seconds!r}") from None
    if not budget > 0 or budget == float("inf"):
        raise ConfigError(f"budget_seconds must be a positive finite number of seconds, got {budget_seconds!r}")
    if not regions:
        raise RegionError("no region to attack")
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    for r in regions:
        if tuple(r.shape) != tuple(pair.input_shape):
            raise RegionError(f"region {r.describe().get('source', r.describe()['kind'])} has input shape "
                              f"{tuple(r.shape)}, the networks take {tuple(pair.input_shape)}")
    restarts = m.restarts if restarts is None else int(restarts)
    if restarts < 0 or (restarts == 0 and m.needs_restarts):
        raise ConfigError(f"restarts must be >= 1 for method {method}, got {restarts}")
    iterations = m.iterations if iterations is None else int(iterations)
    if m.gradient is not None and iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    spec = as_objective(objective)
    if m.lp_only and not spec.is_linear:
        spec.resolve(pair, regions[0].center, label).linear_form()  # raises the "nonlinear objective" ConfigError
    for s in chunk_slices(len(regions), chunk_size):
        space = SearchSpace(regions[s], pair.input_shape)  # zero-volume regions raise here, before any work
        if m.walks and m.lp_only and any(space.l2):
            check_box(next(r for r in regions[s] if is_l2(r)))
    if m.lp_only and not encodable(pair):
        check_encodable(pair, f"attack --method {method}", "use --method apgd (gradient attacks scale to any size)")
    return AttackSetup(pair, objective, method, budget, int(seed), restarts, iterations, label)


def attack_chunk(setup: AttackSetup, chunk: tuple[int, Sequence[Region]]) -> list[AttackResult]:
    """Attack one chunk of regions (the run's regions first, first+1, ...), each with its own generator."""
    first, regions = chunk
    with one_torch_thread():
        return _attack_regions(setup, regions, [region_generator(setup.seed, r) for r in regions])


def _attack_regions(setup: AttackSetup, regions: Sequence[Region], gens: list[torch.Generator]) -> list[AttackResult]:
    pair, method, budget, restarts = setup.pair, setup.method, setup.budget, setup.restarts
    spec = as_objective(setup.objective)
    objectives = [spec.resolve(pair, r.center, setup.label) for r in regions]
    space = SearchSpace(regions, pair.input_shape)
    fits = encodable(pair)
    log = _Log(setup.log, len(regions))
    start = time.perf_counter()
    deadline = start + budget * len(regions)
    fields = RunFields(method=method, seed=setup.seed)
    m = get_attack(method)
    if m.sampling:
        state = random_search(pair, objectives, space, gens, deadline)
        log.stage("random", state, start)
        return _finish(pair, objectives, space, state, None, start, fields)
    if m.exact:
        # the MILP's optimum is checked by this module's own `auto` attack (injected: exact.py is below api.py)
        witness = MilpWitness(pair, attack, seed=setup.seed)
        return [milp_search(pair, objectives[g], space, g, budget, fields, log, witness) for g in range(len(regions))]
    # a gradient stage followed by walks (auto) walks only where the pair's LP fits and the objective is linear,
    # and only on boxes (walk_search skips L2 balls region by region); otherwise the whole budget goes to the
    # gradient stage
    do_walk = m.walks and (m.lp_only or (spec.is_linear and not all(space.l2) and fits))
    state = seed_starts(pair, objectives, space, restarts if m.gradient else 1, gens,
                        oversample=4 if m.gradient else 64)
    log.stage("seed", state, start)
    if m.gradient is not None:
        share = AUTO_GRADIENT_SHARE if do_walk else 1.0
        ascend(pair, objectives, space, state, setup.iterations, start + share * budget * len(regions), m.gradient)
        log.stage(m.gradient, state, start)
    walks = None
    if do_walk:
        walks = walk_search(pair, objectives, space, state, restarts if m.lp_only else AUTO_WALKS, start, budget, log)
    return _finish(pair, objectives, space, state, walks, start, fields)


def _finish(pair: Pair, objectives: list[Objective], space: SearchSpace, state: SearchState,
            walks: list[WalkResult] | None, start: float, fields: RunFields) -> list[AttackResult]:
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
                          evaluations=int(state.evaluations[g]), seconds=time.perf_counter() - start, **fields)
        out.append(res)
    return out


class _Log:
    """One line per stage on the progress channel, silent when `progress` is False. "best" is the best value
    found so far by any stage (a later stage, e.g. an LP walk from a weaker start, may find less on its own)."""

    def __init__(self, enabled: bool, n_regions: int):
        self.enabled = enabled
        self.n_regions = n_regions
        self.best = -math.inf

    def stage(self, name: str, state: SearchState | None, start: float, value: float | None = None) -> None:
        if not self.enabled:
            return
        if value is None and state is not None:
            value = float(state.value.max())
        if value is not None:
            self.best = value = max(self.best, value)
        where = f" over {self.n_regions} regions" if self.n_regions > 1 else ""
        stage_line(f"attack {name}{where}: best {value:.6g} ({time.perf_counter() - start:.2f} s)")
