"""HTML pieces of the portal page: tables, training curves as inline SVG, a small Markdown subset.

Everything is static HTML with inline CSS and SVG: the page needs no script and loads nothing, so it
renders the same offline, in any browser, and in a zipped copy of the reports folder.
"""
from __future__ import annotations

import html
import math
import re
from typing import Iterable, Sequence

Curve = tuple[str, list[tuple[float, float]]]  # (label, [(epoch, loss)])
# Colour-blind-safe (Okabe-Ito) line colours, in the order the curves come.
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """Figures as a reader compares them: 4 decimals for fractions, plain integers, text as is."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def table(head: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    """Rows of already-escaped HTML cells (use esc/fmt on plain values)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def delta(now: object, before: object) -> str:
    """Signed change. Not coloured good/bad: whether up is better depends on the figure (loss, recall)."""
    if not isinstance(now, (int, float)) or not isinstance(before, (int, float)) or isinstance(now, bool):
        return ""
    diff = now - before
    if diff == 0:
        return '<span class="same">=</span>'
    rel = f" ({diff / abs(before):+.1%})" if before else ""
    return f'<span class="{"up" if diff > 0 else "down"}">{diff:+.4g}{rel}</span>'


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round tick values inside [lo, hi], 1, 2, 2.5 or 5 times a power of ten apart (about n of them)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def curves_svg(curves: list[Curve], width: int = 640, height: int = 300) -> str:
    """Loss against epoch, one line per curve, with axes, ticks, a legend and per-point tooltips."""
    points = [p for _, pts in curves for p in pts]
    if not points:
        return ""
    left, right, top, bottom = 56, 150, 14, 40
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg class="curves" role="img" aria-label="training loss by epoch" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'class="frame" fill="none" stroke="#bbb"/>']
    for y in _ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in _ticks(x_lo, x_hi, n=min(10, max(1, int(x_hi - x_lo)))):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">epoch</text>'
                 f'<text x="14" y="{(top + height - bottom) / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">loss</text>')
    for i, (label, pts) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="curve" data-label="{esc(label)}" points="{line}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"><title>{esc(label)} '
                  f'epoch {x:g}: {y:.4f}</title></circle>' for x, y in pts]
        ly = top + 14 + 18 * i
        parts.append(f'<line x1="{width - right + 12}" x2="{width - right + 32}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2"/><text x="{width - right + 38}" y="{ly}">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>")]


def _inline(text: str) -> str:
    out = esc(text)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown(text: str) -> str:
    """The Markdown that `towerflow ablate` writes: headings, paragraphs, '-' lists, pipe tables,
    `code` and **bold**. Anything else shows as plain (escaped) text."""
    out: list[str] = []
    rows: list[list[str]] = []
    items: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if rows:
            out.append(table([_inline(c) for c in rows[0]], [[_inline(c) for c in r] for r in rows[1:]], "md"))
            rows.clear()

    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            if para or items:
                flush()
            cells = [c.strip() for c in s.strip("|").split("|")]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):  # skip the |---| rule
                rows.append(cells)
        elif not s:
            flush()
        elif s.startswith("#"):
            flush()
            level = min(len(s) - len(s.lstrip("#")) + 2, 6)  # '# title' -> h3: the page has h1/h2
            out.append(f"<h{level}>{_inline(s.lstrip('#').strip())}</h{level}>")
        elif s.startswith("- "):
            if para or rows:
                flush()
            items.append(s[2:])
        elif items and line.startswith("  "):
            items[-1] += " " + s  # a wrapped list item
        else:
            if items or rows:
                flush()
            para.append(s)
    flush()
    return "\n".join(out)
