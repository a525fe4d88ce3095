"""Conv-net benchmark: cost and tightness of the bound methods on the vgg-small pair (mnist5k).

Pairs: vgg-small (`prunecert train --arch vgg-small`, 5 epochs, seed 0) and its coreset-pruned twin
(keep 0.5 of every hidden layer, seed 0), and the same twin distilled (`--fine-tune`, 2 epochs).
Regions: L-inf boxes of eps in {0.005, 0.01, 0.02} around the first `--images` mnist5k test images,
and the whole domain [0, 1]^784. Quantity: the certified upper bound on max_k |Delta_logit_k|.

- naive, diff-interval, diff-linear, crown-diff (CROWN on the merged network f - g) run batched over
  the boxes of one eps (seconds per region = batch time / boxes); diff-linear and crown-diff also run
  on the first box alone ("single"). diff-linear and crown-diff get `--time-limit` seconds per region
  (a truncated run is flagged); bab / lp / milp refuse this pair up front (its LP needs > 60000 columns).
- attack: APGD (`--attack-seconds` per region); ratio = bound / best attack value (>= 1: sound).
- peak RSS: ru_maxrss of a forked child that ran only that method (pages it touched itself).

    python benchmarks/conv.py [--images 20] [--time-limit 60] [--attack-seconds 2] [--no-distilled]
                              [--eps 0.005 ...] [--no-domain]      (quick: --images 4 --eps 0.005 --no-domain)

writes benchmarks/results/conv.json and conv.md. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, machine, mnist_boxes  # noqa: E402

from prunecert.adversarial import attack_many  # noqa: E402
from prunecert.certify import get_method  # noqa: E402
from prunecert.core.completion import make_pair  # noqa: E402
from prunecert.core.region_batch import RegionBatch  # noqa: E402
from prunecert.core.regions import Domain  # noqa: E402
from prunecert.fileutil import atomic_write_text  # noqa: E402
from prunecert.io import load_model, save_model  # noqa: E402

BATCHED = ("naive", "diff-interval", "diff-linear", "crown-diff", "alpha-crown-diff")
TIMED = ("diff-linear", "crown-diff", "alpha-crown-diff")
EPS = (0.005, 0.01, 0.02)


def vgg_pairs(distilled: bool) -> dict[str, tuple]:
    """{name: (f, g)}: the trained vgg-small and its pruned (and distilled) twins, cached in .cache/."""
    from prunecert.data import load_dataset
    from prunecert.prune import prune
    from prunecert.train import train_model

    CACHE.mkdir(parents=True, exist_ok=True)
    fp = CACHE / "vgg-mnist5k.pt"
    if not fp.is_file():
        save_model(train_model(arch="vgg-small", dataset_spec="mnist5k", epochs=5, seed=0, progress=False,
                               name="vgg-mnist5k"), fp)
    f = load_model(fp)
    out = {}
    kinds = [("coreset-keep0.5", 0)] + ([("coreset-keep0.5-distilled", 2)] if distilled else [])
    for name, epochs in kinds:
        gp = CACHE / f"vgg-mnist5k-{name}.pt"
        if not gp.is_file():
            data = load_dataset("mnist5k") if epochs else None
            save_model(prune(f, "coreset", keep=0.5, seed=0, fine_tune=epochs, data=data, progress=False), gp)
        out[name] = (f, load_model(gp))
    return out


def _child(pair, method, regions: RegionBatch, options, conn) -> None:
    torch.set_num_threads(1)
    fn = get_method(method).bounds
    start = time.perf_counter()
    pb = fn(pair, regions, **options)
    seconds = (time.perf_counter() - start) / regions.batch
    conn.send({"bound": pb.max_abs_logit_deviation().tolist(), "seconds": seconds,
               "truncated": any(pb.info.get("truncated", [])),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    conn.close()


def measure(pair, method, regions: RegionBatch, options) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(pair, method, regions, options, child))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


def best_attacks(pair, regions, seconds: float) -> list[float]:
    torch.set_num_threads(1)
    res = attack_many(pair, None, regions, method="apgd", budget_seconds=seconds, seed=0, progress=False)
    return [float(r.value) for r in res]


def run(args) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    load = {"before": open("/proc/loadavg").read().split()[:3]}
    for pair_name, (f, g) in vgg_pairs(args.distilled).items():
        pair = make_pair(f, g)
        sets = [(f"eps {e:g}", mnist_boxes(pair.input_shape, *pair.domain(), args.images, e)) for e in args.eps]
        if args.domain:
            sets.append(("domain", [Domain(*pair.domain())]))
        for region_name, regions in sets:
            batch = RegionBatch.of_regions(regions, pair.input_shape)
            found = best_attacks(pair, regions, args.attack_seconds)
            print(f"{pair_name} {region_name}: attack median {np.median(found):.4g}", file=sys.stderr, flush=True)
            for method in BATCHED:
                opts = {"time_limit": args.time_limit} if method in TIMED else {}
                for mode in ("batched", "single") if method in TIMED else ("batched",):
                    if mode == "single" and len(regions) == 1:
                        continue
                    n = len(regions) if mode == "batched" else 1
                    out = measure(pair, method, batch.select(slice(0, n)), opts)
                    ratio = [b / a for b, a in zip(out["bound"], found[:n]) if a > 0]
                    rows.append({"pair": pair_name, "region": region_name, "method": method, "mode": mode,
                                 "regions": n, "seconds_per_region": out["seconds"],
                                 "peak_rss_mb": round(out["peak_rss_mb"], 1), "truncated": out["truncated"],
                                 "median_bound": float(np.median(out["bound"])),
                                 "median_attack": float(np.median(found[:n])),
                                 "median_ratio": float(np.median(ratio)) if ratio else None,
                                 "bounds": out["bound"], "attacks": found[:n]})
                    print(f"  {method:13s} {mode:7s} {out['seconds']:.3f} s/region, bound {rows[-1]['median_bound']:.4g}"
                          f" (ratio {rows[-1]['median_ratio']}), {out['peak_rss_mb']:.0f} MB"
                          + (" TRUNCATED" if out["truncated"] else ""), file=sys.stderr, flush=True)
    load["after"] = open("/proc/loadavg").read().split()[:3]
    return {"benchmark": "conv", "args": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(),
            "load_average": load, "commit": commit, "rows": rows}


def markdown(res: dict) -> str:
    lines = ["# Conv-net certification benchmark (vgg-small, mnist5k)", "",
             f"commit {res['commit']}; {res['args']['images']} boxes per eps; time limit "
             f"{res['args']['time_limit']} s/region for diff-linear/crown-diff; APGD {res['args']['attack_seconds']} s/region; "
             f"one torch thread; load average before/after {res['load_average']['before']} / {res['load_average']['after']} "
             f"(a shared 2-core machine: times are inflated by the other jobs).", "",
             "| pair | region | method | mode | s/region | peak RSS MB | median bound | median attack | bound/attack | truncated |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        ratio = "" if r["median_ratio"] is None else f"{r['median_ratio']:.4f}"
        lines.append(f"| {r['pair']} | {r['region']} | {r['method']} | {r['mode']} | {r['seconds_per_region']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['median_bound']:.5g} | {r['median_attack']:.5g} | {ratio} | "
                     f"{'yes' if r['truncated'] else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--attack-seconds", type=float, default=2.0)
    ap.add_argument("--no-distilled", dest="distilled", action="store_false")
    ap.add_argument("--eps", type=float, nargs="+", default=list(EPS), help="box radii (quick runs: --eps 0.005)")
    ap.add_argument("--no-domain", dest="domain", action="store_false", help="leave out the whole-domain region")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "conv.json", json.dumps(res, indent=1))
    atomic_write_text(args.out / "conv.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
