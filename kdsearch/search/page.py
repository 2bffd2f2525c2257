"""The leaderboard as a page a person reads: leaderboard.html, self-contained (no script or style fetched).

The table fits the window (it scrolls sideways inside its box, the header stays put), the best trial and the
Pareto front are marked, every column sorts on a click, each trial links to its MLflow run, the plots sit under
the table, and a confirmed search's ranking over fresh seeds (mean, 95% interval, "within noise") comes first.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:100%}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}
.note{color:#555;max-width:60em}
.box{overflow-x:auto;max-height:70vh;border:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;white-space:nowrap}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left}
th{position:sticky;top:0;background:#f4f4f4;cursor:pointer;user-select:none}
th:hover{background:#e8e8e8}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#e6f4ea;font-weight:600}
tr.noise td{background:#fff8e1}
tr.failed td{color:#999}
.plots img{max-width:46%;margin:.5em 1% 0 0;border:1px solid #eee;vertical-align:top}
a{color:#1a5fb4}
"""

_SORT = """
for (const table of document.querySelectorAll("table.sortable")) {
  table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
    const body = table.tBodies[0], rows = [...body.rows], up = th.dataset.dir !== "asc";
    const key = r => { const t = r.cells[col].innerText.trim(); const n = parseFloat(t.replace(/[±,]/g, " "));
                       return isNaN(n) ? t : n; };
    rows.sort((a, b) => { const x = key(a), y = key(b);
      const c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
      return up ? c : -c; });
    th.dataset.dir = up ? "asc" : "desc";
    rows.forEach(r => body.appendChild(r));
  }));
}
"""


def _number(cell: str) -> bool:
    try:
        float(cell.split(" ")[0])
    except ValueError:
        return False
    return True


def _table(columns: Sequence[str], cells: Sequence[Sequence[str]], classes: Sequence[str],
           urls: Sequence[str | None] | None = None) -> str:
    """A sortable table; `urls[i]`, where given, links row i's `trial` cell (its MLflow run)."""
    linked = columns.index("trial") if urls is not None and "trial" in columns else None
    head = "".join(f"<th title='sort'>{html.escape(c)}</th>" for c in columns)
    body = []
    for row, (line, cls) in enumerate(zip(cells, classes, strict=True)):
        tds = []
        for i, cell in enumerate(line):
            text = html.escape(cell)
            url = urls[row] if urls is not None and i == linked else None
            numeric = _number(cell) and i != linked  # a trial's id may look like a number: it is a name
            tds.append(f"<td{' class=num' if numeric else ''}>" +
                       (f"<a href='{html.escape(url)}'>{text}</a>" if url else text) + "</td>")
        body.append(f"<tr{f' class={cls}' if cls else ''}>{''.join(tds)}</tr>")
    return (f"<div class=box><table class=sortable><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) +
            "\n</tbody></table></div>")


def leaderboard_page(title: str, columns: Sequence[str], cells: Sequence[Sequence[str]], *,
                     run_urls: Sequence[str | None], plots: Sequence[str], ui_note: str,
                     confirmed: Sequence[dict[str, Any]] | None = None) -> str:
    """The page. `cells` in rank order (rank "1" is the best); `run_urls[i]`: row i's MLflow run page;
    `plots`: PNG file names beside the page; `confirmed`: CONFIRMED_TAG's rows, best mean first."""
    rank, status, pareto = (columns.index(c) if c in columns else None for c in ("rank", "status", "pareto"))
    classes = ["best" if rank is not None and line[rank] == "1" else
               "failed" if status is not None and line[status] not in ("FINISHED", "") else
               "noise" if pareto is not None and line[pareto] == "*" else "" for line in cells]
    parts = [f"<!doctype html><html lang=en><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style><h1>{html.escape(title)}</h1>"]
    if confirmed:
        rows = [[str(i), f"{r['mean']:.2f}" + (f" ± {r['ci95']:.2f}" if r["ci95"] is not None else ""),
                 str(len(r["scores"])), r["vs_best"], r["label"]] for i, r in enumerate(confirmed, 1)]
        marks = ["best" if r["vs_best"] == "best" else "noise" if r["vs_best"] == "within noise" else ""
                 for r in confirmed]
        parts += ["<h2>Confirmed over fresh seeds</h2><p class=note>Mean score x 100 over fresh seeds ± the "
                  "half-width of its 95% Student t interval. Rows marked <em>within noise</em> (yellow): Welch's "
                  "test cannot tell them from the best at 5%; the single-seed ranking below ranks noise as "
                  "readily as strategy.</p>",
                  _table(["rank", "mean ± 95% CI", "seeds", "vs best", "configuration"], rows, marks)]
    front = "the Pareto front in yellow; " if pareto is not None else ""
    parts += [f"<h2>Trials</h2><p class=note>Best first (green); {front}click a column to sort. "
              f"{html.escape(ui_note)}</p>", _table(columns, cells, classes, run_urls)]
    if plots:
        parts += ["<h2>Plots</h2><div class=plots>" +
                  "".join(f"<img src='{html.escape(p)}' alt='{html.escape(p)}'>" for p in plots) + "</div>"]
    parts += [f"<script>{_SORT}</script></html>"]
    return "\n".join(parts) + "\n"
