"""Wall-clock budgets for tests that assert a search *decides* (a complete verdict, a closed gap).

Settle, branch and bound and the MILP stop as soon as they decide, and the tiny nets of these tests
decide in well under a second on a quiet machine. Their budgets are wall-clock seconds, so on a
loaded machine a tight one ran out first and the test failed on a correct engine
(`test_settle_matches_exhaustive_enumeration` ended "unknown" at 5 s with the load average at 6-8).
A generous budget costs nothing while the code works and cannot flip the verdict under load; a
search that never decides still fails the test, only later. Tests of what happens *at* the budget
use a tiny one (1e-9 s) instead, which no load can make generous.
"""

DECIDE_SECONDS = 300.0
