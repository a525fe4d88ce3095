"""Adversarial search for the deviation between an original network and its pruned twin.

`attack(original, pruned, region, objective, method, budget_seconds, seed)` returns the best input
found and its float64-re-evaluated value; `attack_many` does the same over many regions at once.
Methods: the table `ATTACKS` (`prunecert.adversarial.methods`): auto, apgd, pgd, lp-walk, milp, random. `lowest_margin`
picks, among many regions, those whose centres the pruned model is least sure of.
"""

from prunecert.adversarial.api import attack, attack_many
from prunecert.adversarial.methods import ATTACKS, METHODS, AttackMethod, attacks_help, get_attack
from prunecert.adversarial.centres import agreement_margin, lowest_margin
from prunecert.adversarial.objectives import Objective, parse_objective
from prunecert.adversarial.result import AttackResult, evaluate
from prunecert.adversarial.save import Replay, load_counterexample, replay, save_counterexample

__all__ = ["METHODS", "ATTACKS", "AttackMethod", "attacks_help", "get_attack", "attack", "attack_many", "agreement_margin", "lowest_margin", "Objective", "parse_objective", "AttackResult", "evaluate",
           "Replay", "load_counterexample", "replay", "save_counterexample"]
