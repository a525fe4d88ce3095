"""`prunecert prune`: coreset (or baseline) pruning of a model file, with a per-layer table.

With `--certify-deviation TAU` or `--certify-agreement` and regions (the certify region options), the
keep counts are not given but searched (`prunecert.budget`): the smallest model whose pair with the
original is certified; the search trace is a table on stderr and part of the pruning record, and
`--certificate FILE` writes the certify JSON of the final pair.

Errors (bad options, unreadable models) are one line on stderr with exit status 3; the output file
is written atomically, so it exists only if pruning succeeded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunecert.cli import app
from prunecert.cli.options import Centers, Eps, InputDomain, Norm, RegionName, Seed, Threads, Vnnlib
from prunecert.errors import ConfigError, PrunecertError

EXAMPLE = ("Example: prunecert prune lenet.pt --method coreset --keep 0.1 --seed 0 --out lenet-pruned.pt   "
           "(also --keep 30, --keep 0:30,1:10, --compression 0.9, --epsilon 5 --delta 0.05, "
           "--fine-tune 10 --data mnist5k). Certified budget: prunecert prune lenet.pt --out small.pt "
           "--certify-agreement --certified-fraction 0.95 --center mnist5k:test:0-99 --eps 0.01 "
           "--fine-tune 10 --data mnist5k --certificate cert.json")


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
    method: str = typer.Option("coreset", help="coreset (the paper), uniform (sampling baseline), topk (incoming norms) or magnitude (outgoing norms)."),
    keep: Optional[str] = typer.Option(None, help="Neurons kept per hidden layer: a count (30), a fraction (0.1) "
                                       "or per layer (0:30,1:10; other layers untouched)."),
    compression: Optional[float] = typer.Option(None, help="Fraction of parameters to remove overall, e.g. 0.9."),
    epsilon: Optional[float] = typer.Option(None, help="Provable bound to meet per layer (absolute, next-layer "
                                            "pre-activation units); coreset/uniform only."),
    delta: float = typer.Option(0.1, help="Failure probability of each layer's provable bound."),
    seed: Seed = 0,
    fine_tune: int = typer.Option(0, "--fine-tune", help="Epochs of fine-tuning after pruning (voids the provable bound)."),
    data: Optional[str] = typer.Option(None, help="Data set for fine-tuning: mnist5k, digits, fashion, idx:DIR, npz:FILE."),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Fine-tune by distillation from the original."),
    augment: Optional[str] = typer.Option(None, help="Fine-tune on augmented images: shift, shift-flip."),
    adversarial_eps: Optional[float] = typer.Option(None, "--adversarial-eps", help="Deviation-aware fine-tuning: "
                                                    "also distil on PGD points of max |f - g| in boxes of this "
                                                    "radius around the training images."),
    certify_deviation: Optional[float] = typer.Option(None, "--certify-deviation", metavar="TAU", help="Search the "
                                                      "smallest model with max |Delta logit| <= TAU certified on "
                                                      "the regions (instead of --keep/--compression/--epsilon)."),
    certify_agreement: bool = typer.Option(False, "--certify-agreement", help="Search the smallest model with "
                                           "top-1 agreement certified on the regions."),
    certified_fraction: float = typer.Option(1.0, help="Fraction of the regions the certificate must cover."),
    relative_to_original: bool = typer.Option(False, "--relative-to-original", help="Count the fraction against "
                                              "the regions the unpruned model certifies (agreement is proved as "
                                              "'one class on the whole box', which f itself may miss)."),
    center: Centers = None,
    eps: Eps = None,
    norm: Norm = "inf",
    region: RegionName = None,
    vnnlib: Vnnlib = None,
    certify_method: str = typer.Option("diff-linear", help="Bound method of the certified search."),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="Certified search: also keep test accuracy on "
                                                      "--data within this of the original's (e.g. 0.01)."),
    search_time: Optional[float] = typer.Option(None, help="Certified search: stop after this many seconds "
                                                "with the smallest model certified so far."),
    certificate: Optional[Path] = typer.Option(None, help="Certified search: write the certify JSON of the "
                                               "final pair here."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a bare torch state_dict (see prunecert info)."),
    input_domain: InputDomain = None,
    threads: Threads = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Prune the hidden neurons of MODEL with data-independent coresets (or a baseline) and save it.

    Prints, per layer, the neurons kept, the draws m, the total sensitivity t, the sound input-norm
    bound beta_hat and the provable bound eps (probability >= 1 - delta). With --certify-deviation or
    --certify-agreement, searches the smallest model certified on the regions instead.
    """
    try:
        from prunecert.threads import apply_thread_policy
        apply_thread_policy(1, threads)
        if certify_deviation is not None or certify_agreement:
            _run_certified(model, out, method, keep, compression, epsilon, seed, fine_tune, data, distill, augment,
                           adversarial_eps, certify_deviation, certify_agreement, certified_fraction, relative_to_original,
                           dict(centers=center or [], eps=eps, norm=norm, region=region, vnnlib=vnnlib),
                           certify_method, max_accuracy_drop, search_time, certificate, arch, quiet, input_domain)
        else:
            if center or region or vnnlib or certificate:
                raise ConfigError("regions and --certificate belong to a certified search: add --certify-deviation "
                                  "TAU or --certify-agreement")
            _run(model, out, method, keep, compression, epsilon, delta, seed, fine_tune, data, distill, augment,
                 adversarial_eps, arch, quiet, input_domain)
    except PrunecertError as exc:
        from prunecert.cli import fail
        fail(str(exc))


