"""Gradient ascent on the deviation: PGD, APGD, and uniform sampling (the floor).

All three work on one torch batch holding regions x sub-objectives x restarts: element i ascends
sub-objective `sub[i]` inside region `groups[i]`. Starting points are *seeded*: many uniform samples
are scored and each sub-objective starts from its best ones (for `disagreement` these are the points
of smallest margin), plus the region's centre.

APGD follows Croce & Hein (ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Alg. 1): step size 2*eps, momentum alpha = 0.75,
checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); at a checkpoint
the step is halved (and the iterate reset to the best point) if fewer than rho = 0.75 of the steps
since the last checkpoint improved, or if neither the step nor the best value changed since then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prunecert.adversarial.objectives import BatchObjective, Objective
from prunecert.adversarial.space import SearchSpace
from prunecert.core.pair import Pair

# `attack --method random` (`random_search`): uniform points per region. The method is the floor every
# other attack must beat, so it draws a fixed count (the same points whatever the machine's speed)
# rather than sampling until the budget ends; on a net too large for that count within the budget the
# deadline still stops it early, and the result says truncated
RANDOM_SAMPLES = 20_000


@dataclass
class SearchState:
    """Best point and value per batch element, and the trace (best value per region per step)."""

    x: torch.Tensor
    value: torch.Tensor
    groups: torch.Tensor
    sub: torch.Tensor
    trace: list[list[float]] = field(default_factory=list)
    evaluations: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # per region
    truncated: bool = False

    def count(self, groups: torch.Tensor, n_groups: int) -> None:
        """One more evaluation for each element's region: counted per region, so a region's count does
        not depend on which other regions shared its batch."""
        counts = torch.bincount(groups, minlength=n_groups)
        self.evaluations = counts + self.evaluations if len(self.evaluations) else counts

    def record(self, n_groups: int) -> None:
        best = torch.full((n_groups,), -math.inf, dtype=torch.float64)
        best.scatter_reduce_(0, self.groups, self.value.detach(), reduce="amax")
        self.trace.append(best.tolist())

    def best_per_group(self, n_groups: int, k: int = 1) -> list[list[int]]:
        """Indices of the k best elements of each group, skipping repeats of the same point (ascents
        often end at the same corner of the box)."""
        out = []
        for region_id in range(n_groups):
            idx = (self.groups == region_id).nonzero().flatten()
            order = idx[torch.argsort(self.value[idx], descending=True, stable=True)].tolist()
            picked: list[int] = []
            for i in order:
                if len(picked) == k:
                    break
                if not any(int(self.sub[i]) == int(self.sub[j]) and torch.equal(self.x[i], self.x[j]) for j in picked):
                    picked.append(i)
            out.append(picked)
        return out


def sub_values(pair: Pair, objective: Objective, x: torch.Tensor) -> torch.Tensor:
    af, ag = pair.forward_layers(x, torch.float64)
    return objective.sub_values(af, ag)


def _value_and_grad(pair: Pair, obj: BatchObjective, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    af, ag = pair.forward_layers(x, torch.float64)
    v = obj.values(af, ag)
    (grad,) = torch.autograd.grad(v.sum(), x)
    return v.detach(), grad


def seed_starts(pair: Pair, objectives: list[Objective], space: SearchSpace, restarts: int,
                generator: torch.Generator | Sequence[torch.Generator], oversample: int = 4) -> SearchState:
    """Per region and sub-objective, the `restarts` best of (centre + oversample*restarts samples)."""
    xs, vs, gs, ss = [], [], [], []
    n_evals = []
    m = max(oversample * restarts - 1, 0)
    for region_id, objective in enumerate(objectives):
        cand = space.project(space.center(region_id)[None], torch.tensor([region_id]))
        if m:
            counts = [m if other == region_id else 0 for other in range(space.n_groups)]
            cand = torch.cat([cand, space.sample(counts, generator)[0]])
        with torch.no_grad():
            sv = sub_values(pair, objective, cand)  # (M, S)
        n_evals.append(len(cand))
        k = min(restarts, len(cand))
        top = torch.argsort(sv, dim=0, descending=True, stable=True)[:k]  # (k, S)
        for s in range(sv.shape[1]):
            xs.append(cand[top[:, s]])
            vs.append(sv[top[:, s], s])
            gs.append(torch.full((k,), region_id, dtype=torch.long))
            ss.append(torch.full((k,), s, dtype=torch.long))
    return SearchState(torch.cat(xs), torch.cat(vs), torch.cat(gs), torch.cat(ss), evaluations=torch.tensor(n_evals, dtype=torch.long))


def random_search(pair: Pair, objectives: list[Objective], space: SearchSpace,
                  generator: torch.Generator | Sequence[torch.Generator], deadline: float,
                  n_samples: int = RANDOM_SAMPLES, batch: int = 1024
                  ) -> SearchState:
    """`n_samples` uniform points per region; keeps the best per region. The floor every method must beat."""
    G = space.n_groups
    state = SearchState(torch.stack([space.center(region_id) for region_id in range(G)]),
                        torch.full((G,), -math.inf, dtype=torch.float64), torch.arange(G),
                        torch.zeros(G, dtype=torch.long))
    done = 0
    while done < n_samples:
        n = min(batch, n_samples - done)
        x, groups = space.sample([n] * G, generator)
        with torch.no_grad():
            for region_id, objective in enumerate(objectives):
                idx = (groups == region_id).nonzero().flatten()
                v, sub = sub_values(pair, objective, x[idx]).max(1)
                k = int(torch.argmax(v))
                if v[k] > state.value[region_id]:
                    state.x[region_id], state.value[region_id], state.sub[region_id] = x[idx[k]], v[k], sub[k]
        state.count(groups, G)
        state.record(G)
        done += n
        if time.perf_counter() > deadline and done < n_samples:
            state.truncated = True
            break
    return state


def apgd_checkpoints(iterations: int) -> list[int]:
    """Iterations w_j at which APGD may halve its step (Croce & Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * iterations) for q in p if 0 < q <= 1})


