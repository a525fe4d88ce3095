"""Write a certify run's JSON as its chunks arrive, holding only running summaries in memory.

`CertifyWriter(path)` takes the (first index, CertifyResult) chunks of `certify_stream` and produces
exactly the document `CertifyResult.to_json()` would give for the whole run (compact separators, the
regions numbered across chunks), plus an optional top-level `models` entry (file paths and weight
hashes, which `prunecert merge` checks). Per-region entries and per-layer arrays are spilled to
temporary files beside the target as they come; `finish` assembles them into the target with one
atomic rename. An error (a worker dying, Ctrl-C) leaves neither the target nor temporary files.
With `path=None` it only keeps the summaries (what the CLI prints).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Self

import numpy as np

from prunecert.certify.result import SCHEMA, CertifyResult
from prunecert.certify.verdicts import ClassTally, combine_verdicts
from prunecert.errors import PrunecertError
from prunecert.fileutil import atomic_path

_Key = tuple[str] | tuple[int, str, str | None]   # ("regions",) or (layer, array, side)
_ARRAYS: tuple[tuple[str, str | None], ...] = (("local", "lower"), ("local", "upper"), ("end_to_end", "lower"), ("end_to_end", "upper"),
           ("max_abs_local", None), ("max_abs_end_to_end", None))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class CertifyWriter:
    """Running summary of a certify run (and, with a path, its JSON document built on disk)."""

    def __init__(self, path: str | Path | None, models: dict[str, Any] | None = None):
        self.path = None if path is None else Path(path)
        self.models = models
        self.n_regions = 0
        self.method: str | None = None
        self.seed = 0
        self.tolerance: float | None = None
        self.max_abs_logit_deviation: list[float] = []  # one float per region (8 bytes; export needs it)
        self.sampled_max = 0.0
        self.verdicts: list[str | None] = []
        self.agreement = ClassTally()
        self.logits: list[int] | None = None
        self.truncated_regions: list[int] = []
        self.delta: float | None = None
        self.delta_top1 = ClassTally()
        self.layer_meta: list[dict[str, Any]] = []
        self.layer_max: list[list[float]] = []  # per layer: [max |local|, max |end-to-end|] over regions
        self._tmp: Path | None = None
        self._files: dict[_Key, IO[str]] = {}

    # ------------------------------------------------------------------ summaries
    @property
    def verdict(self) -> str | None:
        return combine_verdicts(self.verdicts)

    @property
    def agreement_verdict(self) -> str:
        return self.agreement.verdict

    @property
    def delta_top1_verdict(self) -> str | None:
        return None if self.delta is None else self.delta_top1.verdict

    @property
    def agreement_counts(self) -> dict[str, int]:
        """Regions per top-1 agreement verdict (proved / refuted / unknown)."""
        return self.agreement.counts

    @property
    def delta_counts(self) -> dict[str, int]:
        """Regions per delta-top-1 verdict."""
        return self.delta_top1.counts

    def add(self, first: int, part: CertifyResult) -> None:
        """Take the next chunk (its regions must start at `first`, right after the previous chunk's)."""
        if first != self.n_regions:
            raise ValueError(f"chunk starts at region {first}, expected {self.n_regions}")
        doc = part.to_json()
        if self.method is None:
            self.method, self.seed, self.tolerance = part.method, part.seed, part.tolerance
            self.logits, self.delta = part.logits, part.delta
            self.layer_meta = [{"index": L["index"], "name": L["name"], "shape": L["shape"]} for L in doc["layers"]]
            self.layer_max = [[0.0, 0.0] for _ in doc["layers"]]
            if self.path is not None:
                self._open()
        for entry in doc["regions"]:
            entry["index"] += first
            self.agreement.add(entry["index"], entry["agreement"])
            if "delta_top1" in entry:
                self.delta_top1.add(entry["index"], entry["delta_top1"])
            self._write(("regions",), entry)
        self.verdicts += part.verdicts
        self.truncated_regions += [first + b for b, t in enumerate(part.truncated) if t]
        self.max_abs_logit_deviation += [float(v) for v in part.max_abs_logit_deviation]
        self.sampled_max = max(self.sampled_max, float(np.max(part.sampled_max_abs_logit_deviation)))
        for l, L in enumerate(doc["layers"]):
            self.layer_max[l] = [max(self.layer_max[l][0], max(L["max_abs_local"])),
                                 max(self.layer_max[l][1], max(L["max_abs_end_to_end"]))]
            for key in _ARRAYS:
                values = L[key[0]] if key[1] is None else L[key[0]][key[1]]
                for v in values:
                    self._write((l, *key), v)
        self.n_regions += part.n_regions

    # ------------------------------------------------------------------ files
    def _open(self) -> None:
        assert self.path is not None
        parent = self.path.parent if str(self.path.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".parts", dir=parent))
        except OSError as exc:
            raise PrunecertError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        keys = [("regions",)] + [(l, *k) for l in range(len(self.layer_meta)) for k in _ARRAYS]
        for i, key in enumerate(keys):
            self._files[key] = open(self._tmp / f"{i}.json", "w+", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def _write(self, key: _Key, value: Any) -> None:
        fh = self._files.get(key)
        if fh is not None:
            fh.write(("," if fh.tell() else "") + _dumps(value))

    def _copy(self, key: _Key, out: IO[str]) -> None:
        fh = self._files[key]
        fh.seek(0)
        out.write("[")
        shutil.copyfileobj(fh, out)
        out.write("]")

    def finish(self, seconds: float) -> Path | None:
        """Assemble the document into `path` (one atomic rename); returns the path (None without one)."""
        if self.path is None:
            return None
        # the keys in CertifyResult.to_json()'s order, so a streamed document equals the whole-run one
        head = {"schema": SCHEMA, "method": self.method, "seed": int(self.seed), "seconds": float(seconds),
                "tolerance": self.tolerance, "logits": self.logits, "verdict": self.verdict,
                "max_abs_logit_deviation": max(self.max_abs_logit_deviation), "agreement": self.agreement.to_json(),
                "truncated": bool(self.truncated_regions), "truncated_regions": self.truncated_regions}
        tail = ""
        if self.delta is not None:
            tail = ',"delta_top1":' + _dumps({"delta": float(self.delta), **self.delta_top1.to_json()})
        try:
            with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as out:
                out.write(_dumps(head)[:-1] + ',"regions":')
                self._copy(("regions",), out)
                out.write(',"layers":[')
                for l, meta in enumerate(self.layer_meta):
                    out.write(("," if l else "") + _dumps(meta)[:-1])
                    for name, side in _ARRAYS:
                        if side is None:
                            out.write(f',"{name}":')
                            self._copy((l, name, side), out)
                        else:
                            out.write(f',"{name}":{{' if side == "lower" else ',')
                            out.write(f'"{side}":')
                            self._copy((l, name, side), out)
                            out.write("}" if side == "upper" else "")
                    out.write("}")
                out.write("]" + tail + (',"models":' + _dumps(self.models) if self.models else "") + "}\n")
        finally:
            self.close()
        return self.path

    def close(self) -> None:
        """Remove the spilled parts (after `finish`, or instead of it when the run failed)."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
