"""`prunecert certify`: sound deviation bounds between an original and a pruned model over regions.

Exit status: with --tolerance, 0 certified (max |Delta_logit| <= tau on every region, over --logits),
1 violated (a point with |Delta_logit| > tau was found), 2 unknown; without it the verdict is
delta-top-1 equivalence with --delta, else top-1 agreement: 0 proved, 1 refuted, 2 unknown. 3 is an
error (bad input, unpairable models).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from prunecert.adversarial.witness import certify_searches
from prunecert.certify import certify_stream, make_pair
from prunecert.certify.stream import CertifyWriter
from prunecert.cli.command import Options, command
from prunecert.cli.options import Centers, CertifyMethod, Eps, InputDomain, Norm, Original, Pruned, RegionName, Seed, Vnnlib
from prunecert.cli.options import Scheduler, Threads, Workers, cli_regions
from prunecert.core.pair import Pair
from prunecert.core.regions import Region
from prunecert.errors import ConfigError
from prunecert.fileutil import check_output_dir, check_output_file, sweep_stale_temps
from prunecert.io import load_model, parse_input_domain, weights_sha256
from prunecert.io.vnnlib import write_deviation_property
from prunecert.reports import fmt
from prunecert.stage_budgets import CERTIFY_SAMPLES

EXIT = {"certified": 0, "violated": 1, "unknown": 2, "proved": 0, "refuted": 1}


@dataclass(frozen=True, kw_only=True)
class CertifyOptions(Options):
    """`prunecert certify`'s command line (the fields, in --help order)."""

    original: Original
    pruned: Pruned
    center: Centers = None
    eps: Eps = None
    norm: Norm = "inf"
    region: RegionName = None
    vnnlib: Vnnlib = None
    method: CertifyMethod = "diff-linear"
    tolerance: Annotated[Optional[float], typer.Option(help="Tolerance tau on max |Delta_logit| for the verdict.")] = None
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the result as JSON (schema prunecert.certify/1).")] = None
    export_onnx: Annotated[Optional[Path], typer.Option(
        "--export-onnx", help="Write f - g as ONNX plus one VNN-LIB property |Delta_k| <= tau per region and logit "
                              "into this folder.")] = None
    time_limit: Annotated[Optional[float], typer.Option(
        help="Seconds per region (diff-linear, crown-diff, alpha-crown-diff, lp, milp, bab); past it the method stops early and says "
             "so.")] = None
    samples: Annotated[int, typer.Option(
        help="Points sampled per region by the counterexample search.")] = CERTIFY_SAMPLES
    batch_size: Annotated[Optional[int], typer.Option(
        help="Regions bounded at once (one chunk of work; default: as many as fit a memory budget, at most 32).")] = None
    seed: Seed = 0
    input_domain: InputDomain = None
    logits: Annotated[Optional[str], typer.Option(
        help="Comma-separated logits K,... the tolerance verdict is over (epsilon-equivalence on chosen outputs; "
             "default all).")] = None
    delta: Annotated[Optional[float], typer.Option(
        help="Also decide delta-top-1 equivalence: wherever f's softmax confidence in c exceeds DELTA (in [0.5, 1)), "
             "g predicts c.")] = None
    complete: Annotated[Optional[float], typer.Option(
        help="Seconds per region to settle open top-1 / delta-top-1 verdicts by attack + branch and bound (on with "
             "--method bab; refused on nets whose LP is too large, e.g. CNNs).")] = None
    workers: Workers = None
    scheduler: Scheduler = None
    threads: Threads = None
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or lines.")] = False

    def checked(self) -> CertifyOptions:
        if self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.json_out is not None:  # every output is checked before the first write (and before any work)
            check_output_file(self.json_out, "--json")
        if self.export_onnx is not None:
            check_output_dir(self.export_onnx, "--export-onnx")
            if self.norm != "inf" and not self.region and not self.vnnlib:
                raise ConfigError("--export-onnx writes VNN-LIB boxes; use --norm inf (an L2 ball is not a box)")
        parse_logits(self.logits)
        return self


@command("certify", CertifyOptions, epilog="Example: prunecert certify lenet.pt lenet-pruned.pt --center "
                                           "mnist5k:test:0-9 --eps 0.02 --tolerance 0.5 --json certify.json")
