"""report.html: one self-contained page rendered from an `Audit` (jinja2, inline SVG, data: URI images).

Nothing is fetched: no scripts, fonts or stylesheets from elsewhere, so the page opens offline and
can be archived as one file beside report.json.
"""

from __future__ import annotations

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from prunecert.reports import fmt
from prunecert.reports.model import Audit, Counterexample
from prunecert.reports.plots import layer_plot, png_data_uri, radius_plot


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("prunecert.reports", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(num=fmt.num, ratio=fmt.ratio, pct=fmt.pct, secs=fmt.seconds, kept=fmt.kept)
    return env


def _panel(audit: Audit, c: Counterexample) -> dict[str, object]:
    """Images and top-3 rows of one counterexample panel."""
    x = np.asarray(c.x, dtype=np.float64)
    panel = {"c": c, "input_uri": png_data_uri(x, c.shape, "input"), "pert_uri": None, "pert_max": None,
             "region_source": audit.regions[c.region].source if c.region < len(audit.regions) else "?",
             "top": list(zip(c.top_f, c.top_g))}
    if c.center is not None:
        pert = x - np.asarray(c.center, dtype=np.float64)
        m = float(np.max(np.abs(pert))) if pert.size else 0.0
        panel.update(pert_uri=png_data_uri(pert, c.shape, "perturbation", vmax=m or 1.0), pert_max=m)
    return panel


def render_html(audit: Audit) -> str:
    """The HTML report of `audit` as a string."""
    template = _environment().get_template("report.html.j2")
    return template.render(
        a=audit, m=audit.metrics, versions=audit.reproducibility.versions,
        layer_plots=[layer_plot(l, f"layer{l.index}") for l in audit.layers],
        radius_plot=radius_plot(audit, "radius"),
        panels=[_panel(audit, c) for c in audit.counterexamples],
        total_seconds=sum(s.seconds for s in audit.timings),
    )
