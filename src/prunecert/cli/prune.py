"""`prunecert prune`: coreset (or baseline) pruning of a model file, with a per-layer table.

With `--certify-deviation TAU` or `--certify-agreement` and regions (the certify region options), the
keep counts are not given but searched (`prunecert.budget`): the smallest model whose pair with the
original is certified; the search trace is a table on stderr and part of the pruning record, and
`--certificate FILE` writes the certify JSON of the final pair.

Errors (bad options, unreadable models) are one line on stderr with exit status 3; the output file
is written atomically, so it exists only if pruning succeeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from prunecert.budget import BudgetResult, Requirement, prune_to_certificate
from prunecert.cli.command import Options, command
from prunecert.cli.options import Centers, Eps, InputDomain, Norm, RegionName, Seed, Threads, Vnnlib
from prunecert.core.region_options import regions_from_options
from prunecert.errors import ConfigError
from prunecert.fileutil import atomic_write_text, check_output_file
from prunecert.io import load_model, parse_input_domain, save_model
from prunecert.objectives import Adversarial, check_augment
from prunecert.prune import prune
from prunecert.prune.finetune import fine_tune as fine_tune_network
from prunecert.threads import apply_thread_policy, threads_per_worker

EXAMPLE = ("Example: prunecert prune lenet.pt --method coreset --keep 0.1 --seed 0 --out lenet-pruned.pt   "
           "(also --keep 30, --keep 0:30,1:10, --compression 0.9, --epsilon 5 --delta 0.05, "
           "--fine-tune 10 --data mnist5k). Certified budget: prunecert prune lenet.pt --out small.pt "
           "--certify-agreement --certified-fraction 0.95 --center mnist5k:test:0-99 --eps 0.01 "
           "--fine-tune 10 --data mnist5k --certificate cert.json")

Keep = int | float | dict[int, int | float]  # neurons kept: a count, a fraction, or per layer


def parse_keep(text: str | None) -> Keep | None:
    """'30' -> 30 neurons, '0.1' -> 10 %, '0:30,1:0.5' -> per layer; None stays None."""
    if text is None:
        return None

    def one(v: str) -> int | float:
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


@dataclass(frozen=True, kw_only=True)
class PruneOptions(Options):
    """`prunecert prune`'s command line (the fields, in --help order)."""

    model: Annotated[Path, typer.Argument(
        help="Model file to prune (.pt, .onnx, .nnet, or a state_dict with --arch).")]
    out: Annotated[Path, typer.Option(
        help="Output model file (.pt native keeps the pruning record; written atomically).")]
    method: Annotated[str, typer.Option(
        help="coreset (the paper), uniform (sampling baseline), topk (incoming norms) or magnitude (outgoing "
             "norms).")] = "coreset"
    keep: Annotated[Optional[str], typer.Option(
        help="Neurons kept per hidden layer: a count (30), a fraction (0.1) or per layer (0:30,1:10; other layers "
             "untouched).")] = None
    compression: Annotated[Optional[float], typer.Option(
        help="Fraction of parameters to remove overall, e.g. 0.9.")] = None
    epsilon: Annotated[Optional[float], typer.Option(
        help="Provable bound to meet per layer (absolute, next-layer pre-activation units); coreset/uniform "
             "only.")] = None
    delta: Annotated[float, typer.Option(help="Failure probability of each layer's provable bound.")] = 0.1
    seed: Seed = 0
    fine_tune: Annotated[int, typer.Option(
        "--fine-tune", help="Epochs of fine-tuning after pruning (voids the provable bound).")] = 0
    data: Annotated[Optional[str], typer.Option(
        help="Data set for fine-tuning: mnist5k, digits, fashion, idx:DIR, npz:FILE.")] = None
    distill: Annotated[bool, typer.Option(
        "--distill/--no-distill", help="Fine-tune by distillation from the original.")] = True
    augment: Annotated[Optional[str], typer.Option(help="Fine-tune on augmented images: shift, shift-flip.")] = None
    adversarial_eps: Annotated[Optional[float], typer.Option(
        "--adversarial-eps", help="Deviation-aware fine-tuning: also distil on PGD points of max |f - g| in boxes "
                                  "of this radius around the training images.")] = None
    certify_deviation: Annotated[Optional[float], typer.Option(
        "--certify-deviation", metavar="TAU", help="Search the smallest model with max |Delta logit| <= TAU "
                                                   "certified on the regions (instead of "
                                                   "--keep/--compression/--epsilon).")] = None
    certify_agreement: Annotated[bool, typer.Option(
        "--certify-agreement", help="Search the smallest model with top-1 agreement certified on the "
                                    "regions.")] = False
    certified_fraction: Annotated[float, typer.Option(
        help="Fraction of the regions the certificate must cover.")] = 1.0
    relative_to_original: Annotated[bool, typer.Option(
        "--relative-to-original", help="Count the fraction against the regions the unpruned model certifies "
                                       "(agreement is proved as 'one class on the whole box', which f itself may "
                                       "miss).")] = False
    center: Centers = None
    eps: Eps = None
    norm: Norm = "inf"
    region: RegionName = None
    vnnlib: Vnnlib = None
    certify_method: Annotated[str, typer.Option(help="Bound method of the certified search.")] = "diff-linear"
    max_accuracy_drop: Annotated[Optional[float], typer.Option(
        help="Certified search: also keep test accuracy on --data within this of the original's (e.g. "
             "0.01).")] = None
    search_time: Annotated[Optional[float], typer.Option(
        help="Certified search: stop after this many seconds with the smallest model certified so far.")] = None
    certificate: Annotated[Optional[Path], typer.Option(
        help="Certified search: write the certify JSON of the final pair here.")] = None
    arch: Annotated[Optional[str], typer.Option(
        help="Architecture of a bare torch state_dict (see prunecert info).")] = None
    input_domain: InputDomain = None
    threads: Threads = None
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False

    @property
    def certified_search(self) -> bool:
        """The keep counts are searched (smallest certified model), not given."""
        return self.certify_deviation is not None or self.certify_agreement

    def checked(self) -> PruneOptions:
        threads_per_worker(1, self.threads)
        if not self.certified_search:
            if self.center or self.region or self.vnnlib or self.certificate:
                raise ConfigError("regions and --certificate belong to a certified search: add --certify-deviation "
                                  "TAU or --certify-agreement")
            check_output_file(self.out, "--out")
            self.fine_tune_options()
            parse_keep(self.keep)
            return self
        check_output_file(self.out, "--out")
        if self.certificate is not None:
            check_output_file(self.certificate, "--certificate")
        if self.certify_deviation is not None and self.certify_agreement:
            raise ConfigError("give one property: --certify-deviation TAU or --certify-agreement, not both")
        if self.keep is not None or self.compression is not None or self.epsilon is not None:
            raise ConfigError("a certified search finds the keep counts itself: drop --keep/--compression/--epsilon")
        if self.search_time is not None and not self.search_time > 0:
            raise ConfigError(f"--search-time must be > 0 seconds, got {self.search_time}")
        if self.certificate is not None and not self.certificate.parent.is_dir():
            raise ConfigError(f"--certificate {self.certificate}: folder {self.certificate.parent} does not exist")
        if self.max_accuracy_drop is not None and not self.data:
            raise ConfigError("--max-accuracy-drop needs --data (the test split measures accuracy)")
        self.fine_tune_options()
        self.requirement()
        return self

    def fine_tune_options(self) -> dict[str, Any]:
        """Checked fine-tuning keyword arguments (shared by both modes)."""
        if self.fine_tune < 0:
            raise ConfigError(f"--fine-tune must be >= 0 epochs, got {self.fine_tune}")
        if self.fine_tune and not self.data:
            raise ConfigError("--fine-tune needs --data (e.g. --data mnist5k)")
        if (self.augment or self.adversarial_eps is not None) and not self.fine_tune:
            raise ConfigError("--augment and --adversarial-eps shape fine-tuning: add --fine-tune EPOCHS --data ...")
        if self.adversarial_eps is not None and not self.distill:
            raise ConfigError("--adversarial-eps distils from the original: drop --no-distill")
        check_augment(self.augment)
        adversarial = None if self.adversarial_eps is None else Adversarial(eps=self.adversarial_eps)
        return {"augment": self.augment, "adversarial": adversarial}

    def requirement(self) -> Requirement:
        """What the certified search must certify (checked by Requirement)."""
        return Requirement(tolerance=self.certify_deviation, fraction=self.certified_fraction,
                           relative=self.relative_to_original)


