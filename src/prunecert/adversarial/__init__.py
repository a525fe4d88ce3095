"""Adversarial search for the deviation between an original network and its pruned twin.

`attack(original, pruned, region, objective, method, budget_seconds, seed)` returns the best input
found and its float64-re-evaluated value; `attack_many` does the same over many regions at once.
Methods: random, pgd, apgd, lp-walk, milp, auto (see `prunecert.adversarial.api`). `lowest_margin`
picks, among many regions, those whose centres the pruned model is least sure of.
"""

from prunecert.adversarial.api import METHODS, attack, attack_many
from prunecert.adversarial.centres import agreement_margin, lowest_margin
from prunecert.adversarial.objectives import Objective, parse_objective
from prunecert.adversarial.result import AttackResult, evaluate
from prunecert.adversarial.save import Replay, load_counterexample, replay, save_counterexample

__all__ = ["METHODS", "attack", "attack_many", "agreement_margin", "lowest_margin", "Objective", "parse_objective", "AttackResult", "evaluate",
           "Replay", "load_counterexample", "replay", "save_counterexample"]
