"""`prunecert certify`: sound deviation bounds between an original and a pruned model over regions.

Exit status: with --tolerance, 0 certified (max |Delta_logit| <= tau on every region), 1 violated (a
point with |Delta_logit| > tau was found), 2 unknown; without it the verdict is top-1 agreement:
0 proved, 1 refuted, 2 unknown. 3 is an error (bad input, unpairable models).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer

from prunecert.cli import app
from prunecert.cli.options import Centers, Eps, Norm, Original, Pruned, RegionName, Vnnlib
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
    method: str = typer.Option("diff-linear", help="naive, diff-interval, diff-linear, lp, milp or bab."),
    tolerance: Optional[float] = typer.Option(None, help="Tolerance tau on max |Delta_logit| for the verdict."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON (schema prunecert.certify/1)."),
    export_onnx: Optional[Path] = typer.Option(None, "--export-onnx", help="Write f - g as ONNX plus one VNN-LIB "
                                               "property |Delta_k| <= tau per region and logit into this folder."),
    time_limit: Optional[float] = typer.Option(None, help="Seconds per solver call (lp, milp, bab)."),
    samples: int = typer.Option(256, help="Points sampled per region by the counterexample search."),
    batch_size: int = typer.Option(32, help="Regions bounded at once (one chunk of work)."),
    seed: int = typer.Option(0, help="Seed of the counterexample search (each region's from it and its index)."),
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
                    export_onnx, time_limit, samples, batch_size, seed, quiet, workers, scheduler, threads)
    except PrunecertError as exc:
        from prunecert.cli import fail
        fail(str(exc))
        return
    raise typer.Exit(code)


def _run(original, pruned, centers, eps, norm, region, vnnlib, method, tolerance, json_out, export_onnx,
         time_limit, samples, batch_size, seed, quiet, workers=1, scheduler=None, threads=None) -> int:
    import time

    from prunecert.certify import certify_stream, make_pair
    from prunecert.certify.stream import CertifyWriter
    from prunecert.io import load_model, weights_sha256

    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    start = time.perf_counter()
    net_f, net_g = load_model(original), load_model(pruned)
    pair = make_pair(net_f, net_g)
    regions = cli_regions(pair, centers, eps, norm, region, vnnlib)
    if export_onnx is not None and norm != "inf" and not region and not vnnlib:
        raise ConfigError("--export-onnx writes VNN-LIB boxes; use --norm inf (an L2 ball is not a box)")
    models = {"original": {"path": str(original), "sha256": weights_sha256(net_f)},
              "pruned": {"path": str(pruned), "sha256": weights_sha256(net_g)}}
    with CertifyWriter(json_out, models) as result:
        for first, part in certify_stream(pair, None, regions, method=method, tolerance=tolerance,
                                          time_limit=time_limit, progress=not quiet, seed=seed, samples=samples,
                                          batch_size=batch_size, workers=workers, scheduler=scheduler,
                                          threads=threads):
            result.add(first, part)
        seconds = time.perf_counter() - start
        if export_onnx is not None:
            export_interop(pair, regions, result, export_onnx)
        result.finish(seconds)
    _print(result, seconds)
    verdict = result.verdict if tolerance is not None else result.agreement_verdict
    return EXIT[verdict]


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
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp:
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

    console = Console()
    table = Table(title=f"certified deviation bounds ({result.method}), {result.n_regions} region(s), "
                        f"{seconds:.2f} s")
    for col in ("layer", "max |local|", "max |end-to-end|"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for meta, (local, e2e) in zip(result.layer_meta, result.layer_max):
        table.add_row(meta["name"], f"{local:.4g}", f"{e2e:.4g}")
    console.print(table)
    console.print(f"max |Delta_logit|: certified <= {max(result.max_abs_logit_deviation):.6g}, "
                  f"sampled >= {result.sampled_max:.6g}")
    counts = result.agreement_counts
    console.print(f"top-1 agreement: {result.agreement_verdict} "
                  f"({counts['proved']} proved, {counts['refuted']} refuted, {counts['unknown']} unknown)")
    if result.tolerance is not None:
        console.print(f"verdict (tolerance {result.tolerance:g}): {result.verdict}")
