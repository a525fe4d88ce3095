"""report.md: the audit as Markdown, for pull-request comments and terminals (same numbers as the HTML)."""

from __future__ import annotations

from prunecert.reports import fmt
from prunecert.reports.model import Audit

ICON = {"certified": "✅", "violated": "❌", "unknown": "⚠️", None: "·"}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    return [_row(header), "| " + " | ".join(sep) + " |", *(_row(r) for r in rows), ""]


def render_markdown(audit: Audit) -> str:
    """The Markdown report of `audit`."""
    a, m, v = audit, audit.metrics, audit.verdict
    dev = m.max_abs_logit_deviation
    out = [f"# {a.title}", "",
           f"**{ICON[v.overall]} {v.overall.upper()}** — {v.headline}", "",
           f"- tolerance on max |Δ logit|: {fmt.num(v.tolerance)} (gated layers: "
           f"{', '.join(map(str, v.gated_layers))}); exit status {v.exit_status}",
           f"- max |Δ logit|: certified {fmt.num(dev['certified'])}, best attack {fmt.num(dev['empirical'])}, "
           f"test data {fmt.num(dev['data'])}",
           f"- accuracy f {fmt.pct(m.accuracy_original)}, g {fmt.pct(m.accuracy_pruned)}; top-1 agreement on test "
           f"data {fmt.pct(m.agreement_rate)}; certified agreement over regions {fmt.pct(m.certified_agreement_rate, 1)} "
           f"({m.agreement_counts['proved']} proved, {m.agreement_counts['refuted']} refuted, "
           f"{m.agreement_counts['unknown']} unknown)",
           f"- compression: parameters {fmt.num(m.compression.params_original)} → "
           f"{fmt.num(m.compression.params_pruned)} ({fmt.pct(m.compression.params_removed, 1)} removed), FLOPs "
           f"{fmt.num(m.compression.flops_original)} → {fmt.num(m.compression.flops_pruned)} "
           f"({fmt.pct(m.compression.flops_removed, 1)} removed)", "",
           "## Per-layer deviation", "",
           f"Max |a_l^f − a_l^g| over neurons and all {len(a.regions)} regions. The provable ε of pruning layer "
           "l bounds the *local* deviation of layer l+1 (same input), so it is listed on layer l+1 and compared with "
           "that layer's certified local bound" + (" over the whole domain" if a.settings.get("domain") else "") + ".",
           ""]
    rows = []
    for l in a.layers:
        prov = fmt.DASH if l.provable is None else f"{fmt.num(l.provable.eps)} (δ={l.provable.delta}, from {l.provable.from_layer})" \
            + ("" if l.provable.valid else " void") + (" EXCEEDED" if l.provable.exceeded else "")
        verdict = f"{ICON[l.verdict]} {l.verdict}" if l.verdict else "—"
        if l.counterexample:
            verdict += f" ({l.counterexample})"
        rows.append([f"{l.index} {l.name}", fmt.kept(l.neurons_kept, l.neurons_total), prov,
                     fmt.num(l.certified.local), fmt.num(l.certified.end_to_end),
                     fmt.num(l.empirical.local), fmt.num(l.empirical.end_to_end),
                     fmt.num(l.data.local), fmt.num(l.data.end_to_end),
                     fmt.ratio(l.ratios.certified_over_empirical), fmt.ratio(l.ratios.provable_over_certified),
                     fmt.num(l.tolerance), verdict])
    out += _table(["layer", "kept", "provable ε", "cert. local", "cert. e2e", "attack local", "attack e2e",
                   "data local", "data e2e", "cert./emp.", "prov./cert.", "tolerance", "verdict"], rows,
                  "lrrrrrrrrrrrl")
    out += ["## Regions", ""]
    out += _table(["#", "region", "eps", "cert. max |Δ logit|", "attack max |Δ logit|", "agreement", "verdict"],
                  [[str(r.index), f"`{r.source}`", fmt.num(r.eps), fmt.num(r.certified[-1]), fmt.num(r.empirical[-1]),
                    r.agreement, r.verdict or "—"] for r in a.regions], "rlrrrll")
    if a.counterexamples:
        out += ["## Counterexamples", ""]
        out += _table(["id", "kind", "region", "layer", "max |Δ|", "f top-1", "g top-1"],
                      [[c.id, c.kind, str(c.region), str(c.layer), fmt.num(c.value),
                        f"{c.top_f[0].name} ({c.top_f[0].probability:.3f})",
                        f"{c.top_g[0].name} ({c.top_g[0].probability:.3f})"] for c in a.counterexamples], "llrrrll")
        out += ["The inputs are stored in report.json (`counterexamples[].x`) and drawn in report.html.", ""]
    out += ["## Models", ""]
    out += _table(["", "name", "params", "FLOPs", "neurons", "weights sha256"],
                  [[role, mi.name, fmt.num(mi.params), fmt.num(mi.flops), "-".join(map(str, mi.neurons)), f"`{mi.sha256}`"]
                   for role, mi in (("original f", a.original), ("pruned g", a.pruned))], "llrrll")
    out += ["## Time per stage", ""]
    out += _table(["stage", "seconds"], [[s.name, f"{s.seconds:.2f}"] for s in a.timings]
                  + [["total", f"{sum(s.seconds for s in a.timings):.2f}"]])
    r = a.reproducibility
    out += ["## Reproducibility", "",
            f"- data: `{a.data['spec']}` {a.data['split']} split (split seed {a.data['split_seed']}, {a.data['n']} points)",
            "- settings: " + ", ".join(f"{k}={v}" for k, v in a.settings.items() if k != "center_indices"),
            "- seeds: " + ", ".join(f"{k}={v}" for k, v in r.seeds.items()),
            "- versions: " + ", ".join(f"{k} {v}" for k, v in r.versions.items()) + f"; {r.platform}",
            f"- created: {r.created}", "", "```", r.command or "(Python API)", "```", ""]
    if a.notes:
        out += ["## Notes", "", *(f"- {n}" for n in a.notes), ""]
    return "\n".join(out)
