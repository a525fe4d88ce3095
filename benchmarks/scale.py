"""Scale-out benchmark: `prunecert certify` / `attack` over many regions, 1 and 2 workers, local and Dask.

    python benchmarks/scale.py [--sizes 100,400] [--large 1600] [--attack-sizes 20]

Runs the CLI as a subprocess on the LeNet-300-100 pair (benchmarks/common.py) for every size and
executor (in-process `--workers 1`, `--workers 2` local processes, `--scheduler local --workers 2`:
an embedded Dask LocalCluster) and records the wall time (process start to exit: model loading and
worker start-up included), the speed-up over one worker, and the peak RSS of the main process and of
the largest worker (psutil polls the process tree every 0.1 s). The machine's load averages before
and after each run are recorded: on a shared machine the speed-ups are depressed by other work.
Writes benchmarks/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, lenet_pair, machine

EXECUTORS = {"1 worker": ["--workers", "1"], "2 local workers": ["--workers", "2"],
             "2 Dask workers": ["--scheduler", "local", "--workers", "2"],
             "1 worker 1 thread": ["--workers", "1", "--threads", "1"]}
EPS = 0.01
# fixed work for pgd (one restart, a budget it never reaches) so that times compare; auto is budgeted
ATTACK = {"pgd": ["--restarts", "1", "--budget-seconds", "60"], "auto": ["--budget-seconds", "0.3"]}


def centres(n: int) -> list[str]:
    """n centre specs: mnist5k test points first (1000), then training points (4000)."""
    specs = [f"mnist5k:test:0-{min(n, 1000) - 1}"]
    if n > 1000:
        specs.append(f"mnist5k:train:0-{n - 1000 - 1}")
    return [a for s in specs for a in ("--center", s)]


def run(args: list[str]) -> dict:
    """Run `prunecert ARGS`, polling the RSS of it and its children; wall time and peaks (MB)."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = psutil.Popen([sys.executable, "-m", "prunecert", *args], stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, env=env)
    peak_main, peak_worker, workers = 0, 0, set()
    while proc.poll() is None:
        try:
            peak_main = max(peak_main, proc.memory_info().rss)
            for child in proc.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                if rss > 50e6:  # a worker (not a tiny helper such as the resource tracker)
                    workers.add(child.pid)
                peak_worker = max(peak_worker, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode not in (0, 1, 2):
        raise RuntimeError(f"prunecert {' '.join(args)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_main_mb": round(peak_main / 1e6),
            "peak_rss_worker_mb": round(peak_worker / 1e6) if workers else None, "worker_processes": len(workers),
            "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,400", help="certify sizes run on every executor")
    ap.add_argument("--large", default="1600", help="certify sizes run with 2 local workers only (time)")
    ap.add_argument("--attack-sizes", default="20")
    ap.add_argument("--executors", default="1 worker,2 local workers,2 Dask workers",
                    help=f"comma-separated, from: {', '.join(EXECUTORS)}")
    ap.add_argument("--append", action="store_true", help="add the rows to the existing results file")
    ap.add_argument("--out", default=str(RESULTS / "scale"))
    opts = ap.parse_args()
    _, _, info = lenet_pair()
    models = [str(CACHE / info["original"]["file"]), str(CACHE / info["pruned"]["file"])]
    every = opts.executors.split(",")
    jobs = [("certify", "diff-linear", int(n), every) for n in opts.sizes.split(",") if n]
    jobs += [("certify", "diff-linear", int(n), ["2 local workers"]) for n in opts.large.split(",") if n]
    jobs += [("attack", m, int(n), every) for m in ("pgd", "auto") for n in opts.attack_sizes.split(",") if n]
    rows = json.loads(Path(opts.out).with_suffix(".json").read_text())["rows"] if opts.append else []
    with tempfile.TemporaryDirectory() as tmp:
        for command, method, n, executors in jobs:
            base = None
            for name in executors:
                args = [command, *models, *centres(n), "--eps", str(EPS), "--method", method, "-q", *EXECUTORS[name]]
                args += ["--json", str(Path(tmp) / "c.json")] if command == "certify" else ATTACK[method]
                r = run(args)
                base = base or (r["wall_s"] if name.startswith("1 worker") else None)
                row = {"command": command, "method": method, "regions": n, "executor": name, **r,
                       "speedup": round(base / r["wall_s"], 2) if base else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(opts, info, rows)  # after every row: a long run stopped early still leaves its numbers


def write(opts, info: dict, rows: list[dict]) -> None:
    command = "python benchmarks/scale.py " + " ".join(repr(a) if " " in a or not a else a for a in sys.argv[1:])
    path = Path(opts.out).with_suffix(".json")
    old = json.loads(path.read_text()) if opts.append and path.is_file() else {}
    commands = list(dict.fromkeys(old.get("commands", [old["command"]] if "command" in old else []) + [command]))
    doc = {"machine": {**machine(), "usable_cores": len(os.sched_getaffinity(0))}, "pair": info, "eps": EPS,
           "attack_options": ATTACK, "rows": rows, "commands": commands, "notes": old.get("notes", [])}
    out = Path(opts.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))


def markdown(doc: dict) -> str:
    lines = ["# Scale-out benchmark", "",
             (f"LeNet-300-100 pair (benchmarks/common.py), L-inf boxes of eps {doc['eps']} around mnist5k points "
             f"(test points first, then training points). `{'`; `'.join(doc['commands'])}` on "
             f"{doc['machine']['usable_cores']} usable cores. Wall time is the whole CLI process (model loading and worker start-up included); "
             f"speed-up is over the one-process run of the same size (`1 worker 1 thread` where there is one); "
             f"peak RSS per process (main, "
             f"largest worker). "
             f"Attack options: {doc['attack_options']}."), "",
             ("| command | method | regions | executor | wall s | speed-up | peak RSS main MB | peak RSS worker MB "
              "| load avg before → after |"), "|---|---|---:|---|---:|---:|---:|---:|---|"]
    lines[3:3] = [""] + [f"- {n}" for n in doc.get("notes", [])] if doc.get("notes") else []
    for r in doc["rows"]:
        lines.append(f"| {r['command']} | {r['method']} | {r['regions']} | {r['executor']} | {r['wall_s']} | "
                     f"{r['speedup'] or '—'} | {r['peak_rss_main_mb']} | {r['peak_rss_worker_mb'] or '—'} | "
                     f"{r['load_before'][0]} → {r['load_after'][0]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
