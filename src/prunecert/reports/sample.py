"""A small synthetic `Audit` (no models, no solver): to preview the templates and to test renderers.

    python -m prunecert.reports.sample OUT_DIR   # writes a sample report.{json,html,md}

The numbers are made up but consistent (empirical <= certified, one tolerance violation with its
counterexample, one top-1 disagreement), so every part of a report is exercised.
"""

from __future__ import annotations

import sys

import numpy as np

from prunecert.reports.model import (Audit, ClassScore, Compression, Counterexample, LayerReport, LocalE2E, Metrics,
                                     ModelInfo, Provable, Ratios, RegionReport, Reproducibility, Stage, Verdict)


def _scores(rng: np.random.Generator, n: int = 10) -> list[ClassScore]:
    logits = rng.normal(0, 3, n)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)[:3]
    return [ClassScore(int(k), str(k), float(p[k]), float(logits[k])) for k in order]


def sample_audit(seed: int = 0, violated: bool = True) -> Audit:
    """A 3-layer, 3-region synthetic audit on 8x8 inputs; `violated` puts the logits over tolerance."""
    rng = np.random.default_rng(seed)
    tol = 0.5 if violated else 50.0
    shape = [1, 8, 8]
    center = rng.uniform(0, 1, 64)
    x = np.clip(center + rng.choice([-0.05, 0.05], 64), 0, 1)
    cex = [Counterexample("cx-logits", "violation" if violated else "worst", 1, 2, 1.9, shape, x.tolist(),
                          center.tolist(), _scores(rng), _scores(rng), "largest logit deviation found"),
           Counterexample("cx-disagree", "disagreement", 2, 2, 1.1, shape, rng.uniform(0, 1, 64).tolist(), None,
                          _scores(rng), _scores(rng), "f and g pick different classes")]
    regions = [
        RegionReport(0, "linf_ball", "digits:test:0", 0.01, [0.0, 0.31, 0.9], [0.0, 0.31, 0.52],
                     [0.0, 0.12, 0.4], [0.0, 0.12, 0.2], "proved", "unknown" if violated else "certified"),
        RegionReport(1, "linf_ball", "digits:test:0", 0.05, [0.0, 0.8, 2.5], [0.0, 0.8, 1.1],
                     [0.0, 0.5, 1.9], [0.0, 0.5, 0.9], "unknown", "violated" if violated else "certified"),
        RegionReport(2, "domain", "domain", None, [0.0, 9.0, 30.0], [0.0, 9.0, 12.0],
                     [0.0, 2.0, 1.5], [0.0, 2.0, 1.0], "refuted", "violated" if violated else "certified"),
    ]
    layers = [
        LayerReport(0, "layer0:linear", 20, 20, None, LocalE2E(0.0, 0.0), LocalE2E(0.0, 0.0), LocalE2E(0.0, 0.0),
                    LocalE2E(0.0, 0.0), Ratios(1.0, None)),
        LayerReport(1, "layer1:linear", 12, 4, Provable(40.0, 0.1, 0, True), LocalE2E(9.0, 9.0), LocalE2E(9.0, 9.0),
                    LocalE2E(2.0, 2.0), LocalE2E(0.7, 0.7), Ratios(4.5, 40.0 / 9.0, "domain")),
        LayerReport(2, "layer2:linear:logits", 10, 10, Provable(55.0, 0.1, 1, True), LocalE2E(12.0, 30.0),
                    LocalE2E(12.0, 30.0), LocalE2E(1.0, 1.9), LocalE2E(0.6, 1.2), Ratios(30.0 / 1.9, 55.0 / 12.0, "domain"),
                    tol, "violated" if violated else "certified", "cx-logits" if violated else None),
    ]
    overall = "violated" if violated else "certified"
    return Audit(
        title="prunecert audit: sample-f vs sample-g (synthetic)",
        verdict=Verdict(overall, 1 if violated else 0, tol, [2],
                        f"{'VIOLATED' if violated else 'CERTIFIED'}: synthetic sample report"),
        original=ModelInfo("sample-f", None, "0" * 64, 1500, 1440, [20, 12, 10]),
        pruned=ModelInfo("sample-g", None, "1" * 64, 700, 660, [20, 4, 10]),
        pruning={"method": "coreset", "delta": 0.1, "target": {"keep": 4}, "seed": 0, "provable_bound_valid": True},
        data={"spec": "digits", "split": "test", "split_seed": 0, "n": 360, "description": "synthetic",
              "classes": [str(i) for i in range(10)]},
        settings={"certify_method": "diff-interval", "attack_method": "auto", "attack_budget_seconds": 0.5,
                  "points": 1, "eps": [0.01, 0.05], "domain": True, "center_indices": [0], "samples": 64},
        metrics=Metrics(0.95, 0.91, 0.93, 1 / 3, {"proved": 1, "refuted": 1, "unknown": 1},
                        Compression(1500, 700, 1 - 700 / 1500, 1440, 660, 1 - 660 / 1440),
                        {"certified": 30.0, "empirical": 1.9, "data": 1.2}),
        layers=layers, regions=regions, counterexamples=cex,
        timings=[Stage("load", 0.1), Stage("measure", 0.2), Stage("certify", 1.5), Stage("attack", 2.0),
                 Stage("report", 0.4)],
        reproducibility=Reproducibility("prunecert audit sample", {"audit": seed}, {"prunecert": "sample"},
                                        "synthetic", "1970-01-01T00:00:00Z"),
        notes=["synthetic sample: the numbers are made up"],
    )


if __name__ == "__main__":  # pragma: no cover - manual preview
    from prunecert.reports.write import write_report

    out = sys.argv[1] if len(sys.argv) > 1 else "sample-report"
    print("\n".join(str(p) for p in write_report(sample_audit(), out)))
