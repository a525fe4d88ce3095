"""Turn an audit's raw measurements into the `Audit` report: verdicts, ratios, counterexample panels.

The rules, in one place:
- a layer with tolerance T is *certified* when its certified end-to-end bound is <= T on every
  region, *violated* when some point of a region (an attack, a certify sample, or a test point when
  the whole domain is audited) reaches |Delta| > T, else *unknown*; the overall verdict combines the
  gated layers (violated beats unknown beats certified); the logits are always gated;
- the provable eps of pruning layer l is put on layer l+1 and compared with layer l+1's certified
  *local* bound (over the domain when audited: the theory's own setting);
- certified/empirical uses the end-to-end maxima over all regions.
"""

from __future__ import annotations

import datetime
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol, TypedDict

import numpy as np
import numpy.typing as npt
import torch

from prunecert.certify.result import CertifyResult
from prunecert.core.pair import Pair
from prunecert.core.regions import Array, Region
from prunecert.data import Dataset
from prunecert.io import weights_sha256
from prunecert.network import Network
from prunecert.reports.model import (EXIT_STATUS, Audit, ClassScore, Compression, Counterexample, LayerReport,
                                     LocalE2E, Metrics, ModelInfo, Provable, Ratios, RegionReport, Reproducibility,
                                     Stage, Verdict)

PACKAGES = ("prunecert", "torch", "numpy", "scipy", "cvxpy", "highspy", "clarabel", "matplotlib", "jinja2")


class DataMeasures(TypedDict):
    """`audit.measure_data`: the pair on the test set."""

    accuracy_f: float
    accuracy_g: float
    agreement: float                     # top-1 agreement of f and g
    end_to_end: Array                    # (layers,) largest |Delta_l| over the test points
    local: Array                         # (layers,) largest local |Delta_l|
    worst_index: npt.NDArray[np.int64]   # (layers,) test point reaching end_to_end


class AttackPoints(TypedDict):
    """`audit.attack_regions`: the points the attacks found."""

    points: list[list[Array]]                          # per region, every point found
    disagreements: dict[int, tuple[Array, int, int]]   # region -> (x, class of f, class of g)
    objectives: int                                    # attack objectives run
    truncated: int                                     # attacks cut short by the time budget
    attacks: int                                       # attacks run (objectives x their regions)


class PointMeasures(TypedDict):
    """`audit.evaluate_points`: per region and layer, the largest |Delta| over its points."""

    end_to_end: Array           # (regions, layers)
    local: Array                # (regions, layers)
    best: list[list[Array]]     # [region][layer] the point reaching end_to_end


class Found(AttackPoints, PointMeasures):
    """What the audit's attack stage found: its points (and certify's), measured at every layer."""


class AuditSettings(Protocol):
    """What `build_audit` reads of the audit's plan (`prunecert.audit.AuditPlan`, a floor above)."""

    original: Network
    pruned: Network | None
    dataset: Dataset
    data_spec: str
    centers: list[int]
    eps: list[float]
    domain: bool
    tolerances: list[float | None]
    certify_method: str
    attack_method: str
    attack_budget: float
    samples: int
    seed: int
    command: str | None
    sources: dict[str, str | None]
    max_panels: int
    load_seconds: float
    certify_budget: float | None


@dataclass
class Findings:
    """Everything `run_audit` measured (arrays are (regions, layers) unless noted)."""

    pair: Pair
    pruned: Network             # the compact pruned Network (what is deployed)
    regions: list[Region]
    data: DataMeasures
    cert: CertifyResult
    cert_e2e: Array
    cert_local: Array
    found: Found


def _model_info(net: Network, source: str | None) -> ModelInfo:
    return ModelInfo(net.name, source, weights_sha256(net), net.n_params(), net.flops(),
                     [layer.n_neurons for layer in net.layers()])


def _input_domain(net: Network) -> dict[str, float | str]:
    """The input box every region lies in (and where it came from: the model file or --input-domain)."""
    lo, hi = net.domain()
    given = net.metadata.get("input_domain", {}).get("source")
    return {"lo_min": float(lo.min()), "lo_max": float(lo.max()), "hi_min": float(hi.min()),
            "hi_max": float(hi.max()), "source": given or "model file"}


