"""The report's figures: matplotlib drawn to inline SVG, images as PNG data: URIs (self-contained HTML).

No pyplot: figures are plain `matplotlib.figure.Figure` objects (no global state, no GUI backend).
Output is deterministic (fixed SVG hash salt, no date metadata), so re-rendering the same report
gives the same bytes, and each SVG's ids get a unique prefix so many can live in one HTML page.
"""

from __future__ import annotations

import base64
import io
import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from matplotlib import rc_context
from matplotlib.figure import Figure

from prunecert.reports.model import Audit, LayerReport

if TYPE_CHECKING:  # matplotlib.typing exists from 3.8; only the checker reads it
    from matplotlib.typing import RcKeyType

RC: dict[RcKeyType, Any] = {"svg.hashsalt": "prunecert", "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
      "axes.spines.right": False}
TINY = 1e-200  # sound bounds of a deviation that is exactly 0 can be subnormal (outward rounding): drawn as 0
COLORS = {"provable": "#7b3294", "certified": "#0571b0", "certified (domain)": "#92c5de",
          "attack": "#ca0020", "test data": "#f4a582", "tolerance": "#333333"}


def _svg(fig: Figure, prefix: str) -> str:
    """Serialise `fig` as an inline <svg> element whose ids all start with `prefix`."""
    buf = io.StringIO()
    with rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    ids = set(re.findall(r'id="([^"]+)"', text))
    for old in sorted(ids, key=len, reverse=True):
        new = f"{prefix}-{old}"
        text = text.replace(f'id="{old}"', f'id="{new}"').replace(f"#{old})", f"#{new})") \
                   .replace(f'"#{old}"', f'"#{new}"')
    return text.replace("<svg ", f'<svg class="plot" role="img" aria-label="{prefix}" ', 1)


def _positive(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and v > TINY and math.isfinite(v)]


def layer_plot(layer: LayerReport, prefix: str) -> str:
    """Provable vs certified vs best attack vs test data for one layer, local and end-to-end, log scale."""
    rows: list[tuple[str, str, float | None]] = []  # (group, series, value)
    if layer.provable is not None:
        rows.append(("local", "provable", layer.provable.eps))
    rows += [("local", "certified", layer.certified.local)]
    if layer.certified_domain is not None:
        rows.append(("local", "certified (domain)", layer.certified_domain.local))
    rows += [("local", "attack", layer.empirical.local), ("local", "test data", layer.data.local),
             ("end-to-end", "certified", layer.certified.end_to_end)]
    if layer.certified_domain is not None:
        rows.append(("end-to-end", "certified (domain)", layer.certified_domain.end_to_end))
    rows += [("end-to-end", "attack", layer.empirical.end_to_end), ("end-to-end", "test data", layer.data.end_to_end)]
    with rc_context(RC):
        fig = Figure(figsize=(4.6, 0.3 * len(rows) + 0.9))
        ax = fig.add_subplot()
        positive = _positive([v for _, _, v in rows] + [layer.tolerance])
        y = np.arange(len(rows))[::-1]
        if positive:
            lo, hi = min(positive) / 3.0, max(positive) * 3.0
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            for yi, (group, series, v) in zip(y, rows):
                if v is not None and v > TINY:
                    ax.barh(yi, v - lo, left=lo, color=COLORS[series], height=0.7)
                ax.text(v if v and v > TINY else lo, yi, f" {_short(v)}", va="center", fontsize=8)
            if layer.tolerance is not None:
                ax.axvline(layer.tolerance, color=COLORS["tolerance"], ls="--", lw=1)
                ax.text(layer.tolerance, y[0] + 0.6, " tolerance", fontsize=8, va="bottom")
        else:
            ax.set_xticks([])
            ax.text(0.5, 0.5, "all values are 0 (up to rounding):\nthis layer does not deviate", transform=ax.transAxes,
                    ha="center", va="center")
        ax.set_yticks(y, [f"{g}: {s}" for g, s, _ in rows])
        ax.set_ylim(-0.7, len(rows) - 0.1)
        ax.set_xlabel(f"max |Δ| over neurons, layer {layer.index} ({layer.name})")
        ax.set_title(f"layer {layer.index}: {layer.name}", loc="left", fontsize=10)
        return _svg(fig, prefix)


