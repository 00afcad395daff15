"""The HTML page of `preftune report`: tables and figures, styles inline, no scripts.

Kept apart from report.py so that the plotting and the page layout can change independently.
Every piece of text from a run (model names, config values) is escaped: a run folder is data,
and data must not be able to inject markup into the page.
"""

from __future__ import annotations

import datetime as _dt
import re
from html import escape

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; background: #fff; line-height: 1.45;
       overflow-wrap: break-word; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
.meta { color: #666; margin-top: 0; }
.table-wrap { overflow-x: auto; margin: 0.5rem 0 1.5rem; }
table { border-collapse: collapse; font-size: 0.92rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
/* On a phone a wide table scrolls in its frame anyway: keep each number on one line there
   ('1.283e-06', not '1.283e-' over '06'); a desktop keeps its width and wraps long cells. */
@media (max-width: 600px) { td.num { white-space: nowrap; } }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; box-sizing: border-box; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92rem; }
.notes { background: #fff8e1; border-left: 4px solid #f0c040; padding: 0.5rem 1rem; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
code { overflow-wrap: anywhere; }
"""

# A number, maybe signed, with a unit or an interval after it: "0.1", "+2.98 ± 0.10",
# "94.3% [90.8%, 96.6%]", "2.254e+04", "1.39 / 0.14", "0.39 (step 60)". Such cells align right,
# so digits line up.
NUMERIC = re.compile(r"[+\-−]?\d[\d.,]*(e[+\-]?\d+)?%?( ± [\d.]+)?( \[[^\]]*\])?( / [\d.e+\-]+)?"
                     r"( \(step \d+\))?")


def _cell(text: str) -> str:
    numeric = NUMERIC.fullmatch(text) is not None
    return f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"


def _table(heading: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    # The wrapper scrolls a wide table by itself, so that a phone does not scroll the whole page.
    return (f'<h2>{escape(heading)}</h2>\n<div class="table-wrap"><table>\n<tr>{head}</tr>\n'
            f"{body}\n</table></div>")


def _figure(src: str, title: str, caption: str) -> str:
    return (
        f'<figure id="{escape(src)}">\n<h3>{escape(title)}</h3>\n'
        # The picture links to itself: on a phone it opens at full size, to zoom into.
        f'<a href="{escape(src)}"><img src="{escape(src)}" alt="{escape(title)}"></a>\n'
        f"<figcaption>{escape(caption)}</figcaption>\n</figure>"
    )


def render_html(title: str, run_dir: str, tables: list, figures: list, notes: list[str],
                config_text: str = "", folder_label: str = "Run folder") -> str:
    """The whole page. tables: (heading, header, rows); figures: (relative src, title, caption)."""
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">\n<head>\n<meta charset="utf-8">',
        # Phones lay the page out at their own width; the colours are light in any browser theme.
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="color-scheme" content="light">',
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{escape(folder_label)} <code>{escape(run_dir)}</code>, generated {generated}.</p>',
    ]
    if notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in notes)
        parts.append(f'<div class="notes"><ul>{items}</ul></div>')
    parts += [_table(*t) for t in tables]
    if figures:
        parts.append("<h2>Plots</h2>")
        parts += [_figure(*f) for f in figures]
    if config_text:
        parts.append("<h2>Full config</h2>\n<details><summary>config.yaml</summary>"
                     f"<pre>{escape(config_text)}</pre></details>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)