def _provable(pruned: Network, n_layers: int) -> dict[int, Provable]:
    """Layer l+1 -> the eps that pruning layer l guarantees for it (from the pruning record)."""
    rec = (pruned.metadata or {}).get("pruning") or {}
    valid_all = bool(rec.get("provable_bound_valid", False)) and not rec.get("fine_tune")
    out: dict[int, Provable] = {}
    for r in rec.get("layers", []) or []:
        index, eps = r.get("index"), r.get("eps_max")
        if isinstance(index, int) and eps is not None and 0 <= index < n_layers - 1:
            out[index + 1] = Provable(float(eps), float(r.get("delta", rec.get("delta", 0.1))), index,
                                      valid_all and bool(r.get("provable_bound_valid", True)))
    return out


def _pruning_summary(pruned: Network, given: bool) -> dict[str, Any] | None:
    rec = (pruned.metadata or {}).get("pruning")
    if not isinstance(rec, dict):
        return None
    keys = ("method", "target", "delta", "seed", "compression", "provable_bound_valid", "fine_tune", "original_name")
    out = {k: rec[k] for k in keys if k in rec}
    out["source"] = "given pruned model" if given else "pruned by this audit"
    return out


def _top3(pair: Pair, x: Array, classes: tuple[str, ...]) -> tuple[list[ClassScore], list[ClassScore]]:
    with torch.no_grad():
        xt = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(1, *pair.input_shape))
        out = []
        for net in (pair.f, pair.g):
            logits = net.forward(xt)[0].reshape(-1)
            p = torch.softmax(logits, 0)
            top = torch.argsort(p, descending=True)[:3].tolist()
            out.append([ClassScore(k, classes[k] if k < len(classes) else str(k), float(p[k]), float(logits[k]))
                        for k in top])
    return out[0], out[1]


def _max_abs(pair: Pair, x: Array, layer: int) -> float:
    """max |Delta_layer| at x alone (batch of one, as every reported value)."""
    with torch.no_grad():
        d = pair.deltas(torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(1, *pair.input_shape)))[layer]
    return float(d.abs().max())


def _source(region: Region) -> str:
    return str(region.describe().get("source") or region.describe()["kind"])


class _Panels:
    """Collects counterexample panels (at most `limit`, violations first), one per point."""

    def __init__(self, plan: AuditSettings, fx: Findings):
        self.plan, self.fx = plan, fx
        self.items: list[Counterexample] = []
        self.classes = tuple(plan.dataset.classes)

    def add(self, cid: str, kind: str, region: int, layer: int, x: Array, note: str,
            center: Array | None = None, force: bool = False) -> str | None:
        if any(c.id == cid for c in self.items):
            return cid
        flat = [float(v) for v in np.ravel(x)]
        if any(c.region == region and c.layer == layer and c.x == flat for c in self.items):
            return ""  # the same point is already shown (e.g. the worst point is the violation)
        if not force and len(self.items) >= self.plan.max_panels:
            return None
        r = self.fx.regions[region]
        if center is None and getattr(r, "eps", None) is not None:
            center = np.asarray(r.center, dtype=np.float64)
        top_f, top_g = _top3(self.fx.pair, x, self.classes)
        self.items.append(Counterexample(
            cid, kind, region, layer, _max_abs(self.fx.pair, x, layer), list(self.fx.pair.input_shape),
            flat, None if center is None else [float(v) for v in np.ravel(center)],
            top_f, top_g, note))
        return cid


def _layer_verdict(plan: AuditSettings, fx: Findings, l: int, panels: _Panels) -> tuple[str | None, str | None]:
    tol = plan.tolerances[l]
    if tol is None:
        return None, None
    if fx.cert_e2e[:, l].max() <= tol:
        return "certified", None
    b = int(np.argmax(fx.found["end_to_end"][:, l]))
    best = fx.found["end_to_end"][b, l]
    data_val = fx.data["end_to_end"][l] if plan.domain else -np.inf
    if max(best, data_val) <= tol:
        return "unknown", None
    if data_val > best:  # a test point (inside the audited domain) is the worst counterexample
        i = int(fx.data["worst_index"][l])
        x = np.asarray(plan.dataset.x_test[i], dtype=np.float64)
        cid = panels.add(f"cx-layer{l}", "violation", len(fx.regions) - 1, l, x,
                         f"test point {plan.data_spec}:test:{i}: |Δ| above tolerance {tol:g}", force=True)
    else:
        cid = panels.add(f"cx-layer{l}", "violation", b, l, fx.found["best"][b][l],
                         f"{_source(fx.regions[b])}: |Δ| above tolerance {tol:g}", force=True)
    return "violated", cid


def _logits_tolerance(plan: AuditSettings) -> float:
    tol = plan.tolerances[-1]
    if tol is None:  # pragma: no cover - plan_audit always gives the logits one
        raise ValueError("an audit needs a tolerance on the logits")
    return tol


