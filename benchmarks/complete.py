"""Complete verdicts benchmark: how many regions each stage settles, and what it costs.

1. Top-1 agreement on a deployable LeNet pair: LeNet-300-100 trained on mnist5k (`common.lenet_pair`'s
   original) and its coreset-pruned twin, keep 0.1 per hidden layer, distilled for 30 epochs on
   mnist5k (cached in benchmarks/.cache/). L-inf boxes of eps 0.01 and 0.02 around mnist5k test images
   0..N-1. Stage 1: diff-linear bounds (batched) with certify's sampling search; stage 2, on the regions
   still open: `certify.settle` (attack, then ReLU branch and bound) with `--seconds` per region.
   Every refuted region's point is replayed (float64 forward pass: f and g disagree there).
2. delta-top-1 equivalence (delta 0.9) over the whole input domain [0, 1]^5 of a small-input pair:
   a 5-input MLP with 6 hidden layers of 50 (trained on a synthetic 5-class task, a random teacher's
   argmax), pruned to half its neurons by coresets and distilled; decided by input splitting.

    python benchmarks/complete.py [--images 100] [--seconds 10] [--delta-seconds 60]

writes benchmarks/results/complete.json and complete.md (the table the README quotes). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, lenet_pair, machine, mnist_boxes  # noqa: E402

from prunecert.adversarial.witness import class_search  # noqa: E402
from prunecert.certify import certify  # noqa: E402
from prunecert.certify.classprop import ClassProperty, replay  # noqa: E402
from prunecert.certify.settle import settle  # noqa: E402
from prunecert.core.completion import make_pair  # noqa: E402
from prunecert.data import Dataset  # noqa: E402
from prunecert.io import load_model, save_model, weights_sha256  # noqa: E402
from prunecert.io.torch_io import network_from_module  # noqa: E402
from prunecert.prune import prune  # noqa: E402
from prunecert.train import evaluate, fit, mlp  # noqa: E402

EPS = (0.01, 0.02)
DISTILL = dict(method="coreset", keep=0.1, fine_tune=30, seed=0)


def distilled_pair():
    """(f, compact distilled g, description): pruned and distilled once, then cached."""
    from prunecert.data import load_dataset
    f, _, _ = lenet_pair()
    path = CACHE / "lenet300-mnist5k-coreset-keep0.1-distilled30.pt"
    g = load_model(path) if path.is_file() else None
    if g is None or g.metadata.get("pruning", {}).get("original_weights_sha256") != weights_sha256(f):
        g = prune(f, **DISTILL, data=load_dataset("mnist5k"), progress=True)
        save_model(g, path)
    ds = load_dataset("mnist5k")
    info = {"original_sha256": weights_sha256(f), "pruned": {"file": path.name, "sha256": weights_sha256(g),
                                                            "params": g.n_params(), **DISTILL},
            "params_original": f.n_params(), "accuracy_f": evaluate(f, ds.x_test, ds.y_test),
            "accuracy_g": evaluate(g, ds.x_test, ds.y_test)}
    return f, g, info


def agreement_stage(pair, eps: float, n: int, seconds: float) -> dict:
    lo, hi = pair.domain()
    regions = mnist_boxes(pair.input_shape, lo, hi, n, eps)
    t0 = time.perf_counter()
    res = certify(pair, None, regions, method="diff-linear", progress=False)
    t_bounds = time.perf_counter() - t0
    first = {v: sum(a.verdict == v for a in res.agreement) for v in ("proved", "refuted", "unknown")}
    search = class_search(pair, 0)
    rows, final = [], [a.verdict for a in res.agreement]
    for b, a in enumerate(res.agreement):
        if a.verdict != "unknown":
            continue
        blo, bhi = (v.reshape(pair.input_shape) for v in regions[b].bounding_box())
        s = settle(pair, blo, bhi, ClassProperty.agreement(), seconds, res.bounds.select(slice(b, b + 1)), search)
        replayed = s.point is not None and replay(pair, s.point, ClassProperty.agreement()) is not None
        if s.verdict == "refuted" and not replayed:
            raise RuntimeError(f"region {b}: a refutation that does not replay")
        final[b] = s.verdict
        rows.append({"region": regions[b].source, "verdict": s.verdict, "stage": s.stage,
                     "seconds": round(s.seconds, 3), "details": s.details})
        print(f"eps {eps}: {regions[b].source}: {s.verdict} ({s.stage}) in {s.seconds:.2f} s", file=sys.stderr)
    secs = [r["seconds"] for r in rows]
    by_stage = {}
    for r in rows:
        key = f"{r['verdict']} ({r['stage']})"
        by_stage[key] = by_stage.get(key, 0) + 1
    return {"eps": eps, "regions": n, "bounds_seconds_per_region": t_bounds / n, "after_bounds": first,
            "complete_stage": by_stage, "final": {v: final.count(v) for v in ("proved", "refuted", "unknown")},
            "open_seconds_median": float(np.median(secs)) if secs else None,
            "open_seconds_max": float(np.max(secs)) if secs else None, "open_regions": rows}


def small_pair(seed: int = 0):
    """A 5-input, 6x50 MLP on a synthetic 5-class task, and its distilled 50 % coreset twin."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(5, 5))
    centre = rng.uniform(0, 1, size=(5, 5))
    x = rng.uniform(0, 1, size=(6000, 5)).astype(np.float32)
    y = (-(((x[:, None, :] - centre[None]) ** 2) @ np.abs(teacher).sum(0)[:, None])[..., 0]).argmax(1)
    ds = Dataset("synthetic5", x[:5000], y[:5000].astype(np.int64), x[5000:], y[5000:].astype(np.int64), (5,),
                 tuple(str(c) for c in range(5)), "5 inputs, nearest of 5 weighted centres")
    torch.manual_seed(seed)
    module = mlp(5, [50] * 6, 5)
    fit(module, ds, epochs=30, seed=seed, progress=False)
    f = network_from_module(module, (5,), name="mlp5-6x50")
    g = prune(f, "coreset", keep=0.5, seed=seed, fine_tune=30, data=ds, progress=False)
    return f, g, {"accuracy_f": evaluate(f, ds.x_test, ds.y_test), "accuracy_g": evaluate(g, ds.x_test, ds.y_test),
                  "params_f": f.n_params(), "params_g": g.n_params()}


