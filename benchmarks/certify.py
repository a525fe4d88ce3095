"""Certification benchmark: how tight each bound method is against the exact MILP value, and its cost.

Pair and boxes as in `common.py`: LeNet-300-100 trained on mnist5k and its coreset-pruned twin
(compression 0.9), L-inf boxes of eps in {0.005, 0.01, 0.02, 0.05} around mnist5k test images, and
the whole input domain [0, 1]^784. Quantity: the certified upper bound on max_k |Delta_logit_k|.

- naive, diff-interval, diff-linear, crown-diff (CROWN on f - g), alpha-crown-diff (alpha-CROWN on f - g) run batched
  over `--images` boxes per eps (default 100);
- lp, milp, bab run on the first `--exact-images` boxes per eps (default 3: they cost seconds to a
  minute per box) and on the domain. milp (`max_abs_only`) gets `--milp-seconds` per box for its
  MILPs, plus up to `--lp-seconds` for the LP tightening before them (the lp method's own limit);
  bab gets `--bab-seconds` per box, everything included.
- ratio = bound / exact, exact = the value reached by a MILP that closed (proved optimal) on that box.
- seconds: per box (batched methods: batch time / boxes); memory: peak resident memory (ru_maxrss)
  of a forked child process that ran only that method: the pages it touched itself, not the ones it
  shares untouched with the parent (whose RSS at fork time is reported beside it).

    python benchmarks/certify.py [--images 100] [--exact-images 3] [--milp-seconds 60] [--bab-seconds 10]

writes benchmarks/results/certify.json and certify.md (the table the README quotes). One torch thread.
Each exact value (per pair, eps and image) is also kept in benchmarks/.cache/certify-exact.json.

Quick re-measure of the cheap methods (~1-2 minutes; ratios from the cached exact values, if any):

    python benchmarks/certify.py --methods diff-linear,crown-diff --images 20 --batch 20 --repeat 5 --eps 0.005 0.01 0.02

writes certify-quick.{json,md} instead (`--name` to choose). Seconds are wall per region; the table
also gives CPU seconds and the load average around the run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, EPS, RESULTS, lenet_pair, machine, mnist_boxes  # noqa: E402

from prunecert.adversarial.witness import milp_witness, reach_search  # noqa: E402
from prunecert.certify import get_method  # noqa: E402
from prunecert.core.completion import make_pair  # noqa: E402
from prunecert.core.region_batch import RegionBatch  # noqa: E402
from prunecert.core.regions import Domain  # noqa: E402
from prunecert.fileutil import atomic_write_text  # noqa: E402

BATCHED = ("naive", "diff-interval", "diff-linear", "crown-diff", "alpha-crown-diff")
EXPENSIVE = ("lp", "milp", "bab")
GOALS = {"diff-linear within 1.5x of exact (median)": ("diff-linear", "median_ratio", 1.5),
         "bab within 1.05x of exact given 10 s (worst)": ("bab", "worst_ratio", 1.05),
         "diff-linear < 50 ms per region batched": ("diff-linear", "median_seconds", 0.05),
         "diff-linear <= 10 ms per region batched (issue 9)": ("diff-linear", "median_seconds", 0.01)}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


EXACT_CACHE = CACHE / "certify-exact.json"


def load_exact(key: str) -> dict[int, float]:
    """Cached exact values {image index: value} of one (pair, region) key: MILPs that closed."""
    if not EXACT_CACHE.is_file():
        return {}
    return {int(i): v for i, v in json.loads(EXACT_CACHE.read_text()).get(key, {}).items()}


def save_exact(key: str, exact: dict[int, float]) -> None:
    if not exact:
        return
    doc = json.loads(EXACT_CACHE.read_text()) if EXACT_CACHE.is_file() else {}
    doc[key] = {**doc.get(key, {}), **{str(i): v for i, v in exact.items()}}
    CACHE.mkdir(parents=True, exist_ok=True)
    atomic_write_text(EXACT_CACHE, json.dumps(doc, indent=1, sort_keys=True))


def _run_method(pair, method: str, lo: torch.Tensor, hi: torch.Tensor, options: dict, batch: int | None, conn,
                repeat: int = 1) -> None:
    """In a forked child: run `method` on the boxes (`batch` at a time, the fastest of `repeat` calls;
    None: one by one, once), send back bounds, times (wall and CPU), solver details, peak RSS."""
    torch.set_num_threads(1)
    fn = get_method(method).bounds
    rows = []
    step = batch or 1
    parts = [(lo[i:i + step], hi[i:i + step]) for i in range(0, len(lo), step)]
    for l, h in parts:
        seconds = cpu_seconds = float("inf")
        for _ in range(repeat if batch else 1):   # the fastest of `repeat` identical calls (a shared machine)
            start, cpu = time.perf_counter(), time.process_time()
            pb = fn(pair, l, h, **options)
            seconds = min(seconds, (time.perf_counter() - start) / len(l))
            cpu_seconds = min(cpu_seconds, (time.process_time() - cpu) / len(l))
        bound = pb.max_abs_logit_deviation().numpy()
        width = pb.delta[-1].width.reshape(len(l), -1).mean(1).numpy()
        extra = pb.info.get("milp") or pb.info.get("bab") or [{}] * len(l)
        for b in range(len(l)):
            e = extra[b]
            rows.append({"bound": float(bound[b]), "width": float(width[b]), "seconds": seconds, "cpu_seconds": cpu_seconds,
                         "reached": e.get("reached_max_abs", e.get("reached")), "closed": e.get("closed"),
                         "binaries": e.get("binaries"), "nodes": e.get("nodes"), "stop": e.get("stop"),
                         "refuted_dual_bounds": e.get("unsound_events")})
    conn.send({"rows": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    conn.close()


def _boxes(pair, regions) -> tuple[torch.Tensor, torch.Tensor]:
    """The regions' (lo, hi) stacked (checked once by RegionBatch); methods take boxes or a batch."""
    batch = RegionBatch.of_regions(regions, pair.input_shape)
    return batch.lo, batch.hi