def _region_verdict(plan: AuditSettings, fx: Findings, b: int) -> str:
    l, tol = fx.pair.n_layers - 1, _logits_tolerance(plan)
    if fx.cert_e2e[b, l] <= tol:
        return "certified"
    return "violated" if fx.found["end_to_end"][b, l] > tol else "unknown"


def _agreement(fx: Findings, method: str) -> list[str]:
    out = []
    for b, a in enumerate(fx.cert.agreement):
        attacked = fx.found["disagreements"].get(b)
        if a.verdict == "proved" and attacked is not None:
            raise RuntimeError(f"certify method {method!r} proved top-1 agreement on region {b} but the attack found "
                               f"a point where f picks {attacked[1]} and g picks {attacked[2]}: unsound, please report")
        out.append("refuted" if a.verdict == "refuted" or attacked is not None else a.verdict)
    return out


def _ratio(num: float | None, den: float) -> float | None:
    if num is None:
        return None
    if den == 0:
        return 1.0 if num == 0 else None
    return float(num / den)


def _headline(plan: AuditSettings, fx: Findings, overall: str, gated: list[int], verdicts: dict[int, str | None]) -> str:
    last = fx.pair.n_layers - 1
    cert, emp = float(fx.cert_e2e[:, last].max()), float(fx.found["end_to_end"][:, last].max())
    n = len(fx.regions)
    if overall == "certified":
        return (f"max |Δ logit| <= {cert:.4g} is certified on all {n} regions (tolerance {_logits_tolerance(plan):g})"
                + (f"; hidden layers {', '.join(map(str, gated[:-1]))} certified too" if len(gated) > 1 else ""))
    if overall == "violated":
        bad = [l for l in gated if verdicts[l] == "violated"]
        return (f"a counterexample exceeds the tolerance at layer(s) {', '.join(map(str, bad))}; best attack "
                f"max |Δ logit| = {emp:.4g} (tolerance {_logits_tolerance(plan):g})")
    return (f"not decided: certified max |Δ logit| <= {cert:.4g}, best attack {emp:.4g}, tolerance "
            f"{_logits_tolerance(plan):g} lies between them (or a gated hidden layer is undecided)")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_audit(plan: AuditSettings, fx: Findings, timings: list[tuple[str, float]]) -> Audit:
    """The Audit for `plan` from the measurements `fx` (see the module docstring for the rules)."""
    pair, n_layers, n_r = fx.pair, fx.pair.n_layers, len(fx.regions)
    panels = _Panels(plan, fx)
    provable = _provable(fx.pruned, n_layers)
    emp_e2e, emp_loc = fx.found["end_to_end"], fx.found["local"]
    dom = n_r - 1 if plan.domain else None
    kept = [layer.n_neurons for layer in fx.pruned.layers()]
    layers: list[LayerReport] = []
    verdicts: dict[int, str | None] = {}
    notes: list[str] = []
    for l, lf in enumerate(pair.layers_f):
        prov = provable.get(l)
        cert = LocalE2E(float(fx.cert_local[:, l].max()), float(fx.cert_e2e[:, l].max()))
        cert_dom = None if dom is None else LocalE2E(float(fx.cert_local[dom, l]), float(fx.cert_e2e[dom, l]))
        emp = LocalE2E(float(emp_loc[:, l].max()), float(emp_e2e[:, l].max()))
        data = LocalE2E(float(fx.data["local"][l]), float(fx.data["end_to_end"][l]))
        if prov is not None:
            prov.exceeded = max(emp.local, data.local) > prov.eps
            if prov.exceeded:
                notes.append(f"layer {l}: an observed local deviation ({max(emp.local, data.local):.4g}) exceeds the "
                             f"provable eps {prov.eps:.4g} of pruning layer {prov.from_layer}"
                             + ("" if prov.valid else " (the bound is void: the record says so)")
                             + ": the coreset guarantee's failure event (probability <= delta) was observed")
        compare = cert_dom or cert
        ratios = Ratios(_ratio(cert.end_to_end, emp.end_to_end),
                        None if prov is None else _ratio(prov.eps, compare.local),
                        None if prov is None else ("domain" if cert_dom else "regions"))
        verdict, cid = _layer_verdict(plan, fx, l, panels)
        verdicts[l] = verdict
        layers.append(LayerReport(l, lf.name, lf.n_neurons, kept[l] if l < len(kept) else lf.n_neurons, prov, cert,
                                  cert_dom, emp, data, ratios, plan.tolerances[l], verdict, cid))
    if fx.found.get("truncated"):
        notes.append(f"{fx.found['truncated']} of {fx.found['attacks']} attacks were cut short by the time budget "
                     f"({plan.attack_budget:g} s per region and objective): their values are machine-dependent "
                     f"lower bounds; a larger --attack-budget may find more")
    cut = sum(bool(t) for t in fx.cert.truncated)
    if cut:
        notes.append(f"the certify time budget ({plan.certify_budget:g} s per region) cut {plan.certify_method} short "
                     f"on {cut} of {n_r} regions: their certified bounds are sound but looser than the method's "
                     f"best; a larger --certify-budget may tighten them")
    agreement = _agreement(fx, plan.certify_method)
    regions = [RegionReport(b, "domain" if getattr(r, "eps", None) is None else "linf_ball", _source(r),
                            getattr(r, "eps", None), fx.cert_e2e[b].tolist(), fx.cert_local[b].tolist(),
                            emp_e2e[b].tolist(), emp_loc[b].tolist(), agreement[b], _region_verdict(plan, fx, b))
               for b, r in enumerate(fx.regions)]
    for b, (x, class_f, class_g) in sorted(fx.found["disagreements"].items())[:3]:
        panels.add(f"cx-disagree-r{b}", "disagreement", b, n_layers - 1, x,
                   f"{_source(fx.regions[b])}: f picks {class_f}, g picks {class_g}")
    for b in np.argsort(-emp_e2e[:, -1], kind="stable"):
        if panels.add(f"cx-worst-r{int(b)}", "worst", int(b), n_layers - 1, fx.found["best"][int(b)][-1],
                      f"largest logit deviation found in {_source(fx.regions[int(b)])}") is None:
            break
    gated = [l for l in range(n_layers) if plan.tolerances[l] is not None]
    gv = [verdicts[l] for l in gated]
    overall = "violated" if "violated" in gv else "certified" if all(v == "certified" for v in gv) else "unknown"
    counts = {k: agreement.count(k) for k in ("proved", "refuted", "unknown")}
    f, g = plan.original, fx.pruned
    metrics = Metrics(
        fx.data["accuracy_f"], fx.data["accuracy_g"], fx.data["agreement"], counts["proved"] / n_r, counts,
        Compression(f.n_params(), g.n_params(), 1 - g.n_params() / f.n_params(), f.flops(), g.flops(),
                    1 - g.flops() / f.flops() if f.flops() else 0.0),
        {"certified": float(fx.cert_e2e[:, -1].max()), "empirical": float(emp_e2e[:, -1].max()),
         "data": float(fx.data["end_to_end"][-1])})
    training = (f.metadata or {}).get("training") or {}
    seeds = {"audit": plan.seed, "split": 0}
    rec = (g.metadata or {}).get("pruning") or {}
    if isinstance(rec.get("seed"), int):
        seeds["pruning"] = rec["seed"]
    if isinstance(training.get("seed"), int):
        seeds["training"] = training["seed"]
    ds = plan.dataset
    return Audit(
        title=f"prunecert audit: {f.name} vs {g.name}",
        verdict=Verdict(overall, EXIT_STATUS[overall], _logits_tolerance(plan), gated,
                        _headline(plan, fx, overall, gated, verdicts)),
        original=_model_info(f, plan.sources.get("original")),
        pruned=_model_info(g, plan.sources.get("pruned")),
        pruning=_pruning_summary(g, plan.pruned is not None),
        data={"spec": plan.data_spec, "split": "test", "split_seed": 0, "n": int(len(ds.y_test)),
              "description": ds.description, "classes": list(ds.classes)},
        settings={"certify_method": plan.certify_method, "attack_method": plan.attack_method,
                  "attack_budget_seconds": plan.attack_budget, "points": len(plan.centers), "eps": plan.eps,
                  "domain": plan.domain, "center_indices": plan.centers, "samples": plan.samples,
                  "input_domain": _input_domain(f),
                  "certify_budget_seconds": plan.certify_budget,
                  "certify_truncated_regions": [b for b, t in enumerate(fx.cert.truncated) if t]},
        metrics=metrics, layers=layers, regions=regions, counterexamples=panels.items,
        timings=[Stage("load models and data", plan.load_seconds)] + [Stage(n, s) for n, s in timings],
        reproducibility=Reproducibility(plan.command, seeds, _versions(), f"{platform.platform()} ({sys.implementation.name})",
                                        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")),
        notes=notes,
    )
