"""The console's HTML, rendered on the server: tables, a progress bar and inline SVG plots.

Every value shown came from the database or a device and is treated as hostile: it reaches the page
only through :func:`html.escape` (text and attributes alike). Nothing is loaded from elsewhere: the
styles are inline, the plots are SVG drawn here, and no page runs a script.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

REFRESH_SECONDS = 5  # the overview reloads itself this often while it is open
NAV = (("/", "Overview"), ("/versions", "Versions"), ("/packages", "Packages"))
PLOT_COLOURS = ("#1f6feb", "#d9480f", "#2b8a3e", "#862e9c")

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#1c1e21}
nav{background:#1c1e21;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
nav a{color:#9ecbff;text-decoration:none}nav .who{margin-left:auto;color:#ccc}
main{padding:8px 16px}.banner{background:#fff3bf;padding:8px 16px;margin:0}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f1f3f5}.note{color:#555}progress{width:240px}svg{background:#fafafa;margin:8px 8px 0 0}
"""


@dataclass(frozen=True)
class PhaseView:
    phase: str
    done: int
    total: int | None
    seconds: float


@dataclass(frozen=True)
class RoundView:
    """The newest round as the overview and ``/api/round`` show it."""

    lineage: str
    round: int
    phase: str  # the phase it is in, or "completed" / "failed" once it ended
    done: int
    total: int | None
    elapsed_seconds: float  # since its first phase began (to its end, once ended)
    ended: bool
    detail: str | None  # the version it made, or why it failed
    phases: list[PhaseView]


def layout(
    title: str,
    body: str,
    *,
    tenant: str,
    operator: str | None,
    banner: str | None = None,
    refresh: bool = False,
) -> str:
    """A whole page: the nav bar, an optional banner, the title and ``body`` (already escaped HTML)."""
    links = "".join(f'<a href="{href}">{name}</a>' for href, name in NAV)
    who = f"operator {escape(operator)}" if operator else "no login"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} · fleetlora console</title>"
        + (f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else "")
        + f"<style>{STYLE}</style></head><body>"
        f'<nav><strong>fleetlora · {escape(tenant)}</strong>{links}<span class="who">{who}</span></nav>'
        + (f'<p class="banner">{escape(banner)}</p>' if banner else "")
        + f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def refused(message: str) -> str:
    """The page for a request without a valid session: what is wrong and how to get one."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Log in · fleetlora console</title>'
        f"<style>{STYLE}</style></head><body><main><h1>Log in to the console</h1>"
        f"<p>{escape(message)}</p><p>On the coordinator host, run <code>fleetlora coordinator console "
        "login --operator NAME --operator-key FILE --otp CODE</code> and open the link it prints "
        "(within a minute; each link works once).</p></main></body></html>"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str, cls: str = "") -> str:
    """An HTML table of text cells (each escaped); ``empty`` says what it means to have no rows."""
    if not rows:
        return f'<p class="note">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{escape(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def round_section(current: RoundView | None) -> str:
    """The live round: number, phase, a progress bar of done/total, elapsed time, and its phases."""
    if current is None:
        return '<section id="round"><h2>Current round</h2><p class="note">No round has run yet.</p></section>'
    bar = (
        f'<progress value="{current.done}" max="{current.total}"></progress>'
        if current.total
        else "<progress></progress>"  # indeterminate: the phase has no count
    )
    count = f"{current.done}/{current.total}" if current.total is not None else str(current.done)
    detail = f" ({escape(current.detail)})" if current.detail else ""
    phases = table(
        ("phase", "done", "seconds"),
        [
            (p.phase, f"{p.done}/{p.total}" if p.total is not None else p.done, f"{p.seconds:.1f}")
            for p in current.phases
        ],
        empty="No phases recorded.",
        cls="phases",
    )
    return (
        f'<section id="round"><h2>Current round: round {current.round} of lineage '
        f"{escape(current.lineage[:12])}</h2>"
        f'<p>Phase <strong class="phase">{escape(current.phase)}</strong>{detail} · {bar} '
        f'<span class="count">{escape(count)}</span> · <span class="elapsed">'
        f"{escape(duration(current.elapsed_seconds))}</span>"
        f"{' in all' if current.ended else ' elapsed'}</p>{phases}</section>"
    )


def line_plot(
    title: str, series: Mapping[str, Sequence[tuple[float, float]]], *, x_label: str, y_label: str
) -> str:
    """An SVG line plot: one polyline (with a dot per point) for each series, axes with their ranges."""
    points = [p for values in series.values() for p in values]
    if not points:
        return f'<p class="note">{escape(title)}: no data yet.</p>'
    width, left, right, bottom = 560, 60, 16, 44
    top = 28 + 14 * len(series)  # the legend sits above the plot, one line per series
    height = top + 190 + bottom
    (x0, x1), (y0, y1) = _span([x for x, _ in points]), _span([y for _, y in points])

    def at(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        return round(px, 1), round(height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom), 1)

    parts = [
        f'<svg class="plot" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
        f'<text x="{left}" y="18" font-weight="bold">{escape(title)}</text>',
        f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" '
        f'y2="{height - bottom}" stroke="#333"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>',
        f'<text x="{left}" y="{height - bottom + 16}" text-anchor="middle">{_number(x0)}</text>',
        f'<text x="{width - right}" y="{height - bottom + 16}" text-anchor="end">{_number(x1)}</text>',
        f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{_number(y0)}</text>',
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{_number(y1)}</text>',
        f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">'
        f"{escape(x_label)}</text>",
        f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{escape(y_label)}</text>',
    ]
    for index, (name, values) in enumerate(series.items()):
        colour = PLOT_COLOURS[index % len(PLOT_COLOURS)]
        placed = [at(x, y) for x, y in sorted(values)]
        coords = " ".join(f"{px},{py}" for px, py in placed)
        parts.append(
            f'<polyline class="series" data-series="{escape(name)}" points="{coords}" fill="none" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        parts.extend(f'<circle cx="{px}" cy="{py}" r="3" fill="{colour}"/>' for px, py in placed)
        parts.append(
            f'<text x="{width - right}" y="{32 + 14 * index}" text-anchor="end" fill="{colour}">'
            f"{escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def duration(seconds: float) -> str:
    """``75`` → ``1m 15s``; an hour or more as ``2h 03m``."""
    whole = max(0, int(seconds))
    if whole >= 3600:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 60}m {whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _span(values: Sequence[float]) -> tuple[float, float]:
    """The axis range of ``values``; a single value gets a unit-wide range around it."""
    low, high = min(values), max(values)
    return (low - 0.5, high + 0.5) if math.isclose(low, high) else (low, high)


def _number(value: float) -> str:
    return f"{value:.4g}"