def delta_stage(delta: float, seconds: float) -> dict:
    f, g, info = small_pair()
    pair = make_pair(f, g)
    lo, hi = pair.domain()
    s = settle(pair, lo, hi, ClassProperty.delta_top1(delta), seconds, search=class_search(pair, 0), branching="input")
    return {**info, "delta": delta, "verdict": s.verdict, "stage": s.stage, "seconds": round(s.seconds, 3),
            "details": s.details, "point": None if s.point is None else s.point.reshape(-1).tolist()}


def to_markdown(out: dict) -> str:
    lines = ["# Complete verdicts", "",
             f"Pair: LeNet-300-100 on mnist5k (accuracy {out['lenet']['accuracy_f']:.3f}) and its coreset twin, keep 0.1, "
             f"distilled 30 epochs (accuracy {out['lenet']['accuracy_g']:.3f}, {out['lenet']['pruned']['params']:,} of "
             f"{out['lenet']['params_original']:,} parameters). Top-1 agreement on L-inf boxes around mnist5k test "
             f"images; stage 2 gets {out['seconds']:g} s per open region. Load: {out['load']}.", "",
             "| eps | regions | diff-linear: proved / refuted / unknown | settled by stage 2 | final: proved / refuted / "
             "unknown | stage 2 s/region (median / max) |", "|---|---|---|---|---|---|"]
    for r in out["agreement"]:
        a, f = r["after_bounds"], r["final"]
        stage2 = ", ".join(f"{v} {k}" for k, v in sorted(r["complete_stage"].items())) or "-"
        med = "-" if r["open_seconds_median"] is None else f"{r['open_seconds_median']:.2f} / {r['open_seconds_max']:.2f}"
        lines.append(f"| {r['eps']} | {r['regions']} | {a['proved']} / {a['refuted']} / {a['unknown']} | {stage2} | "
                     f"{f['proved']} / {f['refuted']} / {f['unknown']} | {med} |")
    d = out["delta_top1"]
    lines += ["", f"delta-top-1 equivalence (delta {d['delta']}) over the whole domain [0, 1]^5: 5-input MLP 6x50 "
              f"(accuracy {d['accuracy_f']:.3f}) vs its 50 % coreset twin, distilled (accuracy {d['accuracy_g']:.3f}): "
              f"**{d['verdict']}** by {d['stage']} in {d['seconds']:.1f} s ({d['details']}).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--delta-seconds", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    f, g, info = distilled_pair()
    pair = make_pair(f, g)
    out = {"machine": machine(), "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
           "seconds": args.seconds, "lenet": info,
           "agreement": [agreement_stage(pair, e, args.images, args.seconds) for e in EPS],
           "delta_top1": delta_stage(0.9, args.delta_seconds)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "complete.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (RESULTS / "complete.md").write_text(to_markdown(out), encoding="utf-8")
    print(to_markdown(out))


if __name__ == "__main__":
    main()
