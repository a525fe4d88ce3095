"""The Audit data model: everything one `prunecert audit` run found, as plain typed data.

`Audit.to_json()` is the source of truth (`report.json`, schema ``prunecert.audit/1`` in
`audit.schema.json`); the HTML and Markdown renderers read an `Audit`, and `Audit.from_json` rebuilds
one from a saved report, so any report can be re-rendered without re-running the audit.

Units: every deviation is a max over neurons (and over regions where it says so) of
|a_l^f(x) - a_l^g(x)| in layer l's pre-activation units (the logits for the last layer).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

SCHEMA = "prunecert.audit/1"
VERDICTS = ("certified", "violated", "unknown")
EXIT_STATUS = {"certified": 0, "violated": 1, "unknown": 2}


@dataclass
class LocalE2E:
    """One measurement of a layer's deviation, local (this layer's own error) and end-to-end."""

    local: float
    end_to_end: float


@dataclass
class Provable:
    """The coreset theory's bound that pruning layer `from_layer` puts on this layer's local deviation.

    With probability >= 1 - delta over the sampling, for every input in the domain and every neuron j
    of this layer, |local deviation_j| <= eps (Mussay et al. 2020, computed in prunecert.prune.bounds).
    """

    eps: float
    delta: float
    from_layer: int
    valid: bool
    exceeded: bool = False  # an observed local deviation above eps: the probability-delta failure event


@dataclass
class Ratios:
    """The sandwich: certified/empirical ("how much is still unknown"), provable/certified ("how loose
    theory is"); None where undefined (a zero denominator with a non-zero numerator, no provable eps)."""

    certified_over_empirical: Optional[float]
    provable_over_certified: Optional[float]
    provable_compared_over: Optional[str] = None  # "domain" or "regions": which certified local bound


@dataclass
class LayerReport:
    index: int
    name: str
    neurons_total: int
    neurons_kept: int
    provable: Optional[Provable]
    certified: LocalE2E                     # max over all regions
    certified_domain: Optional[LocalE2E]    # over the whole input domain (when audited)
    empirical: LocalE2E                     # best attack / search point, max over regions
    data: LocalE2E                          # max over the test set
    ratios: Ratios
    tolerance: Optional[float] = None
    verdict: Optional[str] = None           # certified | violated | unknown; None: no tolerance here
    counterexample: Optional[str] = None    # id of the counterexample panel for a violation


@dataclass
class RegionReport:
    index: int
    kind: str                      # "linf_ball" or "domain"
    source: str                    # e.g. "mnist5k:test:17", or "domain"
    eps: Optional[float]
    certified: list[float]         # per layer, max |Delta_l| end-to-end
    certified_local: list[float]
    empirical: list[float]         # per layer, best value found (a lower bound on the true max)
    empirical_local: list[float]
    agreement: str                 # proved | refuted | unknown (top-1 of f and g over the region)
    verdict: Optional[str]         # against the logits' tolerance


@dataclass
class ClassScore:
    label: int
    name: str
    probability: float
    logit: float


@dataclass
class Counterexample:
    """A point worth looking at: a tolerance violation, a top-1 disagreement, or the worst input found."""

    id: str
    kind: str                      # violation | disagreement | worst
    region: int
    layer: int
    value: float                   # max |Delta_layer| at x (float64 forward pass)
    shape: list[int]
    x: list[float]
    center: Optional[list[float]]
    top_f: list[ClassScore]
    top_g: list[ClassScore]
    note: str = ""


@dataclass
class ModelInfo:
    name: str
    source: Optional[str]
    sha256: str
    params: int
    flops: int
    neurons: list[int]


@dataclass
class Compression:
    params_original: int
    params_pruned: int
    params_removed: float           # fraction in [0, 1]
    flops_original: int
    flops_pruned: int
    flops_removed: float


@dataclass
class Metrics:
    accuracy_original: float
    accuracy_pruned: float
    agreement_rate: float                  # top-1 agreement of f and g on the test set
    certified_agreement_rate: float        # fraction of regions where agreement is proved
    agreement_counts: dict[str, int]       # proved / refuted / unknown regions
    compression: Compression
    max_abs_logit_deviation: dict[str, float]  # certified / empirical / data


@dataclass
class Verdict:
    overall: str
    exit_status: int
    tolerance: float                       # on the logits
    gated_layers: list[int]                # layers whose verdict makes the overall one
    headline: str


@dataclass
class Stage:
    name: str
    seconds: float


@dataclass
class Reproducibility:
    command: Optional[str]
    seeds: dict[str, int]
    versions: dict[str, str]
    platform: str
    created: str


@dataclass
class Audit:
    """One audit: verdict, models, data, per-layer and per-region results, counterexamples, timings."""

    title: str
    verdict: Verdict
    original: ModelInfo
    pruned: ModelInfo
    pruning: Optional[dict[str, Any]]      # the pruned model's record summary (method, target, delta, ...)
    data: dict[str, Any]                   # spec, split, split_seed, n_test, description, class names
    settings: dict[str, Any]               # certify/attack methods, budget, eps, number of points, domain
    metrics: Metrics
    layers: list[LayerReport]
    regions: list[RegionReport]
    counterexamples: list[Counterexample]
    timings: list[Stage]
    reproducibility: Reproducibility
    schema: str = SCHEMA
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """The report.json document (validated against audit.schema.json before it is written)."""
        d = dataclasses.asdict(self)
        return {"schema": d.pop("schema"), **_clean(d)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Audit:
        """Rebuild an Audit from `to_json()` output (e.g. a saved report.json, schema-validated first)."""
        audit: Audit = _build(cls, doc)
        return audit

    def counterexample(self, cid: str | None) -> Counterexample | None:
        return next((c for c in self.counterexamples if c.id == cid), None)


# JSON values: what _clean returns and _build reads (any JSON document: typed by the schema, not here)
def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no inf/NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _build(tp: Any, value: Any) -> Any:
    """Construct `tp` (a dataclass, list[...], dict[...], Optional[...] or a primitive) from JSON data.

    `tp` is a type expression read from the dataclasses' own annotations, hence Any."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _build(args[0], value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    if origin is list:
        (arg,) = typing.get_args(tp)
        return [_build(arg, v) for v in value]
    if tp is float and isinstance(value, int):
        return float(value)
    return value