def measure(pair, method: str, lo, hi, options: dict, batch: int | None, repeat: int = 1) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    base = _rss_mb()
    proc = ctx.Process(target=_run_method, args=(pair, method, lo, hi, options, batch, child, repeat))
    proc.start()
    out = parent.recv()
    proc.join()
    out["parent_rss_mb"] = base
    return out


def summarise(method: str, region: str, out: dict, exact: dict[int, float]) -> dict:
    rows = out["rows"]
    bounds = np.array([r["bound"] for r in rows])
    ratios = np.array([rows[i]["bound"] / v for i, v in exact.items() if i < len(rows) and v > 0])
    res = {"method": method, "region": region, "regions": len(rows),
           "median_bound": float(np.median(bounds)), "mean_logit_width": float(np.mean([r["width"] for r in rows])),
           "median_seconds": float(np.median([r["seconds"] for r in rows])),
           "median_cpu_seconds": float(np.median([r["cpu_seconds"] for r in rows])),
           "peak_rss_mb": round(out["peak_rss_mb"], 1), "parent_rss_mb": round(out["parent_rss_mb"], 1),
           "exact_regions": int(len(ratios)),
           "median_ratio": float(np.median(ratios)) if len(ratios) else None,
           "worst_ratio": float(np.max(ratios)) if len(ratios) else None}
    if method == "milp":
        res["milp_closed"] = int(sum(bool(r["closed"]) for r in rows))
        res["binaries"] = [r["binaries"] for r in rows]
        res["refuted_dual_bounds"] = int(sum(r["refuted_dual_bounds"] or 0 for r in rows))
    if method == "bab":
        res["nodes"] = [r["nodes"] for r in rows]
        res["stops"] = [r["stop"] for r in rows]
    return res


