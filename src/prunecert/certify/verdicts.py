"""Verdicts: one region's class verdict (`Agreement`) and the rules that combine regions' verdicts.

A certify run is summarised in three places -- `CertifyResult.to_json()` (the whole run in memory),
`CertifyWriter` (chunks streamed to disk) and `prunecert merge` (shards read back from JSON) -- and
all three combine verdicts here, so a streamed or merged document says what the whole run says:

- tolerance verdicts (`combine_verdicts`): violated if any region is, certified if all are;
- class verdicts (`ClassTally`): refuted if any region is, proved if all are, with the first
  refutation's region and point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Required, TypedDict

import numpy as np
import numpy.typing as npt

ClassVerdict = Literal["proved", "refuted", "unknown"]
Details = dict[str, float | int | None]   # what the complete stage reports (nodes, open, gap, ...)


@dataclass
class Agreement:
    """A class verdict on one region (top-1 agreement, or delta-top-1 equivalence): "proved" (with the
    class when both networks keep one class everywhere), "refuted" (point, classes) or "unknown".
    `stage`: what decided it ("bounds", "search", "input-bab", "relu-bab"; "time" when the complete
    stage ran out of time, with what was left in `details`)."""

    verdict: str
    label: int | None = None
    point: npt.NDArray[np.float64] | None = None
    class_f: int | None = None
    class_g: int | None = None
    stage: str | None = None
    seconds: float | None = None
    details: Details | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"verdict": self.verdict}
        if self.label is not None:
            d["class"] = int(self.label)
        if self.point is not None:
            d["point"] = [float(v) for v in self.point.reshape(-1)]
            if self.class_f is None or self.class_g is None:
                raise ValueError("a refuting point without the classes f and g pick there")
            d["class_f"], d["class_g"] = int(self.class_f), int(self.class_g)
        if self.stage is not None:
            d["stage"] = self.stage
        if self.seconds is not None:
            d["seconds"] = float(self.seconds)
        if self.details:
            d["details"] = {k: (None if v is None else float(v) if isinstance(v, float) else int(v))
                            for k, v in self.details.items()}
        return d


class ClassOverall(TypedDict, total=False):
    """The JSON of a class verdict over all regions (`agreement`, `delta_top1` at the top level)."""

    verdict: Required[str]
    region: int            # the first refuted region, when one is
    point: list[float]     # its input


@dataclass
class ClassTally:
    """A class verdict over regions seen one at a time (in region order): refuted if any region is,
    proved if all are, else unknown; keeps the first refutation. Holds counts only, so a streamed
    run of any length costs the same."""

    counts: dict[str, int] = field(default_factory=lambda: {"proved": 0, "refuted": 0, "unknown": 0})
    first_refuted: tuple[int, list[float]] | None = None

    def add(self, index: int, verdict: Mapping[str, Any]) -> None:
        """Region `index`'s verdict as its JSON (`Agreement.to_json()`: "verdict", and "point" if refuted)."""
        v = verdict["verdict"]
        self.counts[v] += 1
        if v == "refuted" and self.first_refuted is None:
            self.first_refuted = (index, verdict["point"])

    @property
    def verdict(self) -> ClassVerdict:
        if self.counts["refuted"]:
            return "refuted"
        return "proved" if self.counts["proved"] == sum(self.counts.values()) else "unknown"

    def to_json(self) -> ClassOverall:
        out: ClassOverall = {"verdict": self.verdict}
        if self.first_refuted is not None:
            out["region"], out["point"] = self.first_refuted
        return out

    @classmethod
    def of(cls, verdicts: Iterable[Mapping[str, Any]]) -> ClassTally:
        """The tally of regions 0, 1, ... whose verdict JSONs are `verdicts`."""
        tally = cls()
        for index, v in enumerate(verdicts):
            tally.add(index, v)
        return tally

    @classmethod
    def of_agreements(cls, agreements: Sequence[Agreement]) -> ClassTally:
        return cls.of({"verdict": a.verdict, "point": None if a.point is None else
                       [float(v) for v in a.point.reshape(-1)]} for a in agreements)


def combine_verdicts(verdicts: Sequence[str | None]) -> str | None:
    """Tolerance verdicts over all regions: violated if any is, certified if all are, else unknown
    (None without a tolerance)."""
    if not verdicts or verdicts[0] is None:
        return None
    if "violated" in verdicts:
        return "violated"
    return "certified" if all(v == "certified" for v in verdicts) else "unknown"
