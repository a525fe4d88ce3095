"""The Audit data model and its JSON Schema: round trips, validation, rejection of bad documents."""

from __future__ import annotations

import copy
import json

import pytest

from prunecert.errors import PrunecertError
from prunecert.reports import Audit, ReportError, load_schema, read_report, validate
from prunecert.reports.model import SCHEMA
from prunecert.reports.sample import sample_audit


def test_sample_validates_and_round_trips():
    audit = sample_audit()
    doc = audit.to_json()
    validate(doc)
    assert doc["schema"] == SCHEMA == load_schema()["properties"]["schema"]["const"]
    back = Audit.from_json(json.loads(json.dumps(doc)))
    assert back == audit
    assert back.to_json() == doc


def test_every_top_level_field_is_required_and_no_other_is_allowed():
    schema = load_schema()
    assert set(schema["required"]) == set(schema["properties"]) == set(sample_audit().to_json())
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("layers"), "(top level)"),
    (lambda d: d["verdict"].update(overall="maybe"), "verdict/overall"),
    (lambda d: d["verdict"].update(tolerance=0), "verdict/tolerance"),
    (lambda d: d["layers"][1]["certified"].update(local=-1.0), "layers/1/certified/local"),
    (lambda d: d["layers"][0].update(extra=1), "layers/0"),
    (lambda d: d["regions"][0].update(kind="sphere"), "regions/0/kind"),
    (lambda d: d["original"].update(sha256="xyz"), "original/sha256"),
    (lambda d: d["metrics"].update(accuracy_pruned=1.5), "metrics/accuracy_pruned"),
    (lambda d: d["counterexamples"][0].update(x=[]), "counterexamples/0/x"),
    (lambda d: d.update(schema="prunecert.audit/2"), "schema"),
])
def test_schema_rejects_bad_documents(mutate, where):
    doc = copy.deepcopy(sample_audit().to_json())
    mutate(doc)
    with pytest.raises(ReportError) as err:
        validate(doc, "r.json")
    assert f"at {where}" in str(err.value) and str(err.value).startswith("r.json:")
    assert isinstance(err.value, PrunecertError)


def test_non_finite_numbers_become_null():
    audit = sample_audit()
    audit.layers[1].ratios.certified_over_empirical = float("inf")
    doc = audit.to_json()
    assert doc["layers"][1]["ratios"]["certified_over_empirical"] is None
    json.dumps(doc, allow_nan=False)
    validate(doc)


def test_read_report_errors_name_the_file(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        read_report(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="bad.json: not a readable JSON report"):
        read_report(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ReportError, match="expected a JSON object"):
        read_report(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(sample_audit().to_json()))
    assert Audit.from_json(read_report(good)) == sample_audit()
