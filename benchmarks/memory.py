"""Allocator and chunk size of certify on the CNN: interleaved runs of one fixed workload in fresh processes.

Workload: diff-linear on the vgg-small mnist5k coreset pair (`conv.vgg_pairs`, keep 0.5), L-inf boxes
of radius `--eps` around the first `--boxes` test images, bounded in chunks of `--batch` regions (as
certify does), one process, one torch thread. Each variant runs in its own fresh process, and the
variants alternate (ABAB...) `--rounds` times, so a change of machine load hits them alike.

- `--compare malloc`: glibc's defaults (PRUNECERT_BENCH_MALLOC=default) against
  `prunecert.scale.keep_freed_memory` (what the `prunecert` command and the benchmarks set);
- `--compare batch`: chunks of each `--batches` size (`certify.chunks.certify_batch_size`).

Per run: CPU and wall seconds per region (the bound calls only), peak RSS of the process, minor page
faults, load average. Writes benchmarks/results/memory-{malloc,batch}.{json,md}.

    python benchmarks/memory.py --compare malloc --eps 0.005 0.02 --rounds 4
    python benchmarks/memory.py --compare batch --batches 2 9 --eps 0.005 0.02 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prunecert.fileutil import atomic_write_text

ROOT = Path(__file__).resolve().parent


def child(eps: str, boxes: int, batch: int) -> dict[str, Any]:
    """The workload, in this process (its allocator already chosen by importing `common`)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from conv import region_sets, vgg_pairs

    from prunecert.certify import get_method
    from prunecert.core.completion import make_pair
    from prunecert.core.region_batch import RegionBatch

    torch.set_num_threads(1)
    f, g = vgg_pairs("mnist5k", False)["coreset-keep0.5"]
    pair = make_pair(f, g)
    regions = region_sets(pair, "mnist5k", [eps], boxes)[0][1]
    method = get_method("diff-linear").bounds
    chunks = [RegionBatch.of_regions(regions[a:a + batch], pair.input_shape) for a in range(0, boxes, batch)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu, wall = time.process_time(), time.perf_counter()
    for chunk in chunks:
        method(pair, chunk)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": (time.process_time() - cpu) / boxes, "wall_s": (time.perf_counter() - wall) / boxes,
            "peak_rss_mb": after.ru_maxrss / 1024, "minor_faults": after.ru_minflt - before.ru_minflt,
            "load": os.getloadavg()[0]}


def run_one(variant: str, compare: str, eps: str, boxes: int, batch: int) -> dict[str, Any]:
    env = dict(os.environ, PRUNECERT_BENCH_MALLOC="default" if variant == "default" else "keep", OMP_NUM_THREADS="1")
    args = [sys.executable, __file__, "--child", "--eps", eps, "--boxes", str(boxes), "--batch", str(batch)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return {"variant": variant, "eps": eps, "batch": batch, **json.loads(out.stdout.strip().splitlines()[-1])}


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted({(r["eps"], r["variant"]) for r in runs}):
        rs = [r for r in runs if (r["eps"], r["variant"]) == key]
        rows.append({"eps": key[0], "variant": key[1], "runs": len(rs),
                     **{f"median_{k}": statistics.median(r[k] for r in rs)
                        for k in ("cpu_s", "wall_s", "peak_rss_mb", "minor_faults")},
                     "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                     "load": [round(r["load"], 2) for r in rs]})
    return rows


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# certify on the CNN: {res['compare']} ({res['boxes']} vgg-small boxes, diff-linear, one process)", "",
             f"Commit {res['commit']}, {res['date']}. Variants alternate in fresh processes ({res['rounds']} rounds);"
             " CPU and wall per region of the bound calls; medians (every run in the JSON).", "",
             "| eps | variant | runs | CPU s/region | wall s/region | peak RSS MB (max) | minor faults | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["summary"]:
        lines.append(f"| {r['eps']} | {r['variant']} | {r['runs']} | {r['median_cpu_s']:.3f} | {r['median_wall_s']:.3f} | "
                     f"{r['median_peak_rss_mb']:.0f} ({r['max_peak_rss_mb']:.0f}) | {r['median_minor_faults']:.0f} | "
                     f"{', '.join(str(x) for x in r['load'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", choices=("malloc", "batch"), default="malloc")
    ap.add_argument("--eps", nargs="+", default=["0.005"])
    ap.add_argument("--boxes", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="chunk size (--compare malloc)")
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 9], help="chunk sizes (--compare batch)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.eps[0], args.boxes, args.batch)), flush=True)
        return
    variants = [("default", args.batch), ("keep", args.batch)] if args.compare == "malloc" else \
        [(f"batch {b}", b) for b in args.batches]
    runs = []
    for eps in args.eps:
        for i in range(args.rounds):
            for name, batch in variants:
                runs.append(run_one(name, args.compare, eps, args.boxes, batch))
                r = runs[-1]
                print(f"eps {eps} round {i + 1} {name}: {r['cpu_s']:.3f} s CPU, {r['wall_s']:.3f} s wall per region, "
                      f"peak {r['peak_rss_mb']:.0f} MB, load {r['load']:.2f}", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    res = {"compare": args.compare, "boxes": args.boxes, "rounds": args.rounds, "commit": commit,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs, "summary": summary(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"memory-{args.compare}.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(args.out / f"memory-{args.compare}.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
