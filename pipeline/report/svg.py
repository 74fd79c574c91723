"""The report's charts as inline SVG, written directly (no plotting library, nothing fetched):
a heatmap, grouped horizontal bars, a line plot with an optional log axis, and a scatter plot
whose points show a title on hover.

Each function returns one ``<svg>`` element as a string; text is escaped here.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

# matplotlib's tab10: distinct for up to 10 classes; beyond that, hues spread around the circle
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
         "#bcbd22", "#17becf")
CHAR_WIDTH = 6.6  # average width of a 11 px sans-serif character, to size label margins
FONT = 11


def text(value) -> str:
    """``value`` as text safe inside an element or an attribute."""
    return escape(str(value), quote=True)


def class_colour(index: int, n_classes: int) -> str:
    """A colour per class: tab10 up to 10 classes, then evenly spaced hues."""
    if n_classes <= len(TAB10):
        return TAB10[index]
    return f"hsl({index * 360 / n_classes:.0f}, 70%, 45%)"


def _svg(width, height, body, label) -> str:
    return (f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
            f'role="img" aria-label="{text(label)}" font-family="sans-serif" font-size="{FONT}">'
            + "".join(body) + "</svg>")


def _label_width(labels) -> float:
    return max((len(str(label)) for label in labels), default=1) * CHAR_WIDTH + 8


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers (steps of 1, 2 or 5 x 10^k) from ``low`` to ``high``."""
    span = high - low
    if span <= 0:
        return [low]
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def heatmap(matrix, labels, title_of) -> str:
    """A square matrix of counts (rows: true, columns: predicted) as cells shaded by each
    row's share; each cell shows its count and, on hover, ``title_of(i, j)``."""
    matrix = np.asarray(matrix)
    n = len(labels)
    cell = max(14, min(44, 560 // max(n, 1)))
    margin = _label_width(labels)
    left, top = margin + 18, margin + 18
    body = [f'<text x="{left + n * cell / 2:.0f}" y="12" text-anchor="middle" font-weight="bold">predicted</text>',
            f'<text transform="translate(12 {top + n * cell / 2:.0f}) rotate(-90)" text-anchor="middle" '
            f'font-weight="bold">true</text>']
    totals = matrix.sum(axis=1)
    for i, label in enumerate(labels):
        y = top + i * cell
        body.append(f'<text x="{left - 5}" y="{y + cell / 2 + 4:.0f}" text-anchor="end">{text(label)}</text>')
        body.append(f'<text transform="translate({left + i * cell + cell / 2 + 4:.0f} {top - 5}) rotate(-60)">'
                    f'{text(label)}</text>')
        for j in range(n):
            share = matrix[i, j] / totals[i] if totals[i] else 0.0
            x = left + j * cell
            body.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="#1f5fa8" '
                        f'fill-opacity="{0.04 + 0.96 * share:.3f}" stroke="#fff"><title>{text(title_of(i, j))}</title></rect>')
            if matrix[i, j] and cell >= 18:
                colour = "#fff" if share > 0.5 else "#222"
                size = min(FONT, cell * 0.42)
                body.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + size / 3:.1f}" text-anchor="middle" '
                            f'font-size="{size:.0f}" fill="{colour}" pointer-events="none">{matrix[i, j]}</text>')
    return _svg(left + n * cell + 10, top + n * cell + 10, body, "confusion matrix")


def grouped_bars(labels, series, scale_width=360) -> str:
    """Horizontal bars from 0 to 1: for each of ``labels`` one bar per ``series`` entry
    ``(name, colour, values)``, its value written beside it."""
    bar, gap = 9, 10
    group = bar * len(series) + gap
    left = _label_width(labels) + 6
    top = 26
    body = []
    x = left
    for name, colour, _ in series:  # legend
        body.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{colour}"/>'
                    f'<text x="{x + 14}" y="13">{text(name)}</text>')
        x += 14 + len(name) * CHAR_WIDTH + 16
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        tx = left + tick * scale_width
        body.append(f'<line x1="{tx}" x2="{tx}" y1="{top - 4}" y2="{top + group * len(labels)}" stroke="#ddd"/>')
    for i, label in enumerate(labels):
        y = top + i * group
        body.append(f'<text x="{left - 6}" y="{y + group / 2:.0f}" text-anchor="end">{text(label)}</text>')
        for k, (name, colour, values) in enumerate(series):
            value = float(values[i])
            by = y + k * bar
            body.append(f'<rect x="{left}" y="{by}" width="{max(value * scale_width, 0.5):.1f}" height="{bar - 1}" '
                        f'fill="{colour}"><title>{text(label)}: {name} {value:.3f}</title></rect>'
                        f'<text x="{left + value * scale_width + 4:.1f}" y="{by + bar - 1}" font-size="9">{value:.2f}</text>')
    height = top + group * len(labels) + 16
    for tick in (0, 0.5, 1.0):
        body.append(f'<text x="{left + tick * scale_width}" y="{height - 4}" text-anchor="middle">{tick:g}</text>')
    return _svg(left + scale_width + 40, height, body, "per-class scores")