def run(args) -> dict:
    torch.set_num_threads(1)
    f, g, pair_info = lenet_pair(progress=False)
    pair = make_pair(f, g)
    from prunecert.data import load_dataset
    ds = load_dataset("mnist5k")
    pair_info["test_accuracy"] = {"original": float(np.mean(pair.f.predict(ds.x_test) == ds.y_test)),
                                  "pruned": float(np.mean(pair.g.predict(ds.x_test) == ds.y_test))}
    dlo, dhi = pair.domain()
    sets = [(f"eps={eps:g}", _boxes(pair, mnist_boxes(pair.input_shape, dlo, dhi, args.images, eps)))
            for eps in args.eps]
    if args.domain:
        sets.append(("domain", _boxes(pair, [Domain(dlo, dhi)])))
    options = {"naive": {}, "diff-interval": {}, "diff-linear": {}, "crown-diff": {}, "alpha-crown-diff": {},
               "lp": {"local": False, "margins": False, "time_limit": args.lp_seconds},
               "milp": {"time_limit": args.milp_seconds, "local": False, "max_abs_only": True,
                        "tighten_time_limit": args.lp_seconds, "witness": milp_witness(pair, seed=args.seed)},
               "bab": {"time_limit": args.bab_seconds, "seed": args.seed, "reach": reach_search(pair, args.seed)}}
    methods = [m for m in BATCHED + EXPENSIVE if m in args.methods]
    results, start, load = [], time.perf_counter(), [os.getloadavg()]
    for name, (lo, hi) in sets:
        n_exp = min(args.exact_images, len(lo))
        key = f"{pair_info['original']['sha256'][:16]}/{pair_info['pruned']['sha256'][:16]}/{name}"   # closed: exact
        outs = {m: measure(pair, m, lo[:n_exp], hi[:n_exp], options[m], batch=None) for m in EXPENSIVE if m in methods}
        if "milp" in outs:
            exact = {i: r["reached"] for i, r in enumerate(outs["milp"]["rows"]) if r["closed"]}
            save_exact(key, exact)
        else:
            exact = {i: v for i, v in load_exact(key).items() if i < n_exp}
        for m in BATCHED:
            if m in methods:
                outs[m] = measure(pair, m, lo, hi, options[m], batch=args.batch or len(lo), repeat=args.repeat)
        for m in methods:
            results.append(summarise(m, name, outs[m], exact))
            r = results[-1]
            print(f"{name:>10} {m:>13}: median bound {r['median_bound']:.4g}, ratio {r['median_ratio']}, "
                  f"{r['median_seconds']:.3f} s/region  [{time.perf_counter() - start:.0f} s]", flush=True)
    load.append(os.getloadavg())
    return {"schema": "prunecert.bench.certify/1", "pair": pair_info, "machine": {**machine(), "loadavg": load},
            "settings": {k: v for k, v in vars(args).items()}, "seconds": time.perf_counter() - start,
            "results": results, "goals": goals(results)}


def goals(results: list[dict]) -> dict:
    out = {}
    for text, (method, key, limit) in GOALS.items():
        vals = [r[key] for r in results if r["method"] == method and r[key] is not None and r["region"] != "domain"]
        if vals:    # a quick run (--methods) leaves some goals unmeasured
            out[text] = {"worst_over_eps": max(vals), "met": max(vals) <= limit}
    tight = []
    for r in results:
        n = next((x for x in results if x["method"] == "naive" and x["region"] == r["region"]), None)
        if r["method"] == "diff-linear" and n is not None:
            tight.append((r["region"], n["median_bound"] / r["median_bound"], n["mean_logit_width"] / r["mean_logit_width"]))
    if not tight:
        return out
    out["diff-linear 10x tighter than naive"] = {
        "max_abs_ratio_naive_over_diff_linear": {k: a for k, a, _ in tight},
        "width_ratio_naive_over_diff_linear": {k: b for k, _, b in tight},
        "met": all(a >= 10 for _, a, _ in tight)}
    return out


