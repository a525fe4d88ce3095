"""Conv-net benchmark: cost and tightness of the bound methods on vgg-small pairs (mnist5k, Fashion-MNIST).

Pairs, per data set (`--data`, default mnist5k and fashion): vgg-small (`prunecert train --arch
vgg-small`, 5 epochs, seed 0) against its coreset twin (keep 0.5 of every hidden layer, seed 0) and
the same twin distilled 2 epochs (`--fine-tune 2`). Models are trained once and cached in
benchmarks/.cache/ (a twin is rebuilt when its original changed). Regions (`--eps`): L-inf boxes of
each eps around the first `--images` test images, clipped to [0, 1], and `domain` (the whole [0, 1]^784).
Quantity: the certified upper bound on max_k |Delta_logit_k|.

- Methods (`--methods`, any registered name): each runs "batched" (one call over the boxes of one
  eps; seconds per region = call time / boxes) and "single" (the first box alone), in a forked child
  that runs only that call. Methods taking a time limit get `--time-limit` seconds per region (a
  truncated run is flagged: how many regions stopped early). A method that refuses the pair up front
  (bab/lp/milp: the pair's LP is too large) gets a "refused: <reason>" row; a name in DEFAULT_METHODS
  that this build does not register gets a "not registered" row (e.g. alpha-crown-diff before it is
  merged).
- attack: APGD (`--attack-seconds` per region, seed 0, in its own child); ratio = bound / best attack
  value (>= 1: sound).
- peak RSS: ru_maxrss of the child (torch, the two networks and the call's own work); CPU: the child's
  process time per region (on a quiet machine wall ~ CPU: one torch thread).

    python benchmarks/conv.py --jobs 2                              # the full run (see README), ~15 min on 2 idle cores
    python benchmarks/conv.py --data mnist5k --eps 0.005 --methods crown-diff --images 4   # a quick subset

writes benchmarks/results/conv.json and conv.md (`--out DIR` elsewhere). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, machine  # noqa: E402

from prunecert.adversarial import attack_many  # noqa: E402
from prunecert.certify.formulation import check_encodable  # noqa: E402
from prunecert.certify.methods import METHODS  # noqa: E402
from prunecert.certify.result import truncated_regions  # noqa: E402
from prunecert.core.completion import make_pair  # noqa: E402
from prunecert.core.pair import Pair  # noqa: E402
from prunecert.core.region_batch import RegionBatch  # noqa: E402
from prunecert.core.regions import Box, Domain, Region  # noqa: E402
from prunecert.data import load_dataset  # noqa: E402
from prunecert.errors import PrunecertError  # noqa: E402
from prunecert.fileutil import atomic_write_text  # noqa: E402
from prunecert.io import load_model, save_model, weights_sha256  # noqa: E402
from prunecert.network import Network  # noqa: E402
from prunecert.prune import prune  # noqa: E402
from prunecert.train import train_model  # noqa: E402

DATA = ("mnist5k", "fashion")
EPS = ("0.005", "0.01", "0.02", "domain")
# alpha-crown-diff: measured once registered (another branch adds it); until then a "not registered" row
DEFAULT_METHODS = ("naive", "diff-interval", "diff-linear", "crown-diff", "alpha-crown-diff", "bab")
TWINS = (("coreset-keep0.5", 0), ("coreset-keep0.5-distilled", 2))  # (name, distillation epochs)
TRAIN_EPOCHS = 5


def vgg_pairs(data: str, distilled: bool) -> dict[str, tuple[Network, Network]]:
    """{twin name: (f, g)}: vgg-small trained on `data` and its pruned (and distilled) twins, cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    fp = CACHE / f"vgg-{data}.pt"
    if not fp.is_file():
        print(f"training vgg-small on {data} ({TRAIN_EPOCHS} epochs; cached in {fp})", file=sys.stderr, flush=True)
        save_model(train_model(arch="vgg-small", dataset_spec=data, epochs=TRAIN_EPOCHS, seed=0, progress=False,
                               name=f"vgg-{data}"), fp)
    f = load_model(fp)
    out = {}
    for name, epochs in TWINS if distilled else TWINS[:1]:
        gp = CACHE / f"vgg-{data}-{name}.pt"
        g = load_model(gp) if gp.is_file() else None
        if g is None or g.metadata.get("pruning", {}).get("original_weights_sha256") != weights_sha256(f):
            print(f"pruning {fp.name} -> {gp.name}", file=sys.stderr, flush=True)
            g = prune(f, "coreset", keep=0.5, seed=0, fine_tune=epochs, progress=False,
                      data=load_dataset(data) if epochs else None)
            save_model(g, gp)
        out[name] = (f, g)
    return out


def region_sets(pair: Pair, data: str, eps_list: list[str], images: int) -> list[tuple[str, list[Region]]]:
    """[(name, regions)]: boxes around the first `images` test images per eps, and the domain."""
    dlo, dhi = pair.domain()
    x_test = load_dataset(data).x_test[:images].astype(np.float64)
    sets: list[tuple[str, list[Region]]] = []
    for e in eps_list:
        if e == "domain":
            sets.append(("domain", [Domain(dlo, dhi)]))
        else:
            sets.append((f"eps {e}", [Box.around(x.reshape(pair.input_shape), float(e), dlo, dhi,
                                                 source=f"{data}:test:{i}") for i, x in enumerate(x_test)]))
    return sets