def ascend(pair: Pair, objectives: list[Objective], space: SearchSpace, state: SearchState, iterations: int,
           deadline: float, method: str = "apgd", step: float | None = None) -> SearchState:
    """PGD (fixed step, default 2.5/iterations of the radius, Madry et al. 2018) or APGD from `state.x`.

    Steps are in units of the region's radius (per-coordinate half-width for boxes). `state` holds
    the starts and is updated in place with the best point per element.
    """
    groups = state.groups
    obj = BatchObjective(objectives, groups, state.sub)
    shape = (-1,) + (1,) * len(space.input_shape)
    x = space.project(state.x, groups)
    f, grad = _value_and_grad(pair, obj, x)
    state.count(groups, space.n_groups)
    better = f > state.value
    best_x = torch.where(better.view(shape), x, state.x)
    best_v = torch.where(better, f, state.value)
    best_grad = grad.clone()
    n = len(x)
    if method == "pgd":
        eta = torch.full((n,), step if step is not None else max(2.5 / iterations, 0.01), dtype=torch.float64)
    else:
        eta = torch.full((n,), 2.0 if step is None else step, dtype=torch.float64)
    alpha, rho = 0.75, 0.75
    checkpoints = set(apgd_checkpoints(iterations))
    last_ck, eta_at_ck, best_at_ck = 0, eta.clone(), best_v.clone()
    successes = torch.zeros(n, dtype=torch.long)
    x_prev = x
    state.x, state.value = best_x, best_v
    state.record(space.n_groups)
    for k in range(iterations):
        if time.perf_counter() > deadline:
            state.truncated = True
            break
        z = space.project(x + space.step(grad, eta, groups), groups)
        if method == "apgd" and k > 0:
            x_new = space.project(x + alpha * (z - x) + (1 - alpha) * (x - x_prev), groups)
        else:
            x_new = z
        f_new, grad_new = _value_and_grad(pair, obj, x_new)
        state.count(groups, space.n_groups)
        successes += (f_new > f).long()
        improved = f_new > best_v
        best_x = torch.where(improved.view(shape), x_new, best_x)
        best_grad = torch.where(improved.view(shape), grad_new, best_grad)
        best_v = torch.where(improved, f_new, best_v)
        x_prev, x, f, grad = x, x_new, f_new, grad_new
        if method == "apgd" and (k + 1) in checkpoints:
            few = successes.double() < rho * (k + 1 - last_ck)
            stalled = (eta_at_ck == eta) & (best_at_ck == best_v)
            halve = few | stalled
            eta = torch.where(halve, eta / 2, eta)
            x = torch.where(halve.view(shape), best_x, x)
            x_prev = torch.where(halve.view(shape), best_x, x_prev)
            grad = torch.where(halve.view(shape), best_grad, grad)
            f = torch.where(halve, best_v, f)
            last_ck, eta_at_ck, best_at_ck = k + 1, eta.clone(), best_v.clone()
            successes.zero_()
        state.x, state.value = best_x, best_v
        state.record(space.n_groups)
    return state