def certify_command(o: CertifyOptions) -> int:
    """Certify how far PRUNED can deviate from ORIGINAL (every layer, local and end-to-end) over regions.

    Example: prunecert certify lenet.pt lenet-pruned.pt --center mnist5k:test:0 --eps 0.02 --tolerance 0.5
    """
    start = time.perf_counter()
    domain = parse_input_domain(o.input_domain)
    net_f, net_g = load_model(o.original, input_domain=domain), load_model(o.pruned, input_domain=domain)
    pair = make_pair(net_f, net_g)
    regions = cli_regions(pair, o)
    models = {"original": {"path": str(o.original), "sha256": weights_sha256(net_f)},
              "pruned": {"path": str(o.pruned), "sha256": weights_sha256(net_g)}}
    # the attacks certify's methods use are injected here (certify does not import adversarial)
    with CertifyWriter(o.json_out, models) as result:
        for first, part in certify_stream(pair, None, regions, method=o.method, tolerance=o.tolerance,
                                          time_limit=o.time_limit, progress=not o.quiet, seed=o.seed,
                                          samples=o.samples, batch_size=o.batch_size, logits=parse_logits(o.logits),
                                          delta=o.delta, complete=o.complete, workers=o.workers,
                                          scheduler=o.scheduler, threads=o.threads,
                                          **certify_searches(o.method, pair, o.seed)):
            result.add(first, part)
        seconds = time.perf_counter() - start
        if o.export_onnx is not None:
            export_interop(pair, regions, result, o.export_onnx)
        result.finish(seconds)
    _print(result, seconds)
    verdict = result.verdict if o.tolerance is not None else \
        result.delta_top1_verdict if o.delta is not None else result.agreement_verdict
    assert verdict is not None, "a tolerance (a delta) gives every run a verdict (a delta-top-1 verdict)"
    return EXIT[verdict]


def parse_logits(text: str | None) -> list[int] | None:
    """`--logits 0,3` -> [0, 3] (ConfigError naming the bad item)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--logits: expected comma-separated logit indices, got {text!r}") from None


def export_interop(pair: Pair, regions: Sequence[Region], result: CertifyWriter, folder: Path) -> list[Path]:
    """f - g as one ONNX file and a VNN-LIB property per (region, logit): |Delta_k| <= tau on its box.

    tau is the tolerance when given, else the region's certified bound (so an external verifier can
    re-check our bound). Files are built in a temporary folder and moved into place at the end, so an
    error leaves no partial export.
    """
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _export(pair, regions, result, folder)
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _export(pair: Pair, regions: Sequence[Region], result: CertifyWriter, folder: Path) -> list[Path]:
    # imported here: onnx costs ~0.6 s of start-up (measured) that no other use of the command line needs
    from prunecert.io.onnx_io import save_difference_onnx

    n_out = pair.n_classes
    written = []
    sweep_stale_temps(folder, "export", suffix=".d")  # left by a run killed while exporting
    with tempfile.TemporaryDirectory(prefix=f".export.{os.getpid()}.", suffix=".d", dir=folder) as name:
        tmp = Path(name)
        save_difference_onnx(pair.f, pair.g, tmp / "difference.onnx")
        rows = []
        for b, r in enumerate(regions):
            lo, hi = (a.reshape(-1) for a in r.bounding_box())
            tau = result.tolerance if result.tolerance is not None else float(result.max_abs_logit_deviation[b])
            for k in range(n_out):
                file = f"region{b}_logit{k}.vnnlib"
                write_deviation_property(tmp / file, lo, hi, k, tau, n_outputs=n_out)
                rows.append(f"difference.onnx,{file},60")
        (tmp / "instances.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        for item in sorted(tmp.iterdir()):
            target = folder / item.name
            shutil.move(str(item), str(target))
            written.append(target)
    return written


def _print(result: CertifyWriter, seconds: float) -> None:
    console = Console()
    table = Table(title=f"certified deviation bounds ({result.method}), {result.n_regions} region(s), "
                        f"{seconds:.2f} s")
    for col in ("layer", "max |local|", "max |end-to-end|"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for meta, (local, e2e) in zip(result.layer_meta, result.layer_max):
        table.add_row(meta["name"], fmt.num(local), fmt.num(e2e))
    console.print(table)
    console.print(f"max |Delta_logit|: certified <= {fmt.num(max(result.max_abs_logit_deviation), 6)}, "
                  f"sampled >= {fmt.num(result.sampled_max, 6)}")
    counts = result.agreement_counts
    console.print(f"top-1 agreement: {result.agreement_verdict} "
                  f"({counts['proved']} proved, {counts['refuted']} refuted, {counts['unknown']} unknown)")
    if result.delta is not None:
        counts = result.delta_counts
        console.print(f"delta-top-1 equivalence (delta {result.delta:g}): {result.delta_top1_verdict} "
                      f"({counts['proved']} proved, {counts['refuted']} refuted, {counts['unknown']} unknown)")
    if result.tolerance is not None:
        console.print(f"verdict (tolerance {result.tolerance:g}): {result.verdict}")
    stopped = result.truncated_regions
    if stopped:
        console.print(f"truncated: the time limit cut {result.method} short on {len(stopped)} region(s) "
                      f"({', '.join(map(str, stopped[:10]))}{', ...' if len(stopped) > 10 else ''}); "
                      f"their bounds are sound but looser")
