"""`prunecert prune`: coreset (or baseline) pruning of a model file, with a per-layer table.

Errors (bad options, unreadable models) are one line on stderr with exit status 3; the output file
is written atomically, so it exists only if pruning succeeded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunecert.cli import app
from prunecert.cli.options import Threads
from prunecert.errors import ConfigError, PrunecertError

EXAMPLE = ("Example: prunecert prune lenet.pt --method coreset --keep 0.1 --seed 0 --out lenet-pruned.pt   "
           "(also --keep 30, --keep 0:30,1:10, --compression 0.9, --epsilon 5 --delta 0.05, "
           "--fine-tune 10 --data mnist5k)")


def parse_keep(text: str | None):
    """'30' -> 30 neurons, '0.1' -> 10 %, '0:30,1:0.5' -> per layer; None stays None."""
    if text is None:
        return None

    def one(v: str):
        v = v.strip()
        try:
            return float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            raise ConfigError(f"--keep: {v!r} is neither a neuron count nor a fraction") from None

    if ":" in text:
        out = {}
        for part in text.split(","):
            key, _, value = part.partition(":")
            try:
                out[int(key)] = one(value)
            except ValueError:
                raise ConfigError(f"--keep: {part!r} is not LAYER:VALUE") from None
        return out
    return one(text)


@app.command("prune", epilog=EXAMPLE)
def prune_command(
    model: Path = typer.Argument(..., help="Model file to prune (.pt, .onnx, .nnet, or a state_dict with --arch)."),
    out: Path = typer.Option(..., help="Output model file (.pt native keeps the pruning record; written atomically)."),
    method: str = typer.Option("coreset", help="coreset (the paper), uniform (sampling baseline) or topk (norms)."),
    keep: Optional[str] = typer.Option(None, help="Neurons kept per hidden layer: a count (30), a fraction (0.1) "
                                       "or per layer (0:30,1:10; other layers untouched)."),
    compression: Optional[float] = typer.Option(None, help="Fraction of parameters to remove overall, e.g. 0.9."),
    epsilon: Optional[float] = typer.Option(None, help="Provable bound to meet per layer (absolute, next-layer "
                                            "pre-activation units); coreset/uniform only."),
    delta: float = typer.Option(0.1, help="Failure probability of each layer's provable bound."),
    seed: int = typer.Option(0, help="Sampling (and fine-tuning) seed."),
    fine_tune: int = typer.Option(0, "--fine-tune", help="Epochs of fine-tuning after pruning (voids the provable bound)."),
    data: Optional[str] = typer.Option(None, help="Data set for fine-tuning: mnist5k, digits, fashion, idx:DIR, npz:FILE."),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Fine-tune by distillation from the original."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a bare torch state_dict (see prunecert info)."),
    threads: Threads = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Prune the hidden neurons of MODEL with data-independent coresets (or a baseline) and save it.

    Prints, per layer, the neurons kept, the draws m, the total sensitivity t, the sound input-norm
    bound beta_hat and the provable bound eps (probability >= 1 - delta).
    """
    try:
        from prunecert.threads import apply_thread_policy
        apply_thread_policy(1, threads)
        _run(model, out, method, keep, compression, epsilon, delta, seed, fine_tune, data, distill, arch, quiet)
    except PrunecertError as exc:
        from prunecert.cli import fail
        fail(str(exc))


def _run(model, out, method, keep, compression, epsilon, delta, seed, fine_tune, data, distill, arch, quiet) -> None:
    from prunecert.io import load_model, save_model
    from prunecert.prune import prune

    if fine_tune < 0:
        raise ConfigError(f"--fine-tune must be >= 0 epochs, got {fine_tune}")
    if fine_tune and not data:
        raise ConfigError("--fine-tune needs --data (e.g. --data mnist5k)")
    keep_value = parse_keep(keep)
    net = load_model(model, arch)
    pruned = prune(net, method=method, keep=keep_value, compression=compression, epsilon=epsilon, delta=delta,
                   seed=seed, fine_tune=fine_tune, data=data, distill=distill, progress=not quiet)
    save_model(pruned, out)
    print_table(pruned.metadata["pruning"], str(out))


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rec: dict, out: str) -> None:
    """The per-layer table and a summary line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prunecert prune ({rec['method']}, seed {rec['seed']}, delta {rec['delta']})")
    for col in ("layer", "kept/total", "draws m", "t", "beta_hat", "provable eps (max)"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for r in rec["layers"]:
        table.add_row(f"{r['index']} {r['name']}", f"{r['n_kept']}/{r['n_total']}", _fmt(r.get("m"), "d"),
                      _fmt(r.get("t")), _fmt(r["beta_hat"]), _fmt(r.get("eps_max")))
    console = Console(width=120)
    console.print(table)
    lines = [f"parameters {rec['original_params']:,} -> {rec['pruned_params']:,} "
             f"(compression {rec['compression']:.3f}); saved {out}"]
    if rec.get("fine_tune"):
        ft = rec["fine_tune"]
        lines.append(f"fine-tuned {ft['epochs']} epochs on {ft['dataset']} "
                     f"({'distilled' if ft['distill'] else 'plain'}): test accuracy "
                     f"{ft['test_accuracy_before']:.4f} -> {ft['test_accuracy_after']:.4f}; "
                     f"the provable bound no longer applies")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
