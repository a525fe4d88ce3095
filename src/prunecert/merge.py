"""Join the JSON results of shards of one run (`prunecert merge`): certify, attack or audit documents.

A large job is split by its regions (`--center mnist5k:test:0-4999`, `...:5000-9999`), each shard runs
anywhere, and `merge_documents` joins them as if one run had covered every region. It refuses, with
one line naming the file and the field, documents that are not shards of the same run: another
schema, other model weights (sha256), other settings (method, seed, tolerance, eps, ...).

- certify (`prunecert.certify/1`): regions concatenated and renumbered, per-layer arrays joined,
  verdicts and maxima recomputed; `seconds` is the sum of the shards'.
- attack (`prunecert.attack/1`, a folder's result.json): regions listed in order, `x_path` rewritten
  relative to the merged file, the best region recomputed.
- audit (`prunecert.audit/1`, report.json): see `prunecert.reports.merge`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prunecert.certify.verdicts import ClassTally, combine_verdicts
from prunecert.errors import PrunecertError
from prunecert.reports.merge import merge_audits

# a JSON document read from a result file: its shape is the schema's (checked field by field here, and
# by the schema for audits), not a static type
Doc = dict[str, Any]
Named = tuple[str, Doc]  # (file name, document)


class MergeError(PrunecertError):
    """Documents that are not shards of one run (schema, models or settings differ), or unreadable."""


CERTIFY, ATTACK, AUDIT = "prunecert.certify/1", "prunecert.attack/1", "prunecert.audit/1"
SAME_CERTIFY = ("method", "seed", "tolerance", "logits")
SAME_ATTACK = ("objective", "method", "seed")


def read_document(path: str | os.PathLike[str]) -> Doc:
    """A JSON document from `path` (MergeError naming the file if it is not one)."""
    try:
        doc = json.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MergeError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schema"), str):
        raise MergeError(f"{path}: no 'schema' field; not a prunecert certify/attack/audit result")
    return doc


def _hashes(doc: Doc, name: str, models_key: str = "models") -> tuple[str | None, str | None]:
    if models_key == "audit":
        return doc["original"]["sha256"], doc["pruned"]["sha256"]
    models = doc.get("models")
    if not isinstance(models, dict):
        raise MergeError(f"{name}: records no model hashes (written before they were recorded?); cannot check "
                         f"that it is a shard of the same model pair")
    return (models.get("original") or {}).get("sha256"), (models.get("pruned") or {}).get("sha256")


def check_same(docs: list[Named], fields: tuple[str, ...], models_key: str = "models") -> None:
    """MergeError unless every document has the first one's schema, model hashes and `fields`."""
    name0, first = docs[0]
    h0 = _hashes(first, name0, models_key)
    for name, doc in docs[1:]:
        if doc["schema"] != first["schema"]:
            raise MergeError(f"{name}: schema {doc['schema']!r} differs from {name0}'s {first['schema']!r}")
        h = _hashes(doc, name, models_key)
        for which, a, b in (("original", h0[0], h[0]), ("pruned", h0[1], h[1])):
            if a != b:
                raise MergeError(f"{name}: the {which} model's weights (sha256 {str(b)[:12]}...) differ from "
                                 f"{name0}'s ({str(a)[:12]}...): not shards of the same model pair")
        for f in fields:
            if doc.get(f) != first.get(f):
                raise MergeError(f"{name}: setting {f} = {doc.get(f)!r} differs from {name0}'s {first.get(f)!r}")


def merge_documents(docs: list[Named], out: str | os.PathLike[str] | None = None) -> Doc:
    """The merged document of `docs` ((file name, document) pairs, in region order). `out` (the merged
    file's path) is needed for attack results, whose x_path entries are rewritten relative to it."""
    if len(docs) < 2:
        raise MergeError("merge needs at least two result files")
    schema = docs[0][1]["schema"]
    if schema == CERTIFY:
        check_same(docs, SAME_CERTIFY)
        return merge_certify([d for _, d in docs])
    if schema == ATTACK:
        check_same(docs, SAME_ATTACK)
        return merge_attack(docs, Path(out or ".").parent)
    if schema == AUDIT:
        return merge_audits(docs)
    raise MergeError(f"{docs[0][0]}: schema {schema!r} is not one merge knows ({CERTIFY}, {ATTACK}, {AUDIT})")


def merge_certify(docs: list[Doc]) -> Doc:
    """Certify documents of consecutive shards -> the document one run over all their regions gives."""
    first = docs[0]
    meta = [(L["index"], L["name"], L["shape"]) for L in first["layers"]]
    for d in docs[1:]:
        if [(L["index"], L["name"], L["shape"]) for L in d["layers"]] != meta:
            raise MergeError("certify results with different layers (index, name, shape) cannot be merged")
    regions: list[Doc] = []
    for d in docs:
        for r in d["regions"]:
            regions.append({**r, "index": len(regions)})
    layers: list[Doc] = []
    for l, L in enumerate(first["layers"]):
        layer: Doc = {"index": L["index"], "name": L["name"], "shape": L["shape"]}
        for key in ("local", "end_to_end"):
            layer[key] = {side: [v for d in docs for v in d["layers"][l][key][side]] for side in ("lower", "upper")}
        for key in ("max_abs_local", "max_abs_end_to_end"):
            layer[key] = [v for d in docs for v in d["layers"][l][key]]
        layers.append(layer)
    verdicts = [r["verdict"] for r in regions]
    truncated = [r["index"] for r in regions if _truncated(docs, r["index"])]
    out: Doc = {"schema": CERTIFY, "method": first["method"], "seed": first["seed"],
           "seconds": sum(d["seconds"] for d in docs), "tolerance": first["tolerance"], "logits": first.get("logits"),
           "verdict": combine_verdicts(verdicts) if verdicts and verdicts[0] is not None else None,
           "max_abs_logit_deviation": max(r["max_abs_logit_deviation"] for r in regions),
           "agreement": ClassTally.of(r["agreement"] for r in regions).to_json(), "truncated": bool(truncated),
           "truncated_regions": truncated, "regions": regions, "layers": layers}
    if "delta_top1" in first:
        out["delta_top1"] = {"delta": first["delta_top1"]["delta"],
                             **ClassTally.of(r["delta_top1"] for r in regions).to_json()}
    if "models" in first:
        out["models"] = first["models"]
    return out


def _truncated(docs: list[Doc], index: int) -> bool:
    """Whether the merged run's region `index` was cut short (each shard numbers its regions from 0)."""
    for d in docs:
        n = len(d["regions"])
        if index < n:
            return index in d.get("truncated_regions", [])
        index -= n
    return False


def merge_attack(docs: list[Named], out_dir: Path) -> Doc:
    """Attack result.json files (one region, or a folder's summary) -> one summary over every region."""
    regions: list[Doc] = []
    for name, doc in docs:
        folder = Path(name).parent
        for r in doc.get("regions", [doc]):
            x = (folder / r["x_path"]).resolve()
            regions.append({**r, "x_path": os.path.relpath(x, out_dir.resolve())})
    best = max(range(len(regions)), key=lambda i: regions[i]["value"])
    first = docs[0][1]
    keep = ("schema", "objective", "method", "value", "x_path", "trace", "seconds", "seed", "models")
    return {**{k: regions[best][k] for k in keep if k in regions[best]},
            "seconds": sum(d.get("seconds", 0.0) for _, d in docs), "models": first["models"],
            "best_region": best, "regions": regions}
