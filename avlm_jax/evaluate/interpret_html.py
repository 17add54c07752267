"""The `index.html` of a batch interpretation: one self-contained page (inline CSS and JS, nothing
fetched from the network) showing every image's overlay (boxes and top findings) with its top
image-level findings, sortable and filterable by any finding, and the files that could not be
read, each with its reason.

Every image is a card in the page's markup, so the page lists everything even without
JavaScript; the script only reorders and hides cards. Overlays are referenced by their path
relative to the page (they sit beside it), so the folder can be moved or zipped whole.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from typing import Sequence

TOP_FINDINGS = 3

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
#controls { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc;
            display: flex; flex-wrap: wrap; gap: 1em; align-items: center; z-index: 1; }
#grid { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 1em; }
.card { width: 300px; margin: 0; border: 1px solid #ddd; border-radius: 4px; padding: 6px; }
.card img { width: 100%; display: block; background: #000; }
.card .name { font-weight: 600; word-break: break-all; }
.card table { border-collapse: collapse; width: 100%; font-size: 13px; }
.card td.p { text-align: right; font-variant-numeric: tabular-nums; }
.card .sel { color: #b00; font-weight: 600; }
#failed td { padding: 2px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
.note { color: #666; }
"""

# Cards carry their probabilities in `data-p` (finding order) and `data-top` (the highest one);
# the controls pick a finding (or "top finding"), an order, a minimum probability and a name filter.
_SCRIPT = """
(function () {
  const names = JSON.parse(document.getElementById('findings').textContent);
  const grid = document.getElementById('grid');
  const cards = Array.from(grid.querySelectorAll('.card')).map(function (el) {
    return {el: el, name: el.dataset.name, lower: el.dataset.name.toLowerCase(),
            p: el.dataset.p.split(' ').map(Number), top: Number(el.dataset.top),
            sel: el.querySelector('.sel')};
  });
  const finding = document.getElementById('finding'), order = document.getElementById('order');
  const min = document.getElementById('min'), minval = document.getElementById('minval');
  const query = document.getElementById('query'), count = document.getElementById('count');
  function update() {
    const f = Number(finding.value), lo = Number(min.value), q = query.value.toLowerCase();
    const score = function (c) { return f < 0 ? c.top : c.p[f]; };
    minval.textContent = lo.toFixed(2);
    let shown = 0;
    cards.forEach(function (c) {
      const keep = score(c) >= lo && c.lower.indexOf(q) >= 0;
      c.el.hidden = !keep;
      if (keep) shown++;
      c.sel.textContent = f < 0 ? '' : names[f] + ': ' + c.p[f].toFixed(3);
    });
    const sorted = cards.slice();
    if (order.value === 'name') sorted.sort(function (a, b) { return a.name.localeCompare(b.name); });
    else if (order.value === 'asc') sorted.sort(function (a, b) { return score(a) - score(b); });
    else sorted.sort(function (a, b) { return score(b) - score(a); });
    sorted.forEach(function (c) { grid.appendChild(c.el); });
    count.textContent = shown + ' of ' + cards.length + ' images shown';
  }
  [finding, order, min, query].forEach(function (el) { el.addEventListener('input', update); });
  update();
})();
"""


def _url(path: str) -> str:
  return urllib.parse.quote(path.replace("\\", "/"))


def _card(record: dict, findings: Sequence[str]) -> str:
  probs = [record["image_findings"][f] for f in findings]
  ranked = sorted(zip(findings, probs), key=lambda fp: -fp[1])[:TOP_FINDINGS]
  rows = "".join(f'<tr><td>{html.escape(f)}</td><td class="p">{p:.3f}</td></tr>' for f, p in ranked)
  name = html.escape(record["name"])
  overlay, js = _url(record["overlay"]), _url(record["json"])
  return (f'<figure class="card" data-name="{name}" data-p="{" ".join(f"{p:.6g}" for p in probs)}" '
          f'data-top="{max(probs):.6g}">'
          f'<a href="{overlay}"><img src="{overlay}" loading="lazy" alt="{name}: boxes and top findings"></a>'
          f'<figcaption><div class="name">{name}</div>'
          f'<div>{record["width"]} × {record["height"]} px · <a href="{js}">JSON</a></div>'
          f'<div class="sel"></div><table>{rows}</table></figcaption></figure>')


def render(records: Sequence[dict], failures: Sequence[dict], findings: Sequence[str], *, model: str,
           csv_name: str, errors_name: str) -> str:
  """The page. `records`: one per interpreted image, with `name`, `overlay`, `json` (paths relative
  to the page), `width`, `height` and `image_findings` {finding: probability}; `failures`: `name`
  and `reason` per file that could not be read."""
  options = '<option value="-1">top finding</option>' + "".join(
      f'<option value="{i}">{html.escape(f)}</option>' for i, f in enumerate(findings))
  failed = ""
  if failures:
    rows = "".join(f'<tr><td>{html.escape(f["name"])}</td><td>{html.escape(f["reason"])}</td></tr>'
                   for f in failures)
    failed = (f'<h2 id="failed-files">Files not interpreted ({len(failures)})</h2>'
              f'<table id="failed"><tr><th>file</th><th>reason</th></tr>{rows}</table>')
  names_json = json.dumps(list(findings)).replace("<", "\\u003c")  # no "</script>" inside the script
  failed_note = (f' · <a href="#failed-files">{len(failures)} file(s) could not be read</a>'
                 if failures else "")
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Batch interpretation: {len(records)} images</title>
<style>{_STYLE}</style></head>
<body>
<h1>Batch interpretation: {len(records)} images</h1>
<p>Model: <code>{html.escape(model)}</code> · table: <a href="{_url(csv_name)}">{html.escape(csv_name)}</a>
 · unreadable files: <a href="{_url(errors_name)}">{html.escape(errors_name)}</a>{failed_note}</p>
<p class="note">Each overlay outlines the model's 29 anatomy boxes; the three regions with the highest
finding probability are drawn thick and labelled. Research use only: not for diagnosis.</p>
<div id="controls">
<label>Finding <select id="finding">{options}</select></label>
<label>Sort <select id="order"><option value="desc">highest first</option>
<option value="asc">lowest first</option><option value="name">file name</option></select></label>
<label>Minimum probability <input id="min" type="range" min="0" max="1" step="0.01" value="0">
<span id="minval">0.00</span></label>
<label>File name contains <input id="query" type="search"></label>
<span id="count"></span>
</div>
<div id="grid">
{chr(10).join(_card(r, findings) for r in records)}
</div>
{failed}
<script type="application/json" id="findings">{names_json}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