def _in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn` in a forked child (one torch thread); its result plus the child's peak RSS and CPU time."""
    def target(conn) -> None:
        torch.set_num_threads(1)
        cpu = time.process_time()
        try:
            out = fn()
        except PrunecertError as e:  # a method refusing the pair (or the options) at run time
            out = {"refused": str(e)}
        out["cpu"] = time.process_time() - cpu
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send(out)
        conn.close()

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child,))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


def run_method(pair: Pair, method: str, lo: torch.Tensor, hi: torch.Tensor, time_limit: float) -> dict[str, Any]:
    """One call of `method` over the boxes (lo, hi): bounds, seconds per region, truncated regions."""
    registered = METHODS[method]
    options = {"time_limit": time_limit} if "time_limit" in registered.options else {}

    def call() -> dict[str, Any]:
        start = time.perf_counter()
        pb = registered.bounds(pair, lo, hi, **options)
        seconds = time.perf_counter() - start
        return {"bound": pb.max_abs_logit_deviation().tolist(), "seconds": seconds,
                "truncated": sum(truncated_regions(pb.info, len(lo)))}

    out = _in_child(call)
    out["seconds_per_region"] = out.pop("seconds", 0.0) / len(lo)
    out["cpu_per_region"] = out.pop("cpu") / len(lo)
    return out


def refusal(pair: Pair, method: str) -> str | None:
    """Why `method` cannot run on `pair` (decided before any work), or None."""
    if method not in METHODS:
        return "not registered in this build"
    if METHODS[method].encodes_pair:
        try:
            check_encodable(pair, method, "use diff-linear or crown-diff")
        except PrunecertError as e:
            return f"refused: {e}"
    return None


def best_attacks(pair: Pair, regions: list[Region], seconds: float) -> dict[str, Any]:
    """APGD's best value per region (seed 0), in a child so the parent stays small for the forks."""
    def call() -> dict[str, Any]:
        res = attack_many(pair, None, regions, method="apgd", budget_seconds=seconds, seed=0, progress=False)
        return {"values": [float(r.value) for r in res]}
    return _in_child(call)


def _load() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def run(args: argparse.Namespace) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    rows: list[dict[str, Any]] = []
    load = {"before": _load()}
    t0 = time.perf_counter()
    build = 0.0
    for data in args.data:
        t_build = time.perf_counter()
        pairs = vgg_pairs(data, args.distilled)
        build += time.perf_counter() - t_build
        for twin, (f, g) in pairs.items():
            pair = make_pair(f, g)
            name = f"{data}/{twin}"
            for region_name, regions in region_sets(pair, data, args.eps, args.images):
                batch = RegionBatch.of_regions(regions, pair.input_shape)
                lo, hi = batch.lo, batch.hi
                attack = best_attacks(pair, regions, args.attack_seconds)
                found = attack["values"]
                print(f"{name} {region_name}: APGD median {np.median(found):.5g} ({attack['cpu']:.1f} s CPU, "
                      f"{attack['peak_rss_mb']:.0f} MB)", file=sys.stderr, flush=True)
                for method in args.methods:
                    why = refusal(pair, method)
                    for mode in ("batched", "single") if len(regions) > 1 else ("batched",):
                        n = len(regions) if mode == "batched" else 1
                        row = {"pair": name, "data": data, "twin": twin, "region": region_name, "method": method,
                               "mode": mode, "regions": n, "median_attack": float(np.median(found[:n])),
                               "attacks": found[:n]}
                        out = {"refused": why} if why else run_method(pair, method, lo[:n], hi[:n], args.time_limit)
                        row.update(_summary(out, found[:n]))
                        rows.append(row)
                        print(f"  {_line(row)}", file=sys.stderr, flush=True)
                        if why:
                            break  # one row says it for both modes
                save(args.out, result(args, load, commit, t0, build, rows, partial=True))
    load["after"] = _load()
    return result(args, load, commit, t0, build, rows, partial=False)


def result(args: argparse.Namespace, load: dict[str, list[str]], commit: str, t0: float, build: float,
           rows: list[dict[str, Any]], partial: bool) -> dict[str, Any]:
    """The JSON document; `partial` while the run is still going (written after every region set)."""
    return {"benchmark": "conv", "args": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(),
            "load_average": {"after": _load(), **load}, "commit": commit, "partial": partial,
            "total_seconds": round(time.perf_counter() - t0, 1), "build_seconds": round(build, 1), "rows": rows}


def save(out: Path, res: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "conv.json", json.dumps(res, indent=1))
    atomic_write_text(out / "conv.md", markdown(res))


def _summary(out: dict[str, Any], found: list[float]) -> dict[str, Any]:
    if "refused" in out:
        return {"status": out["refused"] if out["refused"].startswith(("refused", "not registered"))
                else f"refused: {out['refused']}"}
    ratio = [b / a for b, a in zip(out["bound"], found) if a > 0]
    return {"status": "ok", "seconds_per_region": out["seconds_per_region"], "cpu_per_region": out["cpu_per_region"],
            "peak_rss_mb": round(out["peak_rss_mb"], 1), "truncated": out["truncated"],
            "median_bound": float(np.median(out["bound"])),
            "median_ratio": float(np.median(ratio)) if ratio else None, "bounds": out["bound"]}


def _line(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['method']:16s} {r['status']}"
    return (f"{r['method']:16s} {r['mode']:7s} {r['seconds_per_region']:.3f} s/region ({r['cpu_per_region']:.3f} CPU), "
            f"bound {r['median_bound']:.5g}, ratio {r['median_ratio']}, {r['peak_rss_mb']:.0f} MB"
            + (f", {r['truncated']} truncated" if r["truncated"] else ""))


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [f"# Conv-net certification benchmark (vgg-small; {', '.join(a['data'])})", "",
             f"commit {res['commit']}; {a['images']} boxes per eps; time limit {a['time_limit']} s/region for the "
             f"methods that take one; APGD {a['attack_seconds']} s/region; one torch thread; total "
             f"{res['total_seconds']:.0f} s (of which {res['build_seconds']:.0f} s training/pruning the models not "
             f"yet cached){'; PARTIAL: the run was still going' if res['partial'] else ''}; load average before/after {' '.join(res['load_average']['before'])} / "
             f"{' '.join(res['load_average']['after'])} on {res['machine']['cpus']} cores "
             f"(load above ~1 inflates the wall times; CPU s/region is less affected).", "",
             "| pair | region | method | mode | s/region | CPU s/region | peak RSS MB | median bound | median attack "
             "| bound/attack | truncated |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        head = f"| {r['pair']} | {r['region']} | {r['method']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | | | | |")
            continue
        ratio = "" if r["median_ratio"] is None else f"{r['median_ratio']:.4f}"
        trunc = f"{r['truncated']}/{r['regions']}" if r["truncated"] else ""
        lines.append(f"{head} {r['mode']} | {r['seconds_per_region']:.3f} | {r['cpu_per_region']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['median_bound']:.5g} | {r['median_attack']:.5g} | {ratio} | {trunc} |")
    return "\n".join(lines) + "\n"


def _names(valid: tuple[str, ...] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if valid is not None and n not in valid]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(valid or ())}")
        return names
    return parse


def _eps(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n != "domain" and not (n.replace(".", "", 1).isdigit() and float(n) > 0):
            raise argparse.ArgumentTypeError(f"eps {n!r}: expected positive numbers or 'domain'")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=_names(DATA), default=list(DATA), help="comma-separated: mnist5k,fashion")
    ap.add_argument("--eps", type=_eps, default=list(EPS), help="comma-separated radii and/or 'domain'")
    ap.add_argument("--methods", type=_names(tuple(METHODS) + DEFAULT_METHODS), default=list(DEFAULT_METHODS),
                    help="comma-separated bound methods")
    ap.add_argument("--images", type=int, default=20, help="boxes per eps (test images 0..N-1)")
    ap.add_argument("--time-limit", type=float, default=5.0, help="seconds per region for methods taking one")
    ap.add_argument("--attack-seconds", type=float, default=0.5, help="APGD seconds per region")
    ap.add_argument("--no-distilled", dest="distilled", action="store_false", help="only the coreset twin")
    ap.add_argument("--jobs", type=int, default=1,
                    help="data sets measured at once, one process (one torch thread) each: 2 on a quiet 2-core machine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    res = run_parallel(args) if args.jobs > 1 and len(args.data) > 1 else run(args)
    save(args.out, res)
    print(markdown(res))


def run_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """One subprocess per data set (at most `--jobs` at once), each writing its own results; merged in
    `--data` order. Each process runs one torch thread and forks its own children, so with as many
    idle cores as jobs the per-region times are those of a serial run."""
    t0, load = time.perf_counter(), {"before": _load()}
    rest = _strip(sys.argv[1:], ("--jobs", "--data", "--out"))
    parts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(args.data)
        running: list[tuple[str, subprocess.Popen[bytes]]] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                data = pending.pop(0)
                cmd = [sys.executable, __file__, "--data", data, "--out", str(Path(tmp) / data), *rest]
                running.append((data, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
            data, proc = running.pop(0)
            if proc.wait() != 0:
                raise SystemExit(f"conv.py --data {data} failed (exit {proc.returncode})")
            parts.append(json.loads((Path(tmp) / data / "conv.json").read_text()))
    parts.sort(key=lambda p: args.data.index(p["args"]["data"][0]))
    load["after"] = _load()
    first = parts[0]
    return {**first, "args": {k: v for k, v in vars(args).items() if k != "out"}, "load_average": load,
            "partial": False, "total_seconds": round(time.perf_counter() - t0, 1),
            "build_seconds": round(sum(p["build_seconds"] for p in parts), 1),
            "rows": [r for p in parts for r in p["rows"]]}


def _strip(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without `options` and their values (`--opt value` or `--opt=value`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