def _fine_tune_options(fine_tune: int, data, distill: bool, augment, adversarial_eps) -> dict:
    """Checked fine-tuning keyword arguments (shared by both modes)."""
    from prunecert.objectives import Adversarial, check_augment

    if fine_tune < 0:
        raise ConfigError(f"--fine-tune must be >= 0 epochs, got {fine_tune}")
    if fine_tune and not data:
        raise ConfigError("--fine-tune needs --data (e.g. --data mnist5k)")
    if (augment or adversarial_eps is not None) and not fine_tune:
        raise ConfigError("--augment and --adversarial-eps shape fine-tuning: add --fine-tune EPOCHS --data ...")
    if adversarial_eps is not None and not distill:
        raise ConfigError("--adversarial-eps distils from the original: drop --no-distill")
    check_augment(augment)
    adversarial = None if adversarial_eps is None else Adversarial(eps=adversarial_eps)
    return {"augment": augment, "adversarial": adversarial}


def _run(model, out, method, keep, compression, epsilon, delta, seed, fine_tune, data, distill, augment,
         adversarial_eps, arch, quiet, input_domain=None) -> None:
    from prunecert.fileutil import check_output_file
    from prunecert.io import load_model, parse_input_domain, save_model
    from prunecert.prune import prune
    from prunecert.prune.finetune import fine_tune as fine_tune_network

    check_output_file(out, "--out")
    options = _fine_tune_options(fine_tune, data, distill, augment, adversarial_eps)
    keep_value = parse_keep(keep)
    net = load_model(model, arch, parse_input_domain(input_domain))
    pruned = prune(net, method=method, keep=keep_value, compression=compression, epsilon=epsilon, delta=delta,
                   seed=seed, progress=not quiet)
    _check_pruned_something(pruned.metadata["pruning"], quiet)
    if fine_tune:
        pruned = fine_tune_network(pruned, net, data, fine_tune, seed=seed, distill=distill, progress=not quiet,
                                   **options)
    save_model(pruned, out)
    print_table(pruned.metadata["pruning"], str(out))


