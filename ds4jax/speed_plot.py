"""Prefill and generation tokens/s against context size, from a bench CSV, as an SVG (stdlib only).

    python -m ds4jax.speed_plot speed-bench/h200.csv [-o out.svg] [--title "H200 t/s"]

Reads the columns ``ctx_tokens``, ``prefill_tps`` and ``gen_tps`` (``ds4jax.bench``'s CSV, which
is ds4-bench's format, so ds4's own CSVs plot too) and draws prefill (left axis, blue) and
generation (right axis, red) against the context, each axis from 0 to a round number above its
largest value. The output goes beside the CSV as ``<stem>_ts.svg`` unless ``-o`` names it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from ds4jax.errors import DS4Error

PREFILL_COLOR, GEN_COLOR = "#2563eb", "#dc2626"
COLUMNS = ("ctx_tokens", "prefill_tps", "gen_tps")


def read_rows(path: str | Path) -> list[tuple[float, float, float]]:
    """(ctx, prefill t/s, gen t/s) rows sorted by context; a one-line error for a file that is
    missing, lacks a column, holds a non-number or has fewer than two rows."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # ds4's m4_max.csv starts with a BOM
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DS4Error(f"{path}: no column {', '.join(missing)} (need {', '.join(COLUMNS)})")
            rows = []
            for i, r in enumerate(reader, start=2):
                try:
                    rows.append(tuple(float(r[c]) for c in COLUMNS))
                except (TypeError, ValueError):
                    raise DS4Error(f"{path}:{i}: not a number in {', '.join(COLUMNS)}") from None
    except OSError as e:
        raise DS4Error(f"cannot read {path}: {e.strerror}") from None
    if len(rows) < 2:
        raise DS4Error(f"{path}: {len(rows)} data row(s); a plot needs at least 2")
    return sorted(rows)


def nice_step(span: float, ticks: int = 5) -> float:
    """The smallest round step (1, 2, 2.5 or 5 times a power of ten) with ``ticks`` steps covering ``span``."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _axis(top: float) -> tuple[float, float]:
    """(axis maximum, tick step) for values in [0, top]."""
    step = nice_step(top)
    return max(step, math.ceil(top / step) * step), step


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:g}"


def render_svg(rows, title: str, width: int = 960, height: int = 540) -> str:
    """The SVG text of the two curves over ``rows`` ((ctx, prefill, gen), sorted by ctx)."""
    left, right, top, bottom = 80, 80, 50, 80
    pw, ph = width - left - right, height - top - bottom
    x_max, x_step = _axis(max(r[0] for r in rows))
    p_max, p_step = _axis(max(r[1] for r in rows))
    n = round(p_max / p_step)  # grid lines: the prefill axis's ticks; the gen axis gets n round steps
    g_max = n * nice_step(max(r[2] for r in rows), n)
    X = lambda v: left + pw * v / x_max
    Y = lambda v, m: top + ph * (1 - v / m)
    svg = f'width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" {svg} font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="28" text-anchor="middle" font-size="18">{escape(title)}</text>',
    ]
    # grid and left ticks from the prefill scale; right ticks at the same heights, gen's scale
    for i in range(n + 1):
        y = Y(i * p_step, p_max)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" fill="{PREFILL_COLOR}">{_fmt(i * p_step)}</text>'
        )
        out.append(f'<text x="{left + pw + 8}" y="{y + 4:.1f}" fill="{GEN_COLOR}">{_fmt(i * g_max / n)}</text>')
    for i in range(round(x_max / x_step) + 1):
        x = X(i * x_step)
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 20}" text-anchor="middle">{_fmt(i * x_step)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 38}" text-anchor="middle">context tokens</text>')
    mid = top + ph / 2
    out.append(
        f'<text x="20" y="{mid}" text-anchor="middle" transform="rotate(-90 20 {mid})" '
        f'fill="{PREFILL_COLOR}">prefill tokens/s</text>'
    )
    xr = width - 20
    out.append(
        f'<text x="{xr}" y="{mid}" text-anchor="middle" transform="rotate(90 {xr} {mid})" '
        f'fill="{GEN_COLOR}">generation tokens/s</text>'
    )
    for col, color, m in ((1, PREFILL_COLOR, p_max), (2, GEN_COLOR, g_max)):
        pts = " ".join(f"{X(r[0]):.1f},{Y(r[col], m):.1f}" for r in rows)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.extend(f'<circle cx="{X(r[0]):.1f}" cy="{Y(r[col], m):.1f}" r="3" fill="{color}"/>' for r in rows)
    # the legend in one row under the axis label, outside the data
    for i, (label, color) in enumerate((("prefill t/s (left)", PREFILL_COLOR), ("generation t/s (right)", GEN_COLOR))):
        x, y = left + pw / 2 - 190 + 200 * i, height - 14
        out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{x + 30}" y="{y}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def default_title(path: str | Path) -> str:
    """'h200_q2' -> 'H200 Q2 t/s' (the CSV's stem, words capitalized)."""
    words = Path(path).stem.replace("-", "_").split("_")
    return " ".join(w[:1].upper() + w[1:] for w in words if w) + " t/s"


def plot(csv_path: str | Path, svg_path: str | Path | None = None, title: str | None = None) -> Path:
    """Write the plot of ``csv_path`` (default: beside it, ``<stem>_ts.svg``); returns its path."""
    rows = read_rows(csv_path)
    out = Path(svg_path) if svg_path else Path(csv_path).with_name(Path(csv_path).stem + "_ts.svg")
    try:
        out.write_text(render_svg(rows, title or default_title(csv_path)), encoding="utf-8")
    except OSError as e:
        raise DS4Error(f"cannot write {out}: {e.strerror}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds4jax.speed_plot", description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("-o", "--out", default=None, help="SVG path (default: <stem>_ts.svg beside the CSV)")
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)
    try:
        print(plot(a.csv, a.out, a.title))
    except DS4Error as e:
        print(f"ds4jax.speed_plot: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