def markdown(doc: dict) -> str:
    p, s = doc["pair"], doc["settings"]
    acc = p["test_accuracy"]
    lines = [
        "# Certification benchmark",
        "",
        f"LeNet-300-100 on mnist5k (test accuracy {acc['original']:.3f}) vs its coreset-pruned twin "
        f"(compression 0.9, test accuracy {acc['pruned']:.3f}). Quantity: certified upper bound on "
        f"max_k |Delta_logit_k| over L-inf boxes around mnist5k test images (and the whole domain).",
        f"Batched methods: {s['images']} boxes per eps; lp / milp / bab: the first {s['exact_images']} "
        f"(they cost seconds to a minute each). Ratio = bound / exact, exact = value of a MILP that "
        f"closed within {s['milp_seconds']:g} s on that box (HiGHS presolve on, two random seeds per objective "
        f"and the larger dual bound kept; every optimum checked "
        f"against an apgd + LP-walk witness, which never beat it unless the milp row says so); bab had {s['bab_seconds']:g} s per box. "
        f"Ratios compare methods on the same boxes; a row's median bound is over its own boxes "
        f"({s['images']} or {s['exact_images']}), so compare bounds across rows only through the ratios.",
        "",
        "| region | method | boxes | median bound | median ratio | worst ratio | mean logit width | s / box | CPU s / box | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, f=".4g": "—" if v is None else format(v, f)  # noqa: E731
    for r in doc["results"]:
        extra = f" (closed {r['milp_closed']}/{r['regions']})" if r["method"] == "milp" else ""
        if r.get("refuted_dual_bounds"):
            extra += f" ({r['refuted_dual_bounds']} dual bounds refuted by the witness)"
        lines.append(f"| {r['region']} | {r['method']}{extra} | {r['regions']} | {fmt(r['median_bound'])} | "
                     f"{fmt(r['median_ratio'], '.4f')} | {fmt(r['worst_ratio'], '.4f')} | "
                     f"{fmt(r['mean_logit_width'])} | {fmt(r['median_seconds'], '.3f')} | "
                     f"{fmt(r.get('median_cpu_seconds'), '.4f')} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Goals (eps boxes):", ""]
    for text, g in doc["goals"].items():
        lines.append(f"- {text}: {'met' if g['met'] else 'NOT met'} — " +
                     json.dumps({k: v for k, v in g.items() if k != 'met'}, default=lambda x: round(x, 4)))
    batch = s.get("batch") or s["images"]
    load = doc["machine"].get("loadavg")
    lines += ["", f"Total {doc['seconds']:.0f} s on {doc['machine']['cpus']} CPUs, one torch thread "
              f"(peak RSS is the whole forked process, parent ≈ {doc['results'][0]['parent_rss_mb']:.0f} MB); "
              f"batched methods got {batch} boxes per call (the fastest of {s.get('repeat', 1)} calls)"
              + ("" if not load else f"; load average (1/5/15 min) {' / '.join(f'{x:.1f}' for x in load[0])} at the "
                 f"start, {' / '.join(f'{x:.1f}' for x in load[-1])} at the end") + ".", ""]
    return "\n".join(lines)


def rewrite_markdown(out: Path = RESULTS) -> None:
    """Re-render certify.md from certify.json (after a change to the table's layout only)."""
    doc = json.loads((out / "certify.json").read_text())
    atomic_write_text(out / "certify.md", markdown(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--exact-images", type=int, default=3)
    ap.add_argument("--milp-seconds", type=float, default=60.0)
    ap.add_argument("--bab-seconds", type=float, default=10.0)
    ap.add_argument("--lp-seconds", type=float, default=60.0)
    ap.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--methods", default=",".join(BATCHED + EXPENSIVE),
                    help="comma-separated subset (without milp, ratios use the cached exact values)")
    ap.add_argument("--batch", type=int, default=None, help="boxes per call of a batched method (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="time each batched call this many times, keep the fastest")
    ap.add_argument("--domain", action=argparse.BooleanOptionalAction, default=True, help="also the whole domain")
    ap.add_argument("--name", default=None, help="output file stem (default certify, or certify-quick for a subset)")
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(BATCHED + EXPENSIVE))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(BATCHED + EXPENSIVE)}")
    name = args.name or ("certify" if set(args.methods) == set(BATCHED + EXPENSIVE) else "certify-quick")
    doc = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    doc["settings"]["out"] = str(args.out)
    atomic_write_text(args.out / f"{name}.json", json.dumps(doc, indent=1, default=float))
    atomic_write_text(args.out / f"{name}.md", markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