@command("prune", PruneOptions, epilog=EXAMPLE)
def prune_command(o: PruneOptions) -> int:
    """Prune the hidden neurons of MODEL with data-independent coresets (or a baseline) and save it.

    Prints, per layer, the neurons kept, the draws m, the total sensitivity t, the sound input-norm
    bound beta_hat and the provable bound eps (probability >= 1 - delta). With --certify-deviation or
    --certify-agreement, searches the smallest model certified on the regions instead.
    """
    apply_thread_policy(1, o.threads)
    if o.certified_search:
        _run_certified(o)
    else:
        _run(o)
    return 0


def _run(o: PruneOptions) -> None:
    net = load_model(o.model, o.arch, parse_input_domain(o.input_domain))
    pruned = prune(net, method=o.method, keep=parse_keep(o.keep), compression=o.compression, epsilon=o.epsilon,
                   delta=o.delta, seed=o.seed, progress=not o.quiet)
    _check_pruned_something(pruned.metadata["pruning"], o.quiet)
    if o.fine_tune:
        pruned = fine_tune_network(pruned, net, o.data, o.fine_tune, seed=o.seed, distill=o.distill,
                                   progress=not o.quiet, **o.fine_tune_options())
    save_model(pruned, o.out)
    print_table(pruned.metadata["pruning"], str(o.out))


def _check_pruned_something(rec: dict[str, Any], quiet: bool) -> None:
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


def _run_certified(o: PruneOptions) -> None:
    net = load_model(o.model, o.arch, parse_input_domain(o.input_domain))
    lo, hi = net.domain()
    regions = regions_from_options(net.input_shape, lo, hi, centers=o.center or [], eps=o.eps, norm=o.norm,
                                   region=o.region, vnnlib=o.vnnlib)
    result = prune_to_certificate(net, regions, o.requirement(), method=o.method, seed=o.seed,
                                  fine_tune=o.fine_tune, data=o.data, distill=o.distill,
                                  max_accuracy_drop=o.max_accuracy_drop, certify_method=o.certify_method,
                                  time_limit=o.search_time, progress=not o.quiet, **o.fine_tune_options())
    save_model(result.model, o.out)
    if o.certificate is not None:
        atomic_write_text(o.certificate, json.dumps(result.certificate.to_json(), separators=(",", ":")) + "\n")
    print_trace(result)
    print_table(result.model.metadata["pruning"], str(o.out))


def print_trace(result: BudgetResult) -> None:
    """The search trace as a table on stderr (stdout keeps the final model's table)."""
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


def _fmt(v: float | int | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rec: dict[str, Any], out: str) -> None:
    """The per-layer table and a summary line."""
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
