"""The attack methods in one table: what each one runs, its defaults, and what it needs.

An attack is a composition of a few stages (random sampling; a gradient stage, pgd or apgd; LP walks
over the linear regions of the pair; the exact MILP), so each method is declared by the stages it
runs rather than by an if-chain. `api.py` reads the table to check options before any work and to
run the stages; the CLI's `--method` choices and help come from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunecert.errors import ConfigError


@dataclass(frozen=True)
class AttackMethod:
    """One attack method: the stages it runs and its defaults."""

    name: str
    summary: str
    gradient: str | None = None   # the gradient stage, "pgd" or "apgd"
    walks: bool = False           # LP walks from the best points (with a gradient stage: only where they can run)
    lp_only: bool = False         # LP walk / MILP alone: needs a linear objective and an encodable pair
    exact: bool = False           # the exact MILP
    sampling: bool = False        # uniform random sampling only
    restarts: int = 0             # default restarts (starts per sub-objective, or LP walks)
    iterations: int = 0           # default gradient iterations

    @property
    def needs_restarts(self) -> bool:
        return self.gradient is not None or self.walks


ATTACKS: dict[str, AttackMethod] = {m.name: m for m in (
    AttackMethod("auto", "apgd, then LP walks from its best points where the pair's LP fits", gradient="apgd",
                 walks=True, restarts=3, iterations=50),
    AttackMethod("apgd", "auto-PGD (step-size schedule, momentum)", gradient="apgd", restarts=5, iterations=100),
    AttackMethod("pgd", "projected gradient ascent", gradient="pgd", restarts=5, iterations=100),
    AttackMethod("lp-walk", "LP walks over the pair's linear regions", walks=True, lp_only=True, restarts=6),
    AttackMethod("milp", "the exact MILP (small nets)", lp_only=True, exact=True),
    AttackMethod("random", "uniform random sampling (the floor)", sampling=True),
)}

METHODS = tuple(ATTACKS)


def get_attack(name: str) -> AttackMethod:
    """The attack registered as `name` (ConfigError naming the valid ones if unknown)."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ConfigError(f"unknown attack method {name!r}; expected one of {', '.join(ATTACKS)}") from None


def attacks_help() -> str:
    """The --method help text of attacks."""
    return "; ".join(f"{m.name}: {m.summary}" for m in ATTACKS.values()) + "."
