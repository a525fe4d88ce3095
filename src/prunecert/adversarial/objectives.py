"""What an attack maximises: one Delta coordinate, the largest logit deviation, disagreement, evasion.

Every objective is the maximum over a few *sub-objectives* (one per sign and logit for
`max-logit-deviation`, one per wrong class for `disagreement`). Gradient attacks give each batch
element one sub-objective (so restarts and sub-objectives share one torch batch); the LP walk and the
MILP solve one linear program per sub-objective. The linear objectives are, per sub-objective s,

    value_s(x) = Cf[s] . a_L^f(x) + Cg[s] . a_L^g(x)          (a_L: flattened layer-L pre-activations)

so one pair of dense matrices (Cf, Cg) describes all of them. `evasive` (DIVA, Hong et al. 2022) is
on softmax probabilities, hence nonlinear: only the gradient and sampling methods take it.

Specs (CLI `--objective`):
  max-logit-deviation          max_j |f_j(x) - g_j(x)|
  layer:L:neuron:K[:min]       Delta_L[K] (K flat index into layer L's output; `:min` maximises -Delta)
  disagreement                 max_{j != y} g_j(x) - g_y(x), y = argmax f(centre); > 0 with
                               argmax f(x) = y is a counterexample to top-1 agreement
  evasive[:c]                  softmax(f(x))_y - c * softmax(g(x))_y, y = argmax f(centre), c = 1
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import torch

from prunecert.core.pair import Pair
from prunecert.errors import ConfigError

KINDS = ("max-logit-deviation", "neuron", "disagreement", "evasive")


@dataclass(frozen=True)
class Objective:
    """A parsed objective; `resolve` binds it to a pair (layer sizes, the label at the centre)."""

    kind: str
    spec: str
    layer: int = -1
    neuron: int = 0
    sign: float = 1.0
    c: float = 1.0
    label: int | None = None
    resolved: bool = False
    _cf: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _cg: torch.Tensor | None = field(default=None, repr=False, compare=False)
    names: tuple[str, ...] = ()

    @classmethod
    def linear(cls, layer: int, cf: npt.ArrayLike, cg: npt.ArrayLike, spec: str = "linear") -> Objective:
        """The objective cf . a_layer^f + cg . a_layer^g given as vectors (e.g. one MILP objective)."""
        def as_row(c: npt.ArrayLike) -> torch.Tensor:
            return torch.as_tensor(np.asarray(c, dtype=np.float64).reshape(1, -1))
        return cls("linear", spec, layer=int(layer), _cf=as_row(cf), _cg=as_row(cg), names=(spec,))

    # ------------------------------------------------------------------ binding
    def resolve(self, pair: Pair, center: npt.NDArray[np.float64] | torch.Tensor | None, label: int | None = None
                ) -> Objective:
        """Check indices against `pair`, fix the label (argmax f(centre) unless given), build (Cf, Cg)."""
        n_layers = pair.n_layers
        if self.kind == "linear":
            if not -n_layers <= self.layer < n_layers:
                raise ConfigError(f"objective {self.spec!r}: layer {self.layer} does not exist (0..{n_layers - 1})")
            size = math.prod(pair.layers_f[self.layer].out_shape)
            given_f, given_g = self.coefficients()
            if given_f.shape[1] != size or given_g.shape[1] != size:
                raise ConfigError(f"objective {self.spec!r}: coefficient vectors of length {given_f.shape[1]}/"
                                  f"{given_g.shape[1]}, layer {self.layer % n_layers} has {size} outputs")
            return replace(self, layer=self.layer % n_layers, resolved=True)
        layer = self.layer
        if self.kind == "neuron":
            if not -n_layers <= layer < n_layers:
                raise ConfigError(f"objective {self.spec!r}: layer {layer} does not exist (the pair has layers "
                                  f"0..{n_layers - 1}: {', '.join(l.name for l in pair.layers_f)})")
            layer %= n_layers
            size = math.prod(pair.layers_f[layer].out_shape)
            if not 0 <= self.neuron < size:
                raise ConfigError(f"objective {self.spec!r}: neuron {self.neuron} does not exist in layer {layer} "
                                  f"({pair.layers_f[layer].name}, {size} outputs of shape "
                                  f"{pair.layers_f[layer].out_shape})")
        else:
            layer = n_layers - 1
        n_cls = pair.n_classes
        if self.kind in ("disagreement", "evasive"):
            if label is None:
                if center is None:
                    raise ConfigError(f"objective {self.spec!r} needs a centre point (or a label) to fix the class y")
                with torch.no_grad():
                    label = int(pair.f.forward(torch.as_tensor(np.asarray(center))[None], torch.float64).argmax(1))
            if not 0 <= label < n_cls:
                raise ConfigError(f"objective {self.spec!r}: label {label} outside 0..{n_cls - 1}")
            if n_cls < 2:
                raise ConfigError(f"objective {self.spec!r} needs at least 2 classes, the pair has {n_cls}")
        size = math.prod(pair.layers_f[layer].out_shape)
        cf, cg, names = _linear_form(self.kind, size, self.neuron, self.sign, label)
        return replace(self, layer=layer, label=label, resolved=True, _cf=cf, _cg=cg, names=tuple(names))

    # ------------------------------------------------------------------ evaluation
    @property
    def is_linear(self) -> bool:
        return self.kind != "evasive"

    @property
    def n_sub(self) -> int:
        self._need_resolved()
        return len(self.names)

    def linear_form(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(layer, Cf, Cg): sub-objective s is Cf[s] . a_layer^f + Cg[s] . a_layer^g (float64, (S, n))."""
        self._need_resolved()
        return (self.layer, *self.coefficients())

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Cf, Cg) of a linear objective (resolved, or built by `linear`)."""
        if self._cf is None or self._cg is None:  # only evasive (softmax) has none once resolved
            raise ConfigError(f"objective {self.spec!r} is nonlinear (softmax); use --method pgd, apgd or random")
        return self._cf, self._cg

    def sub_values(self, af: list[torch.Tensor], ag: list[torch.Tensor]) -> torch.Tensor:
        """(B, S) sub-objective values from per-layer pre-activations of f and g (differentiable)."""
        self._need_resolved()
        a_f, a_g = af[self.layer].flatten(1), ag[self.layer].flatten(1)
        if self.kind == "evasive":
            pf = torch.softmax(a_f, 1)[:, self.label]
            pg = torch.softmax(a_g, 1)[:, self.label]
            return (pf - self.c * pg)[:, None]
        cf, cg = self.coefficients()
        return a_f @ cf.to(a_f.dtype).T + a_g @ cg.to(a_g.dtype).T

    def values(self, af: list[torch.Tensor], ag: list[torch.Tensor]) -> torch.Tensor:
        """(B,) objective values: the max over sub-objectives."""
        return self.sub_values(af, ag).max(1).values

    def _need_resolved(self) -> None:
        if not self.resolved:
            raise ConfigError(f"objective {self.spec!r} must be resolved against a pair first (Objective.resolve)")

    def describe(self) -> dict[str, str | int | float | None]:
        d: dict[str, str | int | float | None] = {"spec": self.spec, "kind": self.kind}
        if self.kind == "neuron":
            d.update(layer=self.layer, neuron=self.neuron, sense="min" if self.sign < 0 else "max")
        if self.kind in ("disagreement", "evasive"):
            d["label"] = self.label
        if self.kind == "evasive":
            d["c"] = self.c
        return d


def _linear_form(kind: str, size: int, neuron: int, sign: float, label: int | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    if kind == "neuron":  # one row: an identity of a conv layer's width would be ~1.3 GB
        e = torch.zeros(1, size, dtype=torch.float64)
        e[0, neuron] = 1.0
        return sign * e, -sign * e, [f"{'-' if sign < 0 else '+'}Delta[{neuron}]"]
    eye = torch.eye(size, dtype=torch.float64)  # size: the number of logits
    if kind == "max-logit-deviation":
        # sub-objectives +Delta_j and -Delta_j for every logit j
        cf = torch.cat([eye, -eye])
        return cf, -cf, [f"+Delta[{j}]" for j in range(size)] + [f"-Delta[{j}]" for j in range(size)]
    if kind == "disagreement":
        others = [j for j in range(size) if j != label]
        cg = eye[others] - eye[label]
        return torch.zeros_like(cg), cg, [f"g[{j}]-g[{label}]" for j in others]
    return None, None, [f"p_f[{label}]-c*p_g[{label}]"]


def parse_objective(spec: str) -> Objective:
    """Parse an objective spec (see the module docstring); a malformed spec is a ConfigError."""
    s = spec.strip()
    parts = s.split(":")
    head = parts[0].lower()
    if head == "max-logit-deviation" and len(parts) == 1:
        return Objective("max-logit-deviation", s)
    if head == "disagreement" and len(parts) == 1:
        return Objective("disagreement", s)
    if head == "evasive" and len(parts) <= 2:
        c = 1.0
        if len(parts) == 2:
            try:
                c = float(parts[1])
            except ValueError:
                raise ConfigError(f"objective {spec!r}: c must be a number, got {parts[1]!r}") from None
            if not math.isfinite(c) or c <= 0:
                raise ConfigError(f"objective {spec!r}: c must be a positive finite number, got {c}")
        return Objective("evasive", s, c=c)
    if head == "layer" and len(parts) in (4, 5) and parts[2].lower() == "neuron":
        try:
            layer, neuron = int(parts[1]), int(parts[3])
        except ValueError:
            raise ConfigError(f"objective {spec!r}: layer and neuron must be integers") from None
        sign = 1.0
        if len(parts) == 5:
            if parts[4].lower() not in ("min", "max"):
                raise ConfigError(f"objective {spec!r}: the suffix must be :min or :max, got {parts[4]!r}")
            sign = -1.0 if parts[4].lower() == "min" else 1.0
        if neuron < 0:
            raise ConfigError(f"objective {spec!r}: neuron index must be >= 0, got {neuron}")
        return Objective("neuron", s, layer=layer, neuron=neuron, sign=sign)
    raise ConfigError(f"unknown objective {spec!r}; expected max-logit-deviation, disagreement, evasive[:c] "
                      f"or layer:L:neuron:K[:min]")


def as_objective(objective: str | Objective) -> Objective:
    return objective if isinstance(objective, Objective) else parse_objective(str(objective))


class BatchObjective:
    """Element-wise objectives for a batch spanning several regions: element i maximises sub-objective
    `sub[i]` of `objectives[groups[i]]` (each region resolves its own label), in one tensor op."""

    cf: torch.Tensor  # (B, n) per element, linear objectives
    cg: torch.Tensor
    labels: torch.Tensor  # (B,) per element, evasive

    def __init__(self, objectives: list[Objective], groups: torch.Tensor, sub: torch.Tensor):
        first = objectives[0]
        self.kind, self.layer, self.c = first.kind, first.layer, first.c
        region_of, sub_of = groups.tolist(), sub.tolist()
        if first.is_linear:
            coefficients = [o.coefficients() for o in objectives]
            self.cf = torch.stack([coefficients[r][0][k] for r, k in zip(region_of, sub_of)])
            self.cg = torch.stack([coefficients[r][1][k] for r, k in zip(region_of, sub_of)])
        else:
            self.labels = torch.tensor([objectives[r].label for r in region_of], dtype=torch.long)

    def values(self, af: list[torch.Tensor], ag: list[torch.Tensor]) -> torch.Tensor:
        a_f, a_g = af[self.layer].flatten(1), ag[self.layer].flatten(1)
        if self.kind == "evasive":
            pf = torch.softmax(a_f, 1).gather(1, self.labels[:, None])[:, 0]
            pg = torch.softmax(a_g, 1).gather(1, self.labels[:, None])[:, 0]
            return pf - self.c * pg
        return (a_f * self.cf.to(a_f.dtype)).sum(1) + (a_g * self.cg.to(a_g.dtype)).sum(1)
