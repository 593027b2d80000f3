"""The report's negative-group browser: every negative group of each round (the most confident
first, up to a cap per round) as a sortable table, each row linking to its samples — answer,
verdict, confidence and the completion itself. Plain HTML + a few lines of inline JavaScript:
the page stays one self-contained file that works without a network.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict

MAX_GROUPS_PER_ROUND = 100
MAX_COMPLETION_CHARS = 4000

# the most confident negative groups of each round, and all their samples
QUERY = f"""
WITH shown AS (
    SELECT round, prompt_id, mean_confidence FROM negative_groups
    QUALIFY row_number() OVER (PARTITION BY round ORDER BY mean_confidence DESC NULLS LAST, prompt_id)
            <= {MAX_GROUPS_PER_ROUND}
)
SELECT s.round, s.prompt_id, s.problem, s.gold_answer, s.level, s.sample_idx, s.extracted_answer, s.status,
       s.correct, s.confidence, s.finish_reason, s.num_completion_tokens,
       left(s.completion_text, {MAX_COMPLETION_CHARS}) AS completion_text,
       length(s.completion_text) > {MAX_COMPLETION_CHARS} AS cut
FROM samples s JOIN shown g ON g.round = s.round AND g.prompt_id = s.prompt_id
ORDER BY s.round, g.mean_confidence DESC NULLS LAST, s.prompt_id, s.sample_idx
"""
TOTALS = "SELECT round, count(*) AS n FROM negative_groups GROUP BY round ORDER BY round"

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      var key = function (row) {
        var cell = row.cells[col];
        var raw = (cell.hasAttribute('data-sort') ? cell.getAttribute('data-sort') : cell.textContent).trim();
        return /^-?[0-9]+([.][0-9]+)?(e-?[0-9]+)?$/i.test(raw) ? parseFloat(raw) : raw;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var order = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
        return asc ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    });
  });
});
"""

CSS = ("table.sortable th{cursor:pointer;user-select:none}table.sortable th[aria-sort=ascending]::after"
       "{content:' \\25B2'}table.sortable th[aria-sort=descending]::after{content:' \\25BC'}"
       ".group{border-top:1px solid #ddd;margin-top:1.2em}.group:target{background:#fffbe6}"
       "td.text{text-align:left;max-width:32em}pre{white-space:pre-wrap;margin:0;font-size:0.85em}")


def group_anchor(round: int, prompt_id: str) -> str:
    return f"neg-{int(round)}-{prompt_id}"


def _answers(samples: list[dict]) -> str:
    """The distinct extracted answers with counts, the most frequent first: "12 ×3, — ×1"."""
    counts = Counter(s["extracted_answer"] if s["extracted_answer"] not in (None, "") else "—" for s in samples)
    return ", ".join(f"{answer} ×{n}" for answer, n in counts.most_common())


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _short(text: str | None, width: int = 120) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def browser_html(rows: list[dict], totals: dict[int, int]) -> str:
    """The section body: one sortable index table, then one block of samples per group."""
    esc = html.escape
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["round"], r["prompt_id"])].append(r)
    shown = Counter(rnd for rnd, _ in groups)
    counts = "; ".join(f"round {rnd}: {shown[rnd]} of {n} shown" for rnd, n in sorted(totals.items()))
    out = [f"<p class='note'>Every sample of these prompts was wrong. The most confident groups first, at most "
           f"{MAX_GROUPS_PER_ROUND} per round ({esc(counts)}). Click a column to sort; click a prompt for its "
           f"samples. All of them: <code>replay sql \"select * from negative_groups\"</code>.</p>",
           "<table class='sortable' id='negative_index'><thead><tr><th>round</th><th>prompt</th><th>level</th>"
           "<th>problem</th><th>gold</th><th>answers given</th><th>mean confidence</th><th>max confidence</th>"
           "</tr></thead><tbody>"]
    for (rnd, pid), samples in groups.items():
        confidences = [s["confidence"] for s in samples if s["confidence"] is not None]
        mean = sum(confidences) / len(confidences) if confidences else None
        top = max(confidences) if confidences else None
        first = samples[0]
        out.append(f"<tr><td>{rnd}</td><td class='text'><a href='#{esc(group_anchor(rnd, pid))}'>{esc(pid[:12])}</a>"
                   f"</td><td>{esc('' if first['level'] is None else str(first['level']))}</td>"
                   f"<td class='text'>{esc(_short(first['problem']))}</td><td class='text'>"
                   f"{esc(_short(first['gold_answer'], 40))}</td><td class='text'>{esc(_short(_answers(samples)))}"
                   f"</td><td data-sort='{'' if mean is None else repr(mean)}'>{_num(mean)}</td>"
                   f"<td data-sort='{'' if top is None else repr(top)}'>{_num(top)}</td></tr>")
    out.append("</tbody></table>")
    for (rnd, pid), samples in groups.items():
        first = samples[0]
        out.append(f"<div class='group' id='{esc(group_anchor(rnd, pid))}'><h3>Round {rnd} · prompt {esc(pid)}</h3>"
                   f"<p><b>Problem:</b> {esc(first['problem'] or '')}<br><b>Gold:</b> {esc(first['gold_answer'] or '')}"
                   f" · <a href='#negative_index'>back to the list</a></p>"
                   "<table><tr><th>sample</th><th>answer</th><th>verdict</th><th>confidence</th><th>tokens</th>"
                   "<th>finish</th><th>completion</th></tr>")
        for s in samples:
            verdict = "correct" if s["correct"] else f"wrong ({s['status']})" if s["status"] != "ok" else "wrong"
            cut = " […]" if s["cut"] else ""
            out.append(f"<tr><td>{s['sample_idx']}</td><td class='text'>{esc(s['extracted_answer'] or '—')}</td>"
                       f"<td>{esc(verdict)}</td><td>{_num(s['confidence'])}</td><td>{s['num_completion_tokens']}</td>"
                       f"<td>{esc(s['finish_reason'] or '')}</td><td class='text'><details><summary>show</summary>"
                       f"<pre>{esc(s['completion_text'] or '')}{cut}</pre></details></td></tr>")
        out.append("</table></div>")
    return "\n".join(out)
