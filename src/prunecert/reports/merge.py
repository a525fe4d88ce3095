"""Join audit reports of shards of one audit (`prunecert merge shard*/report.json --out all/`).

Shards are audits of the same pair with the same settings on disjoint test points (`--center`).
Everything measured per region is kept (regions renumbered in file order); everything measured over
all regions is recomputed from them the way `build_audit` computes it: per-layer certified and
empirical maxima, ratios, layer and overall verdicts, agreement counts, the headline. What does not
depend on the regions (accuracy, test-set deviations, provable bounds, compression) must be equal
in every shard. Each shard's domain region (with --domain) is the same region: it is kept once,
with the smallest certified bound and the largest value found (both remain sound / valid).
Counterexample panels are taken from the shards (regions renumbered); a layer's violation panel is
the shard's with the largest value.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from prunecert.errors import PrunecertError
from prunecert.reports.model import (EXIT_STATUS, Audit, Counterexample, LayerReport, LocalE2E, Ratios, RegionReport,
                                     Stage, Verdict)
from prunecert.reports.schema import validate

# a report.json document (schema prunecert.audit/1, validated before it is merged), with its file name
Named = tuple[str, dict[str, Any]]

# settings that must agree; "points" and "center_indices" are what shards split
SAME_SETTINGS = ("certify_method", "attack_method", "attack_budget_seconds", "eps", "domain", "samples")


class AuditMergeError(PrunecertError):
    """Audit reports that are not shards of one audit."""


def _check(docs: list[Named]) -> None:
    name0, a = docs[0]
    for name, b in docs[1:]:
        if b["schema"] != a["schema"]:
            raise AuditMergeError(f"{name}: schema {b['schema']!r} differs from {name0}'s {a['schema']!r}")
        for which in ("original", "pruned"):
            if b[which]["sha256"] != a[which]["sha256"]:
                raise AuditMergeError(f"{name}: the {which} model's weights (sha256 {b[which]['sha256'][:12]}...) "
                                      f"differ from {name0}'s ({a[which]['sha256'][:12]}...): not shards of the "
                                      f"same model pair")
        for key in SAME_SETTINGS:
            if b["settings"].get(key) != a["settings"].get(key):
                raise AuditMergeError(f"{name}: setting {key} = {b['settings'].get(key)!r} differs from {name0}'s "
                                      f"{a['settings'].get(key)!r}")
        if b["data"]["spec"] != a["data"]["spec"]:
            raise AuditMergeError(f"{name}: data {b['data']['spec']!r} differs from {name0}'s {a['data']['spec']!r}")
        for la, lb in zip(a["layers"], b["layers"]):
            for key in ("tolerance", "data", "provable", "neurons_kept"):
                if la[key] != lb[key]:
                    raise AuditMergeError(f"{name}: layer {la['index']} {key} = {lb[key]!r} differs from {name0}'s "
                                          f"{la[key]!r}")
        if b["reproducibility"]["seeds"] != a["reproducibility"]["seeds"]:
            raise AuditMergeError(f"{name}: seeds {b['reproducibility']['seeds']} differ from {name0}'s "
                                  f"{a['reproducibility']['seeds']}")
    seen: dict[str, str] = {}
    for name, d in docs:
        for r in d["regions"]:
            key = f"{r['source']}@{r['eps']}"
            if r["kind"] != "domain" and key in seen:
                raise AuditMergeError(f"{name}: region {r['source']} (eps {r['eps']}) is also in {seen[key]}: "
                                      f"shards must not overlap")
            seen[key] = name


def _ratio(num: float | None, den: float) -> float | None:
    if num is None:
        return None
    if den == 0:
        return 1.0 if num == 0 else None
    return float(num / den)


def merge_audits(docs: list[Named]) -> dict[str, Any]:
    """The report.json document of the audit the shards `docs` ((file name, document)) make up together."""
    for name, d in docs:
        validate(d, name)
    _check(docs)
    shards = [Audit.from_json(copy.deepcopy(d)) for _, d in docs]
    out = shards[0]
    regions: list[RegionReport] = []
    domain: RegionReport | None = None
    panels: list[Counterexample] = []
    renumber: list[dict[int, int | None]] = []  # per shard: old region index -> new (None: the domain)
    for s in shards:
        index: dict[int, int | None] = {}
        for r in s.regions:
            if r.kind == "domain":
                if domain is None:
                    domain = copy.deepcopy(r)
                else:  # the same region audited twice: both bounds sound, both values reached
                    domain.certified = [min(a, b) for a, b in zip(domain.certified, r.certified)]
                    domain.certified_local = [min(a, b) for a, b in zip(domain.certified_local, r.certified_local)]
                    domain.empirical = [max(a, b) for a, b in zip(domain.empirical, r.empirical)]
                    domain.empirical_local = [max(a, b) for a, b in zip(domain.empirical_local, r.empirical_local)]
                    domain.agreement = r.agreement if r.agreement == "refuted" else domain.agreement
                index[r.index] = None
                continue
            index[r.index] = len(regions)
            regions.append(copy.deepcopy(r))
            regions[-1].index = len(regions) - 1
        renumber.append(index)
    if domain is not None:
        domain.index = len(regions)
        regions.append(domain)
    tol = out.verdict.tolerance
    for r in regions:
        last = len(r.certified) - 1
        r.verdict = "certified" if r.certified[last] <= tol else "violated" if r.empirical[last] > tol else "unknown"
    for s, index in zip(shards, renumber):
        for c in s.counterexamples:
            new = index[c.region]
            if new is None:
                if domain is None:  # pragma: no cover - None is only recorded for a domain region
                    raise AuditMergeError("a counterexample names a domain region that was not kept")
                new = domain.index
            c.region = new
            c.id = re.sub(r"-r\d+$", f"-r{c.region}", c.id)  # per-region panels named by the new index
            panels.append(c)
    layers: list[LayerReport] = []
    verdicts: dict[int, str | None] = {}
    for l, layer in enumerate(out.layers):
        layer.certified = LocalE2E(max(r.certified_local[l] for r in regions), max(r.certified[l] for r in regions))
        layer.certified_domain = None if domain is None else LocalE2E(domain.certified_local[l], domain.certified[l])
        layer.empirical = LocalE2E(max(r.empirical_local[l] for r in regions), max(r.empirical[l] for r in regions))
        prov = layer.provable
        if prov is not None:
            prov.exceeded = max(layer.empirical.local, layer.data.local) > prov.eps
        compare = layer.certified_domain or layer.certified
        layer.ratios = Ratios(_ratio(layer.certified.end_to_end, layer.empirical.end_to_end),
                              None if prov is None else _ratio(prov.eps, compare.local),
                              None if prov is None else ("domain" if layer.certified_domain else "regions"))
        layer.verdict, layer.counterexample = _layer_verdict(layer, shards, l, out.settings["domain"])
        verdicts[l] = layer.verdict
        layers.append(layer)
    gated = [l for l in range(len(layers)) if layers[l].tolerance is not None]
    gv = [verdicts[l] for l in gated]
    overall = "violated" if "violated" in gv else "certified" if all(v == "certified" for v in gv) else "unknown"
    agreement = [r.agreement for r in regions]
    counts = {k: agreement.count(k) for k in ("proved", "refuted", "unknown")}
    last = len(layers) - 1
    m = out.metrics
    m.certified_agreement_rate, m.agreement_counts = counts["proved"] / len(regions), counts
    m.max_abs_logit_deviation = {"certified": layers[last].certified.end_to_end,
                                 "empirical": layers[last].empirical.end_to_end, "data": layers[last].data.end_to_end}
    out.verdict = Verdict(overall, EXIT_STATUS[overall], tol, gated, _headline(overall, layers, gated, len(regions)))
    out.layers, out.regions = layers, regions
    out.counterexamples = _dedupe(panels)
    out.settings["center_indices"] = [i for s in shards for i in s.settings["center_indices"]]
    out.settings["points"] = len(out.settings["center_indices"])
    out.timings = [Stage(f"shard {k}: {t.name}", t.seconds) for k, s in enumerate(shards) for t in s.timings]
    out.notes = [n for s in shards for n in s.notes if n not in out.notes] + out.notes
    out.notes = list(dict.fromkeys(out.notes + [f"merged from {len(shards)} shards: "
                                                + ", ".join(name for name, _ in docs)]))
    doc = out.to_json()
    validate(doc, "merged report")
    return doc


def _layer_verdict(layer: LayerReport, shards: list[Audit], l: int, domain: bool) -> tuple[str | None, str | None]:
    """As build_audit: certified if the max certified bound is within tolerance, violated if a point (an
    attack's or a test point) exceeds it (the shard panel with the largest value), else unknown."""
    tol = layer.tolerance
    if tol is None:
        return None, None
    if layer.certified.end_to_end <= tol:
        return "certified", None
    data_val = layer.data.end_to_end if domain else float("-inf")
    if max(layer.empirical.end_to_end, data_val) <= tol:
        return "unknown", None
    ids = [s.layers[l].counterexample for s in shards if s.layers[l].counterexample]
    return "violated", ids[0] if ids else None  # the same id in every shard; _dedupe keeps the largest


def _dedupe(panels: list[Counterexample]) -> list[Counterexample]:
    """Shard panels, one per id (the largest value wins: shards reuse ids like cx-layer2)."""
    by_id: dict[str, Counterexample] = {}
    for c in panels:
        if c.id not in by_id or c.value > by_id[c.id].value:
            by_id[c.id] = c
    return list(by_id.values())


def _headline(overall: str, layers: list[LayerReport], gated: list[int], n: int) -> str:
    last = layers[-1]
    cert, emp, tol = last.certified.end_to_end, last.empirical.end_to_end, last.tolerance
    if overall == "certified":
        return (f"max |Δ logit| <= {cert:.4g} is certified on all {n} regions (tolerance {tol:g})"
                + (f"; hidden layers {', '.join(map(str, gated[:-1]))} certified too" if len(gated) > 1 else ""))
    if overall == "violated":
        bad = [layer.index for layer in layers if layer.verdict == "violated"]
        return (f"a counterexample exceeds the tolerance at layer(s) {', '.join(map(str, bad))}; best attack "
                f"max |Δ logit| = {emp:.4g} (tolerance {tol:g})")
    return (f"not decided: certified max |Δ logit| <= {cert:.4g}, best attack {emp:.4g}, tolerance "
            f"{tol:g} lies between them (or a gated hidden layer is undecided)")
