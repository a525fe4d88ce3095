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
from pathlib import Path
from typing import Optional

import typer

from prunecert.adversarial.witness import certify_searches
from prunecert.cli import app
from prunecert.cli.options import Centers, CertifyMethod, Eps, InputDomain, Norm, Original, Pruned, RegionName, Seed, Vnnlib
from prunecert.cli.options import Scheduler, Threads, Workers, cli_regions
from prunecert.errors import ConfigError, PrunecertError

EXIT = {"certified": 0, "violated": 1, "unknown": 2, "proved": 0, "refuted": 1}


@app.command("certify", epilog="Example: prunecert certify lenet.pt lenet-pruned.pt --center mnist5k:test:0-9 "
                               "--eps 0.02 --tolerance 0.5 --json certify.json")
def certify_command(
    original: Original,
    pruned: Pruned,
    center: Centers = None,
    eps: Eps = None,
    norm: Norm = "inf",
    region: RegionName = None,
    vnnlib: Vnnlib = None,
    method: CertifyMethod = "diff-linear",
    tolerance: Optional[float] = typer.Option(None, help="Tolerance tau on max |Delta_logit| for the verdict."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON (schema prunecert.certify/1)."),
    export_onnx: Optional[Path] = typer.Option(None, "--export-onnx", help="Write f - g as ONNX plus one VNN-LIB "
                                               "property |Delta_k| <= tau per region and logit into this folder."),
    time_limit: Optional[float] = typer.Option(None, help="Seconds per region (diff-linear, crown-diff, alpha-crown-diff, lp, milp, bab); past it the method stops early and says so."),
    samples: int = typer.Option(256, help="Points sampled per region by the counterexample search."),
    batch_size: int = typer.Option(32, help="Regions bounded at once (one chunk of work)."),
    seed: Seed = 0,
    input_domain: InputDomain = None,
    logits: Optional[str] = typer.Option(None, help="Comma-separated logits K,... the tolerance verdict is over "
                                         "(epsilon-equivalence on chosen outputs; default all)."),
    delta: Optional[float] = typer.Option(None, help="Also decide delta-top-1 equivalence: wherever f's softmax "
                                          "confidence in c exceeds DELTA (in [0.5, 1)), g predicts c."),
    complete: Optional[float] = typer.Option(None, help="Seconds per region to settle open top-1 / delta-top-1 "
                                             "verdicts by attack + branch and bound (on with --method bab)."),
    workers: Workers = None,
    scheduler: Scheduler = None,
    threads: Threads = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or lines."),
) -> None:
    """Certify how far PRUNED can deviate from ORIGINAL (every layer, local and end-to-end) over regions.

    Example: prunecert certify lenet.pt lenet-pruned.pt --center mnist5k:test:0 --eps 0.02 --tolerance 0.5
    """
    try:
        code = _run(original, pruned, center or [], eps, norm, region, vnnlib, method, tolerance, json_out,
                    export_onnx, time_limit, samples, batch_size, seed, quiet, input_domain, logits, delta,
                    complete, workers, scheduler, threads)
    except PrunecertError as exc:
        from prunecert.cli import fail
        fail(str(exc))
        return
    raise typer.Exit(code)


def parse_logits(text: str | None) -> list[int] | None:
    """`--logits 0,3` -> [0, 3] (ConfigError naming the bad item)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--logits: expected comma-separated logit indices, got {text!r}") from None


def _run(original, pruned, centers, eps, norm, region, vnnlib, method, tolerance, json_out, export_onnx,
         time_limit, samples, batch_size, seed, quiet, input_domain=None, logits=None, delta=None,
         complete=None, workers=1, scheduler=None, threads=None) -> int:
    import time

    from prunecert.certify import certify_stream, make_pair
    from prunecert.certify.stream import CertifyWriter
    from prunecert.fileutil import check_output_dir, check_output_file
    from prunecert.io import load_model, parse_input_domain, weights_sha256

    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if json_out is not None:  # every output is checked before the first write (and before any work)
        check_output_file(json_out, "--json")
    if export_onnx is not None:
        check_output_dir(export_onnx, "--export-onnx")
    start = time.perf_counter()
    domain = parse_input_domain(input_domain)
    net_f, net_g = load_model(original, input_domain=domain), load_model(pruned, input_domain=domain)
    pair = make_pair(net_f, net_g)
    regions = cli_regions(pair, centers, eps, norm, region, vnnlib)
    if export_onnx is not None and norm != "inf" and not region and not vnnlib:
        raise ConfigError("--export-onnx writes VNN-LIB boxes; use --norm inf (an L2 ball is not a box)")
    models = {"original": {"path": str(original), "sha256": weights_sha256(net_f)},
              "pruned": {"path": str(pruned), "sha256": weights_sha256(net_g)}}
    # the attacks certify's methods use are injected here (certify does not import adversarial)
    with CertifyWriter(json_out, models) as result:
        for first, part in certify_stream(pair, None, regions, method=method, tolerance=tolerance,
                                          time_limit=time_limit, progress=not quiet, seed=seed, samples=samples,
                                          batch_size=batch_size, logits=parse_logits(logits), delta=delta,
                                          complete=complete,
                                          workers=workers, scheduler=scheduler, threads=threads,
                                          **certify_searches(method, pair, seed)):
            result.add(first, part)
        seconds = time.perf_counter() - start
        if export_onnx is not None:
            export_interop(pair, regions, result, export_onnx)
        result.finish(seconds)
    _print(result, seconds)
    if tolerance is not None:
        return EXIT[result.verdict]
    return EXIT[result.delta_top1_verdict if delta is not None else result.agreement_verdict]


def export_interop(pair, regions, result, folder: Path) -> list[Path]:
    """f - g as one ONNX file and a VNN-LIB property per (region, logit): |Delta_k| <= tau on its box.

    tau is the tolerance when given, else the region's certified bound (so an external verifier can
    re-check our bound). Files are built in a temporary folder and moved into place at the end, so an
    error leaves no partial export.
    """
    try:
        from prunecert.io.onnx_io import save_difference_onnx
        from prunecert.io.vnnlib import write_deviation_property
    except ImportError as exc:
        raise ConfigError(f"--export-onnx needs prunecert.io.onnx_io and prunecert.io.vnnlib ({exc})") from exc
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _export(pair, regions, result, folder, save_difference_onnx, write_deviation_property)
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _export(pair, regions, result, folder: Path, save_difference_onnx, write_deviation_property) -> list[Path]:
    n_out = pair.n_classes
    written = []
    from prunecert.fileutil import sweep_stale_temps

    sweep_stale_temps(folder, "export", suffix=".d")  # left by a run killed while exporting
    with tempfile.TemporaryDirectory(prefix=f".export.{os.getpid()}.", suffix=".d", dir=folder) as tmp:
        tmp = Path(tmp)
        save_difference_onnx(pair.f, pair.g, tmp / "difference.onnx")
        rows = []
        for b, r in enumerate(regions):
            lo, hi = (a.reshape(-1) for a in r.bounding_box())
            tau = result.tolerance if result.tolerance is not None else float(result.max_abs_logit_deviation[b])
            for k in range(n_out):
                name = f"region{b}_logit{k}.vnnlib"
                write_deviation_property(tmp / name, lo, hi, k, tau, n_outputs=n_out)
                rows.append(f"difference.onnx,{name},60")
        (tmp / "instances.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        for item in sorted(tmp.iterdir()):
            target = folder / item.name
            shutil.move(str(item), str(target))
            written.append(target)
    return written


def _print(result, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from prunecert.reports import fmt

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