def line_plot(xs, ys, chosen, x_label, y_label, log_x, width=560, height=300) -> str:
    """``ys`` against ``xs`` (a log axis when ``log_x``) with the point at x = ``chosen``
    ringed; each point's values show on hover."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    left, right, top, bottom = 56, 16, 14, 42
    fx = np.log10 if log_x else (lambda v: v)
    lo, hi = float(fx(xs.min())), float(fx(xs.max()))
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    y_lo, y_hi = float(ys.min()), float(ys.max())
    pad = max((y_hi - y_lo) * 0.1, 0.01)
    y_lo, y_hi = max(0.0, y_lo - pad), min(1.0, y_hi + pad)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(v):
        return left + (fx(v) - lo) / (hi - lo) * plot_w

    def py(v):
        return top + (1 - (v - y_lo) / (y_hi - y_lo)) * plot_h

    body = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    x_ticks = [10.0 ** k for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)] if log_x \
        else nice_ticks(lo, hi)
    for t in x_ticks:
        body.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>'
                    f'<text x="{px(t):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{t:g}</text>')
    for t in nice_ticks(y_lo, y_hi):
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                    f'<text x="{left - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    body.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{text(x_label)}</text>'
                f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                f'{text(y_label)}</text>')
    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    body.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for x, y in zip(xs, ys):
        body.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="#1f77b4">'
                    f'<title>{text(x_label)} {x:.3g}: {y:.4f}</title></circle>')
        if x == chosen:  # its label above the point, or below it at the top of the plot
            label_y = py(y) - 12 if py(y) - 12 > top + 10 else py(y) + 22
            anchor = "end" if px(x) > left + plot_w - 40 else "start" if px(x) < left + 40 else "middle"
            body.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="8" fill="none" stroke="#d62728" '
                        f'stroke-width="2"/><text x="{px(x):.1f}" y="{label_y:.1f}" text-anchor="{anchor}" '
                        f'fill="#d62728" font-weight="bold">chosen {x:.3g}</text>')
    return _svg(width, height, body, f"{y_label} against {x_label}")


def scatter(points, colours, outlined, titles, legend, size=560) -> str:
    """2-D ``points`` (N, 2) as dots of ``colours`` (one CSS colour each), those in
    ``outlined`` (a boolean mask) ringed in black and drawn on top; hovering a dot shows its
    entry of ``titles``. ``legend`` lists ``(name, colour)``."""
    points = np.asarray(points, dtype=float)
    pad = 12
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    xy = pad + (points - lo) / span * (size - 2 * pad)
    xy[:, 1] = size - xy[:, 1]  # y grows upwards
    body = [f'<rect width="{size}" height="{size}" fill="#fafafa" stroke="#ccc"/>']
    for i in [*np.flatnonzero(~outlined), *np.flatnonzero(outlined)]:
        ring = ' stroke="#000" stroke-width="1.5"' if outlined[i] else ""
        body.append(f'<circle cx="{xy[i, 0]:.1f}" cy="{xy[i, 1]:.1f}" r="{4.5 if outlined[i] else 3.5}" '
                    f'fill="{colours[i]}" fill-opacity="0.8"{ring}><title>{text(titles[i])}</title></circle>')
    y = 14
    for name, colour in legend:
        body.append(f'<circle cx="{size + 14}" cy="{y - 4}" r="5" fill="{colour}"/>'
                    f'<text x="{size + 24}" y="{y}">{text(name)}</text>')
        y += 16
    body.append(f'<circle cx="{size + 14}" cy="{y - 4}" r="5" fill="#fff" stroke="#000" stroke-width="1.5"/>'
                f'<text x="{size + 24}" y="{y}">mistake</text>')
    width = size + 30 + _label_width([name for name, _ in legend] + ["mistake"])
    return _svg(width, max(size, y + 8), body, "embedding of the split's features")
