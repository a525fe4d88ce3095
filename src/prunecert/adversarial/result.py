"""The attack result, and the float64 re-evaluation every reported value comes from.

Whatever a method computed internally (float32 gradients, an LP's objective value, a MILP incumbent),
the value reported to the user is recomputed here by a fresh float64 forward pass of both networks
at the returned point, so it is exactly reproducible from the saved x alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import torch

from prunecert.adversarial.objectives import Objective
from prunecert.adversarial.space import SearchSpace
from prunecert.core.pair import Pair
from prunecert.core.regions import Array
from prunecert.network import TensorLike

Indices = npt.NDArray[np.int64]


class RunFields(TypedDict):
    """What every result of one run records about the run."""

    method: str
    seed: int


class MilpDetails(TypedDict):
    """`AttackResult.methods["milp"]`: the sound upper bound on the maximum and how it was reached."""

    upper: float         # sound upper bound (LP bound where a MILP did not close)
    closed: bool         # every needed MILP closed: `value` is the exact maximum
    milps: int           # MILPs solved
    sub_objectives: int  # sub-objectives of the objective (skipped ones were bounded by their LP)
    binaries: int        # binary variables of the MILP


@dataclass
class Evaluation:
    """Float64 evaluation of an objective at a batch of points."""

    values: Array           # (B,) objective value (max over sub-objectives)
    sub: Indices            # (B,) index of the sub-objective reaching it
    class_f: Indices        # (B,) argmax f(x)
    class_g: Indices        # (B,) argmax g(x)
    logit_deviation: Array  # (B,) max_j |f_j(x) - g_j(x)|


def evaluate(pair: Pair, objective: Objective, x: TensorLike) -> Evaluation:
    """Fresh float64 forward pass of f and g at `x` (B, *input_shape).

    Bit-for-bit values depend on the batch (BLAS summation order); reported values use a batch of one.
    """
    points = torch.as_tensor(x if isinstance(x, torch.Tensor) else np.asarray(x)).to(torch.float64)
    if tuple(points.shape) == tuple(pair.input_shape):
        points = points[None]
    with torch.no_grad():
        af, ag = pair.forward_layers(points, torch.float64)
        sub = objective.sub_values(af, ag)
        best = sub.max(1)
        lf, lg = af[-1].flatten(1), ag[-1].flatten(1)
    return Evaluation(best.values.numpy(), best.indices.numpy(), lf.argmax(1).numpy(), lg.argmax(1).numpy(),
                      (lf - lg).abs().max(1).values.numpy())


@dataclass
class AttackResult:
    """The best point an attack found and its objective value (float64 re-evaluation at `x`).

    `trace`: best value so far after each step (the stages' internal batched evaluations, which may
    differ from `value` in the last ulp); `seconds`: wall time of the call (`attack_many`: of the whole
    call, shared by its regions); `truncated`: the budget cut the search short (then how far it got,
    hence the result, depends on the machine's speed); `methods`: per-method details (milp: the sound
    upper bound and whether every MILP closed).
    """

    x: Array
    value: float
    objective: str
    method: str
    seed: int
    seconds: float
    trace: list[float] = field(default_factory=list)
    sub_objective: str = ""
    class_f: int = -1
    class_g: int = -1
    label: int | None = None
    logit_deviation: float = float("nan")
    center: Array | None = None
    region: dict[str, Any] = field(default_factory=dict)  # `Region.describe()`
    truncated: bool = False
    evaluations: int = 0
    methods: dict[str, MilpDetails] = field(default_factory=dict)

    @property
    def disagreement(self) -> bool:
        """argmax f(x) != argmax g(x): x is a counterexample to top-1 agreement."""
        return self.class_f != self.class_g

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (without x itself, which `save_counterexample` writes to x.npz)."""
        return {
            "objective": self.objective, "method": self.method, "value": float(self.value),
            "sub_objective": self.sub_objective, "class_f": int(self.class_f), "class_g": int(self.class_g),
            "disagreement": self.disagreement, "label": self.label,
            "max_abs_logit_deviation": float(self.logit_deviation),
            "trace": [float(v) for v in self.trace], "seconds": float(self.seconds), "seed": int(self.seed),
            "truncated": bool(self.truncated), "evaluations": int(self.evaluations),
            "region": self.region, "methods": self.methods,
        }

    def __repr__(self) -> str:
        return (f"AttackResult(objective={self.objective!r}, method={self.method!r}, value={self.value:.6g}, "
                f"sub={self.sub_objective!r}, class_f={self.class_f}, class_g={self.class_g}, "
                f"seconds={self.seconds:.2f}, truncated={self.truncated})")


def best_result(pair: Pair, objective: Objective, space: SearchSpace, candidates: torch.Tensor, groups: torch.Tensor,
                group: int, *, method: str, seed: int, seconds: float, trace: list[float], truncated: bool = False,
                evaluations: int = 0, methods: dict[str, MilpDetails] | None = None) -> AttackResult:
    """Make each candidate of region `group` (its index in `space`) exactly inside it, re-evaluate in
    float64, keep the best."""
    idx = (groups == group).nonzero().flatten()
    pts = torch.stack([space.ensure_inside(candidates[i], group) for i in idx.tolist()])
    k = int(np.argmax(evaluate(pair, objective, pts).values))  # first maximum: deterministic
    # the reported numbers come from x alone (batch of one): BLAS may sum a batch in another order
    ev = evaluate(pair, objective, pts[k:k + 1])
    region = space.regions[group]
    center = getattr(region, "center", None)
    return AttackResult(
        x=pts[k].numpy().copy(), value=float(ev.values[0]), objective=objective.spec,
        sub_objective=objective.names[int(ev.sub[0])], class_f=int(ev.class_f[0]), class_g=int(ev.class_g[0]),
        label=objective.label, logit_deviation=float(ev.logit_deviation[0]),
        center=None if center is None else np.asarray(center, dtype=np.float64).reshape(pair.input_shape).copy(),
        region=region.describe(), method=method, seed=seed, seconds=seconds, trace=trace, truncated=truncated,
        evaluations=evaluations, methods={} if methods is None else methods)