def _check_pruned_something(rec: dict, quiet: bool) -> None:
    """Refuse a result that prunes nothing (e.g. an --epsilon so small that m draws hit every neuron), and
    say which layers were kept whole when only some were."""
    whole = [r for r in rec["layers"] if r["n_kept"] == r["n_total"]]
    if not whole or "epsilon" not in (rec.get("target") or {}):  # --keep 1.0 keeps everything on purpose
        return
    detail = ", ".join(f"layer {r['index']}: {r['n_kept']}/{r['n_total']}" + (f" after m = {r['m']:,} draws"
                                                                              if r.get("m") else "") for r in whole)
    target = f"--epsilon {rec['target']['epsilon']:g} (delta {rec['delta']:g})"
    if len(whole) == len(rec["layers"]):
        raise ConfigError(f"{target} keeps every neuron ({detail}): nothing was pruned, no file "
                          "written; give a larger --epsilon, or --keep / --compression")
    if not quiet:
        typer.echo(f"note: {target} keeps these layers whole: {detail}", err=True)


def _run_certified(model, out, method, keep, compression, epsilon, seed, fine_tune, data, distill, augment,
                   adversarial_eps, tau, agreement, fraction, relative, region_options, certify_method, max_accuracy_drop,
                   search_time, certificate, arch, quiet, input_domain=None) -> None:
    import json

    from prunecert.budget import Requirement, prune_to_certificate
    from prunecert.core.region_options import regions_from_options
    from prunecert.fileutil import atomic_write_text, check_output_file
    from prunecert.io import load_model, parse_input_domain, save_model

    check_output_file(out, "--out")
    if certificate is not None:
        check_output_file(certificate, "--certificate")

    if tau is not None and agreement:
        raise ConfigError("give one property: --certify-deviation TAU or --certify-agreement, not both")
    if keep is not None or compression is not None or epsilon is not None:
        raise ConfigError("a certified search finds the keep counts itself: drop --keep/--compression/--epsilon")
    if search_time is not None and not search_time > 0:
        raise ConfigError(f"--search-time must be > 0 seconds, got {search_time}")
    if certificate is not None and not Path(certificate).parent.is_dir():
        raise ConfigError(f"--certificate {certificate}: folder {Path(certificate).parent} does not exist")
    if max_accuracy_drop is not None and not data:
        raise ConfigError("--max-accuracy-drop needs --data (the test split measures accuracy)")
    options = _fine_tune_options(fine_tune, data, distill, augment, adversarial_eps)
    requirement = Requirement(tolerance=tau, fraction=fraction, relative=relative)
    net = load_model(model, arch, parse_input_domain(input_domain))
    lo, hi = net.domain()
    regions = regions_from_options(net.input_shape, lo, hi, **region_options)
    result = prune_to_certificate(net, regions, requirement, method=method, seed=seed, fine_tune=fine_tune,
                                  data=data, distill=distill, max_accuracy_drop=max_accuracy_drop,
                                  certify_method=certify_method, time_limit=search_time, progress=not quiet,
                                  **options)
    save_model(result.model, out)
    if certificate is not None:
        atomic_write_text(certificate, json.dumps(result.certificate.to_json(), separators=(",", ":")) + "\n")
    print_trace(result)
    print_table(result.model.metadata["pruning"], str(out))


def print_trace(result) -> None:
    """The search trace as a table on stderr (stdout keeps the final model's table)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"certified-budget search: {result.requirement.describe()}")
    for col in ("#", "stage", "kept", "params", "compression", "certified", "max bound", "accuracy", "s", ""):
        table.add_column(col, justify="left" if col in ("stage", "") else "right")
    best = result.best
    for n, c in enumerate(result.trace):
        table.add_row(str(n), c.stage, "-".join(str(v) for v in c.keep.values()), f"{c.params:,}",
                      f"{100 * c.compression:.1f} %", "-" if c.certified is None else f"{c.certified}/{c.needed}",
                      _fmt(c.max_bound), _fmt(c.accuracy), f"{c.seconds:.1f}",
                      ("BEST" if c is best else ("pass" if c.passed else "fail")) + (f" ({c.note})" if c.note else ""))
    console = Console(stderr=True, width=140)
    console.print(table)
    console.print(f"{len(result.trace)} candidates in {result.seconds:.1f} s", highlight=False)


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
