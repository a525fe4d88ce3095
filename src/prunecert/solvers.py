"""Solver start-up: HiGHS prints a licence banner on stdout the first time an instance is created in a
process. That would corrupt `--json-only` output and clutter every command, so the first instance is
created here with file descriptor 1 pointed at /dev/null; later instances (ours and cvxpy's) are quiet.
"""

from __future__ import annotations

import os
import sys

_warmed = False


def silence_highs_banner() -> None:
    """Create (and drop) one HiGHS instance with stdout muted; idempotent and cheap after the first call."""
    global _warmed
    if _warmed:
        return
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _warmed = True
