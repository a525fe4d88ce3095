"""Writing report folders: Markdown agrees with the JSON, HTML is self-contained, writes are all-or-nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from prunecert.errors import PrunecertError
from prunecert.reports import check_writable, render_html, render_markdown, write_report
from prunecert.reports.sample import sample_audit

FILES = ("report.json", "report.html", "report.md")


def md_table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after `## heading`."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
    return cells[2:]  # header and alignment rows


def md_number(text: str) -> float:
    text = text.replace(",", "").rstrip("×")
    return float(re.match(r"[-+0-9.e]+", text).group(0))


def _half_ulp(text: str) -> float:
    """Half a unit in the last digit shown: '4.44' -> 0.005, '1.594e+04' -> 0.5, '1,500' -> 0.5."""
    text = text.replace(",", "").rstrip("×")
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def assert_close(md_text: str, value: float | None) -> None:
    """The Markdown shows `value` correctly rounded (to the digits it shows)."""
    if value is None:
        assert md_text == "—"
    elif md_text.startswith("<"):  # a bound that is only the rounding margin (fmt.TINY)
        assert 0 < value < float(md_text.split(" ")[0][1:]), (md_text, value)
    else:
        shown = md_number(md_text)
        assert abs(shown - value) <= _half_ulp(md_text.split(" ")[0]) * (1 + 1e-9), (md_text, value)


def check_markdown_matches_json(md: str, doc: dict) -> None:
    """Every number of the per-layer and region tables is the JSON's, to the digits shown."""
    rows = md_table(md, "Per-layer deviation")
    assert len(rows) == len(doc["layers"])
    for row, layer in zip(rows, doc["layers"]):
        assert row[0].startswith(f"{layer['index']} ")
        kept, total = (int(v.replace(",", "")) for v in row[1].split("/"))
        assert (kept, total) == (layer["neurons_kept"], layer["neurons_total"])
        assert_close(row[2].split(" ")[0] if layer["provable"] else row[2],
                     layer["provable"]["eps"] if layer["provable"] else None)
        for cell, value in zip(row[3:9], (layer["certified"]["local"], layer["certified"]["end_to_end"],
                                          layer["empirical"]["local"], layer["empirical"]["end_to_end"],
                                          layer["data"]["local"], layer["data"]["end_to_end"])):
            assert_close(cell, value)
        assert_close(row[9], layer["ratios"]["certified_over_empirical"])
        assert_close(row[10], layer["ratios"]["provable_over_certified"])
        assert_close(row[11], layer["tolerance"])
        assert (layer["verdict"] or "—") in row[12]
    regions = md_table(md, "Regions")
    assert len(regions) == len(doc["regions"])
    for row, r in zip(regions, doc["regions"]):
        assert int(row[0]) == r["index"] and r["source"] in row[1]
        assert_close(row[3], r["certified"][-1])
        assert_close(row[4], r["empirical"][-1])
        assert row[5] == r["agreement"] and row[6] == (r["verdict"] or "—")
    assert "**" in md and doc["verdict"]["overall"].upper() in md.splitlines()[2]


def test_markdown_matches_json(tmp_path):
    write_report(sample_audit(), tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    check_markdown_matches_json((tmp_path / "report.md").read_text(), doc)


def test_html_is_self_contained_and_names_everything():
    audit = sample_audit()
    html = render_html(audit)
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", html)  # no external resources
    assert "<script" not in html
    assert html.count("<svg") == len(audit.layers) + 1
    assert html.count('src="data:image/png;base64,') == len(audit.counterexamples) + sum(
        c.center is not None for c in audit.counterexamples)  # inputs + perturbations
    for layer in audit.layers:
        assert f'id="layer-{layer.index}"' in html
    ids = re.findall(r'\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # plot ids are prefixed per figure: no clashes
    assert render_html(audit) == html  # deterministic


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in FILES}


def test_render_failure_leaves_old_report(tmp_path, monkeypatch):
    write_report(sample_audit(violated=False), tmp_path)
    before = _snapshot(tmp_path)
    import prunecert.reports.write as write

    def boom(audit):
        raise RuntimeError("renderer crashed")
    monkeypatch.setattr(write, "render_markdown", boom)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_report(sample_audit(violated=True), tmp_path)
    assert _snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)


def test_write_failure_after_some_temp_files_leaves_old_report(tmp_path, monkeypatch):
    write_report(sample_audit(violated=False), tmp_path)
    before = _snapshot(tmp_path)
    import prunecert.reports.write as write
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(write.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_report(sample_audit(violated=True), tmp_path)
    assert _snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)  # temporary files removed


def test_killed_process_mid_write_leaves_old_report(tmp_path):
    """A real crash (SIGKILL after the first temp file is written): the old report stays, byte for byte."""
    write_report(sample_audit(violated=False), tmp_path)
    before = _snapshot(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal
        import prunecert.reports.write as write
        from prunecert.reports.sample import sample_audit
        real = os.fsync
        def fsync(fd):
            real(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        write.os.fsync = fsync
        write.write_report(sample_audit(violated=True), {str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert _snapshot(tmp_path) == before
    leftovers = [n for n in os.listdir(tmp_path) if n not in FILES]
    assert leftovers and all(n.startswith(".report.") and n.endswith(".tmp") for n in leftovers)


def test_new_report_replaces_all_three(tmp_path):
    write_report(sample_audit(violated=False), tmp_path)
    write_report(sample_audit(violated=True), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["verdict"]["overall"] == "violated"
    assert "VIOLATED" in (tmp_path / "report.md").read_text()
    assert "verdict-violated" in (tmp_path / "report.html").read_text()
    assert oct((tmp_path / "report.json").stat().st_mode & 0o777) != oct(0o600)


def test_json_only(tmp_path):
    paths = write_report(sample_audit(), tmp_path, ("json",))
    assert [p.name for p in paths] == ["report.json"] and os.listdir(tmp_path) == ["report.json"]
    with pytest.raises(PrunecertError, match="unknown report format"):
        write_report(sample_audit(), tmp_path, ("pdf",))


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PrunecertError, match="exists and is not a folder"):
        check_writable(blocker)
    with pytest.raises(PrunecertError, match="file is not a folder"):
        check_writable(blocker / "sub")
    # checking creates nothing (a later failing check must not leave an empty folder); writing does
    assert not check_writable(tmp_path / "a" / "b").exists()
    write_report(sample_audit(), tmp_path / "a" / "b", ("json",))
    assert (tmp_path / "a" / "b" / "report.json").is_file()


def test_markdown_without_counterexamples_or_provable():
    audit = sample_audit(violated=False)
    audit.counterexamples = []
    for layer in audit.layers:
        layer.provable, layer.ratios.provable_over_certified = None, None
    md = render_markdown(audit)
    assert "## Counterexamples" not in md
    check_markdown_matches_json(md, audit.to_json())


def test_package_render_html_stays_a_function_after_rendering(tmp_path):
    """The renderer module used to be `reports/render_html.py`: importing it on the first render made
    `prunecert.reports.render_html` that module, so a second `reports.render_html(audit)` raised
    "'module' object is not callable"."""
    import prunecert.reports as reports

    write_report(sample_audit(), tmp_path, ("html",))  # renders (and imports the renderer) once
    assert callable(reports.render_html), reports.render_html
