"""The report's matplotlib figures, as PNG bytes that are the same for the same input.

Determinism: the Agg backend, matplotlib's default style reset for every figure, a fixed size and
DPI, the order of the rows as given, and PNG metadata stripped (no "Software" version, no date).
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

from edge_proxy.economics.formulas import PAPER

Rows = Sequence[Mapping[str, str]]

PNG_METADATA = {"Software": None}
"""matplotlib writes no other PNG text chunks by default; Software would carry its version."""


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _png(fig) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=PNG_METADATA)
    _plt().close(fig)
    return buf.getvalue()


def _figure(title: str, ylabel: str, xlabel: str = "", width: float = 8.0):  # type: ignore[no-untyped-def]
    plt = _plt()
    plt.rcdefaults()
    plt.rcParams.update({"svg.hashsalt": "edge-eval", "font.size": 9})
    fig, ax = plt.subplots(figsize=(width, 4.5), layout="constrained")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(True, axis="y", alpha=0.3)
    return fig, ax


def _bars(rows: Rows, column: str, title: str, ylabel: str, line: float | None,
          line_label: str, log: bool = False) -> bytes:
    fig, ax = _figure(title, ylabel, width=max(8.0, 0.16 * len(rows)))
    names = [r["variant"] for r in rows]
    values = [_num(r.get(column)) for r in rows]
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    ax.bar(range(len(names)), finite, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    if line is not None:
        ax.axhline(line, color="#c44e52", linestyle="--", label=line_label)
        ax.legend(loc="upper right")
    if log and any(v > 0 for v in finite):
        ax.set_yscale("log")
    return _png(fig)


def n_break(rows: Rows) -> bytes:
    """N_break per variant, the ROI-within-the-hour line at 20 requests (log scale)."""
    return _bars(rows, "n_break", "Economic break-even N_break per variant", "requests (log)",
                 PAPER.roi_threshold_requests, "ROI within the hour (N_break < 20)", log=True)


def c_tax(rows: Rows) -> bytes:
    """C_tax per variant, the serverless-prohibitive line at 100."""
    return _bars(rows, "c_tax", "Cold-start tax C_tax per variant", "requests' worth of energy",
                 PAPER.serverless_threshold, "serverless prohibitive (C_tax > 100)")


def q_ret(rows: Rows) -> bytes:
    """Q_ret of the variants that have a reference, the lossless line at 99.9 %."""
    with_ref = [r for r in rows if r.get("q_ret") not in (None, "")]
    return _bars(with_ref, "q_ret", "Quantization fidelity Q_ret", "% of the reference score",
                 PAPER.fidelity_threshold_percent, "lossless (Q_ret >= 99.9 %)")


def ipw_vs_size(rows: Rows) -> bytes:
    """IPW [1/J] against model size [GB], one point per variant."""
    fig, ax = _figure("Intelligence per joule against model size", "IPW [1/J]",
                      "model size [GB]")
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        x, y = _num(r.get("model_gigabytes")), _num(r.get("ipw"))
        if math.isfinite(x) and math.isfinite(y):
            groups.setdefault(r.get("precision") or "?", []).append((x, y, r["variant"]))
    for i, (prec, pts) in enumerate(groups.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors[i % len(colors)],
                   label=prec)
        if len(rows) <= 12:                 # names only where they stay readable
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if groups:
        ax.legend(title="precision")
    return _png(fig)


def rho_by_precision(rows: Rows) -> bytes:
    """Mean rho_sys [tokens/s/GB] per precision (precisions in first-seen order)."""
    fig, ax = _figure("System density rho_sys per precision", "tokens/s/GB (mean)")
    groups: dict[str, list[float]] = {}
    for r in rows:
        v = _num(r.get("rho_sys"))
        if math.isfinite(v):
            groups.setdefault(r.get("precision") or "?", []).append(v)
    names = list(groups)
    ax.bar(range(len(names)), [math.fsum(g) / len(g) for g in groups.values()], color="#55a868")
    ax.set_xticks(range(len(names)), names)
    return _png(fig)


def energy_per_token(sweeps: Mapping[str, Sequence[Mapping[str, float]]]) -> bytes:
    """Energy per output token [J/token] against concurrency, one line per variant."""
    fig, ax = _figure("Energy per output token against concurrency", "J / output token",
                      "concurrent requests")
    for name, points in sweeps.items():
        pts = sorted((float(p["concurrency"]), float(p["joules_per_output_token"])) for p in points
                     if p.get("joules_per_output_token") is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if sweeps:
        ax.legend(fontsize=7)
    return _png(fig)