def _short(v: float | None) -> str:
    return "—" if v is None else "0" if v == 0 else f"{v:.3g}"


def radius_plot(audit: Audit, prefix: str = "radius") -> str:
    """Certified and attacked max |Δ| (end-to-end) against the L-inf radius, one panel per layer.

    Lines: the max and the median over the region centres at each radius; dashed: the whole domain.
    """
    balls = [r for r in audit.regions if r.kind == "linf_ball" and r.eps is not None]
    domain = next((r for r in audit.regions if r.kind == "domain"), None)
    layers = [l for l in audit.layers if max(r.certified[l.index] for r in audit.regions) > TINY] or audit.layers[-1:]
    with rc_context(RC):
        fig = Figure(figsize=(3.1 * len(layers), 2.8))
        axes = fig.subplots(1, len(layers), squeeze=False)[0]
        eps = sorted({r.eps for r in balls if r.eps is not None})
        for ax, layer in zip(axes, layers):
            l = layer.index
            for key, label in (("empirical", "attack"), ("certified", "certified")):  # certified on top
                color, wide = COLORS["certified" if key == "certified" else "attack"], key == "certified"
                if eps:
                    per = [[getattr(r, key)[l] for r in balls if r.eps == e] for e in eps]
                    ax.plot(eps, [max(v) for v in per], "o-", color=color, label=f"{label} (max)",
                            lw=2.5 if wide else 1.2, mfc="none" if wide else color, ms=7 if wide else 4, zorder=3)
                    ax.plot(eps, [float(np.median(v)) for v in per], "s:", color=color, ms=3,
                            label=f"{label} (median)", zorder=3)
                if domain is not None:
                    ax.axhline(getattr(domain, key)[l], color=color, ls="--", lw=1, label=f"{label} (domain)")
            if layer.tolerance is not None:
                ax.axhline(layer.tolerance, color=COLORS["tolerance"], ls="-.", lw=1, label="tolerance")
            if _positive([v for r in audit.regions for v in (r.certified[l], r.empirical[l])]):
                ax.set_yscale("log")
            ax.set_xlabel("L-inf radius eps")
            ax.set_title(f"layer {l}" + (" (logits)" if l == audit.layers[-1].index else ""), fontsize=9)
        axes[0].set_ylabel("max |Δ| end-to-end")
        handles, labels = axes[-1].get_legend_handles_labels()
        fig.tight_layout()
        if handles:
            fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        return _svg(fig, prefix)


def _grid(values: npt.ArrayLike, shape: list[int]) -> npt.NDArray[np.float64]:
    """An (H, W) or (H, W, 3) array to show: images as they are, other inputs as a near-square grid."""
    v = np.asarray(values, dtype=np.float64)
    if len(shape) == 3 and shape[0] in (1, 3):
        img = v.reshape(shape)
        return img[0] if shape[0] == 1 else np.moveaxis(img, 0, -1)
    if len(shape) == 2:
        return v.reshape(shape)
    n = v.size
    w = int(math.ceil(math.sqrt(n)))
    h = int(math.ceil(n / w))
    out = np.full(h * w, np.nan)
    out[:n] = v.ravel()
    return out.reshape(h, w)


def png_data_uri(values: npt.ArrayLike, shape: list[int], kind: str = "input", vmax: float | None = None) -> str:
    """A PNG data: URI of an input (grey, [0, 1]) or a perturbation (diverging, symmetric around 0)."""
    from matplotlib import colormaps

    img = _grid(values, shape)
    if kind == "input":
        rgba = colormaps["gray"](np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0)) if img.ndim == 2 else \
            np.concatenate([np.clip(img, 0, 1), np.ones(img.shape[:2] + (1,))], axis=2)
    else:
        m = vmax if vmax and vmax > 0 else float(np.nanmax(np.abs(img))) or 1.0
        gray = img.mean(axis=2) if img.ndim == 3 else img
        rgba = colormaps["RdBu_r"](np.clip(0.5 + 0.5 * np.nan_to_num(gray) / m, 0.0, 1.0))
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(rgba)[..., :3] * 255).round().astype(np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
