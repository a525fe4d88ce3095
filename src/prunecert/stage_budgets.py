"""The budget policy: how one run's time is shared among its stages, and what a stage gets when the
user names no budget.

A user gives one number (certify --time-limit or --complete, attack --budget-seconds, audit
--attack-budget ...) and several stages spend it: bab tightens with LPs, attacks, then branches;
settle samples, searches, then branches; attack `auto` ascends with APGD, then walks LPs. The splits
and the defaults are gathered here, each with the reason for its value, so that retuning the policy
is one edit in one file, and certify and adversarial (which import it from this low floor) agree.

A number that tunes how one algorithm works inside the time it was given (tensor sizes, step sizes,
restarts, sample counts of its own search, solver tolerances, caps that refuse oversized problems)
is not policy: it stays beside its algorithm (docs/architecture.md, "Constants").
"""

from __future__ import annotations

from typing import Final

# certify --method bab (certify/bab.py): one time limit per region, spent in this order
BAB_SECONDS: Final = 10.0        # bab's default per region: a verdict, not a bound, is asked for (as long as an attack)
BAB_LP_SHARE: Final = 0.5        # LP-tightened neuron bounds first: every node of the tree starts from them
BAB_ATTACK_SHARE: Final = 0.1    # the attack's lower bound: a point above tau ends the region early; the rest branches

# settle (certify --complete, audit --complete): open top-1 / delta-top-1 verdicts (certify/settle.py)
SETTLE_SEARCH_SHARE: Final = 0.1  # a refutation is found quickly or not at all; only branch and bound (the rest) proves

# attack --method auto (adversarial/api.py): APGD, then LP walks from its best points
AUTO_GRADIENT_SHARE: Final = 0.4  # APGD finds basins fast; the exact LP walks climbing them are slower (all if no walk)
AUTO_WALKS: Final = 6             # from the best distinct APGD points: fewer miss basins, more starve the last walks

# certify --method milp (certify/milp.py): the default when no --time-limit is given
MILP_SECONDS: Final = 60.0        # per region (and per PairMILP solve): room to close the small nets MILP is for;
                                  # an objective it leaves open keeps its sound dual bound and is reported truncated

# certify's MILP checks every optimum with an attack (adversarial/witness.py)
WITNESS_SECONDS: Final = 2.0      # per objective: a second opinion on the solver's point, not a search of its own

# what the commands (cli/) and the audit (audit.py) give a stage when the user names no budget
ATTACK_SECONDS: Final = 10.0        # attack --budget-seconds per region: the command is the search itself
CERTIFY_SAMPLES: Final = 256        # certify/audit --samples per region: one batched forward pass, cheap beside bounds
AUDIT_ATTACK_SECONDS: Final = 0.5   # audit --attack-budget per region and objective: it has regions x radii x layers
AUDIT_CERTIFY_SECONDS: Final = 5.0  # audit --certify-budget per region: LeNet needs ms, the CNN 2-3 s; caps larger ones
AUDIT_COMPLETE_SECONDS: Final = 5.0  # audit --complete per open region: LeNet's needed <= 1.9 s (results/complete.md)
