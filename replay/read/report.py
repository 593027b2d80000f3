"""`replay report`: PNG plots and one self-contained HTML page (images inline, numbers as tables).

Reads only the store's views (eval_passk, rounds, groups, samples, rescues, learn_metrics). Each
section is built from plain rows by a pure function; a section whose data is missing carries a
note instead of a figure, so a young or empty store still gets a page, never an exception.
"""

from __future__ import annotations

import base64
import html
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from schemas import BASE_ROUND

from . import plots, report_negatives
from ..errors import ReplayError
from ..storage import resolve
from ..store import Store, atomic_write_bytes, utc_now

QUERIES = {
    "eval": "SELECT round, adapter_name, dataset, k, pass_at_k, n_prompts, n_samples FROM eval_passk "
            "WHERE group_by = 'all' ORDER BY round, adapter_name, dataset, k",
    "rounds": "SELECT * FROM rounds ORDER BY round",
    "wrong": "SELECT s.round, g.kind, s.confidence FROM samples s JOIN groups g "
             "ON g.round = s.round AND g.prompt_id = s.prompt_id "
             "WHERE s.correct = false AND g.kind IN ('negative', 'mixed') AND s.confidence IS NOT NULL",
    "rescues": "SELECT prompt_id, negative_round, rescued_round, rescued_kind, rescued_pass_rate, problem "
               "FROM rescues ORDER BY rescued_round, negative_round, prompt_id",
    "learn": "SELECT round, adapter_name, objective, step, loss, clip_frac, nonzero_adv_share, grad_norm, tokens, "
             "grad_share_negative, grad_share_mixed, replayed_rows, replay_ess, behaviour_weight_mean, "
             "behaviour_weight_max, behaviour_truncated_share, behaviour_masked_share "
             "FROM learn_metrics ORDER BY round, adapter_name, step",
    "rescue_eval": "SELECT round, adapter_name, prompt_set_id, prompt_set_sql, n_prompts, n_samples, k, pass_at_k, "
                   "solved_share FROM rescue_eval ORDER BY prompt_set_id, round, adapter_name, k",
    "hints": "SELECT * FROM hint_outcomes",
    # every generated row, hint sets' too (the rounds view, from group_summary, leaves those out)
    "generated": "SELECT round, CAST(sum(num_completion_tokens) AS BIGINT) AS tokens FROM rollouts GROUP BY round",
    "negatives": report_negatives.QUERY,
    "negative_totals": report_negatives.TOTALS,
}
MAX_TABLE_ROWS = 50


@dataclass
class Section:
    slug: str
    title: str
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (file stem, PNG bytes)
    note: str | None = None  # why a figure is missing, or how to read it
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    html: str | None = None  # a body of its own (already escaped), after the figures and the table


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _scored(rounds: list[dict]) -> list[dict]:
    return [r for r in rounds if r["negative_groups"] + r["mixed_groups"] + r["positive_groups"] > 0]


def passk_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per (store, round, adapter, dataset), one column per k."""
    ks = sorted({r["k"] for r in rows})
    pivot: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        key = (r["store"], r["round"], r["adapter_name"], r["dataset"], r["n_prompts"], r["n_samples"])
        pivot[key][r["k"]] = r["pass_at_k"]
    many = len({r["store"] for r in rows}) > 1
    columns = (["store"] if many else []) + ["round", "adapter", "dataset", "prompts", "samples/prompt"]
    body = [([key[0]] if many else []) + [plots.round_label(key[1]), *map(str, key[2:])]
            + [_num(values.get(k)) for k in ks] for key, values in pivot.items()]
    return columns + [f"pass@{k}" for k in ks], body


def passk_section(rows: list[dict]) -> Section:
    s = Section("passk_by_round", "pass@k by round")
    if not rows:
        s.note = "No evaluation yet: run `replay eval` (round -1 evaluates the base model)."
        return s
    s.figures = [(s.slug, plots.to_png(plots.passk_lines(plots.passk_series(rows), "pass@k by round")))]
    s.note = "Round R is the policy after learning round R; “base” is the base model."
    s.columns, s.rows = passk_table(rows)
    return s


def adapters_section(rows: list[dict], learn: list[dict]) -> Section:
    """Grouped bars adapter × k at the latest round where several adapters were evaluated."""
    s = Section("passk_by_adapter", "pass@k by adapter (objective)")
    per_round = defaultdict(set)
    for r in rows:
        if r["round"] != BASE_ROUND:
            per_round[r["round"]].add(r["adapter_name"])
    several = [rnd for rnd, names in per_round.items() if len(names) > 1]
    if not several:
        s.note = ("Only one adapter evaluated per round: train side adapters on the same data with "
                  "`replay learn --adapter-name NAME --objective OBJ` and evaluate them to compare here.")
        return s
    rnd = max(several)
    chosen = [r for r in rows if r["round"] in (rnd, BASE_ROUND)]
    datasets = len({r["dataset"] for r in chosen}) > 1
    objective = {(r["round"], r["adapter_name"]): f" ({r['objective']})" for r in learn
                 if r["objective"] != r["adapter_name"]}
    entries = [(r["adapter_name"] + objective.get((r["round"], r["adapter_name"]), "")
                + (f" · {r['dataset']}" if datasets else ""), r["k"], r["pass_at_k"], r["n_prompts"])
               for r in sorted(chosen, key=lambda r: (r["round"], r["adapter_name"]))]
    fig = plots.grouped_bars(entries, f"pass@k by adapter, round {rnd}", "adapter (objective)")
    s.figures = [(s.slug, plots.to_png(fig))]
    s.columns, s.rows = passk_table(chosen)
    return s


def shares_section(rounds: list[dict]) -> Section:
    s = Section("group_shares", "Negative / mixed / positive groups per round")
    scored = _scored(rounds)
    if not scored:
        s.note = "No scored rollouts yet: run `replay generate` then `replay score`."
        return s
    s.figures = [(s.slug, plots.to_png(plots.group_shares(scored)))]
    s.note = "Negative: every sample wrong (zero GRPO advantage); positive: every sample right."
    s.columns = ["round", "policy", "prompts", "scored", "accuracy", "negative", "mixed", "positive",
                 "negative share", "mixed share", "positive share"]
    for r in scored:
        total = r["negative_groups"] + r["mixed_groups"] + r["positive_groups"]
        s.rows.append([str(r["round"]), "base" if r["policy_round"] is None else f"round {r['policy_round']}",
                       str(r["prompts"]), str(r["scored"]), _pct(r["accuracy"]), str(r["negative_groups"]),
                       str(r["mixed_groups"]), str(r["positive_groups"]), _pct(r["negative_groups"] / total),
                       _pct(r["mixed_groups"] / total), _pct(r["positive_groups"] / total)])
    return s


def rescues_section(rounds: list[dict], rescues: list[dict]) -> Section:
    s = Section("rescues", "Rescues per round")
    scored = _scored(rounds)
    if not scored:
        s.note = "No scored rollouts yet."
        return s
    s.figures = [(s.slug, plots.to_png(plots.rescue_bars(scored)))]
    s.note = (f"A rescue is a prompt negative in one round and not negative in a later one, counted at the first "
              f"such round. {len({r['prompt_id'] for r in rescues})} prompt(s) rescued; the table has one row per "
              f"negative round" + (f" (the first {MAX_TABLE_ROWS} rows)." if len(rescues) > MAX_TABLE_ROWS else "."))
    s.columns = ["prompt", "negative in round", "rescued in round", "then", "pass rate", "problem"]
    s.rows = [[r["prompt_id"][:12], str(r["negative_round"]), str(r["rescued_round"]), r["rescued_kind"],
               _pct(r["rescued_pass_rate"]), _short(r["problem"])] for r in rescues[:MAX_TABLE_ROWS]]
    return s


def hints_section(rows: list[dict]) -> Section:
    s = Section("hints", "Hint sets")
    if not rows:
        s.note = "No hint sets: `replay generate --prompts SQL --hint prefix:F|answer|ladder` makes them."
        return s
    s.note = ("Negative prompts re-sampled with a hint: how many each hint solved, and how many the next "
              "round solved without it (its own samples of the plain prompt).")
    s.columns = ["round", "hint", "prompts tried", "solved with the hint", "sampled next round",
                 "solved next round without it"]
    s.rows = [[str(r["round"]), r["hint_kind"] + (f" {r['hint_fraction']:g}" if r["hint_fraction"] is not None else ""),
               str(r["prompts_tried"]), str(r["solved_with_hint"]), str(r["sampled_next_round"]),
               str(r["solved_next_round_without_hint"])] for r in rows]
    return s


def _short(text: str | None, width: int = 90) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def rescue_eval_section(rows: list[dict]) -> Section:
    """Per prompt set chosen by SQL: how much of it each evaluated policy now solves."""
    s = Section("rescue_eval", "Rescue rate on SQL-chosen prompt sets")
    if not rows:
        s.note = ("No prompt set evaluated yet: `replay eval --prompts \"select prompt_id from negative_groups "
                  "where round = 0\"` measures how many once-negative prompts each policy now solves.")
        return s
    many_sets = len({r["prompt_set_id"] for r in rows}) > 1
    entries = [(f"{'base' if r['round'] == BASE_ROUND else r['adapter_name'] + ' r' + str(r['round'])}"
                + (f" · {r['prompt_set_id']}" if many_sets else ""), r["k"], r["pass_at_k"], r["n_prompts"]) for r in rows]
    s.figures = [(s.slug, plots.to_png(plots.grouped_bars(entries, "pass@k on the prompt set", "policy")))]
    s.note = ("solved: the share of the set's prompts solved at least once in n samples (pass@n); pass@k is the "
              "unbiased estimate. Sets: " + "; ".join(sorted({f"{r['prompt_set_id']} = {r['prompt_set_sql']}"
                                                           for r in rows})))
    s.columns = ["prompt set", "round", "adapter", "prompts", "samples/prompt", "solved", "pass@1"]
    for r in rows:
        if r["k"] == 1:
            s.rows.append([r["prompt_set_id"], plots.round_label(r["round"]), r["adapter_name"], str(r["n_prompts"]),
                           str(r["n_samples"]), _pct(r["solved_share"]), _num(r["pass_at_k"])])
    return s


def confidence_section(wrong: list[dict]) -> Section:
    s = Section("wrong_confidence", "Confidence of wrong answers: negative vs mixed groups")
    if not wrong:
        s.note = "No wrong answers in negative or mixed groups yet."
        return s
    latest = max(r["round"] for r in wrong)
    scopes = [("all rounds", wrong, s.slug)]
    if len({r["round"] for r in wrong}) > 1:
        scopes.append((f"round {latest}", [r for r in wrong if r["round"] == latest], f"{s.slug}_latest"))
    for scope, rows, stem in scopes:
        values = {kind: [r["confidence"] for r in rows if r["kind"] == kind] for kind in ("negative", "mixed")}
        fig = plots.confidence_hist(values, f"Confidence of wrong answers, {scope}")
        s.figures.append((stem, plots.to_png(fig)))
    s.note = ("Confidence = exp(mean token logprob). LENS penalises confident mistakes of negative groups "
              "more than unsure ones.")
    s.columns = ["round", "group kind", "wrong answers", "mean", "median", "max"]
    cells = defaultdict(list)
    for r in wrong:
        cells[(r["round"], r["kind"])].append(r["confidence"])
    s.rows = [[str(rnd), kind, str(len(v)), _num(statistics.fmean(v)), _num(statistics.median(v)), _num(max(v))]
              for (rnd, kind), v in sorted(cells.items())]
    return s


def learn_section(rows: list[dict]) -> Section:
    s = Section("learn_metrics", "Learn metrics per step")
    if not rows:
        s.note = "No learn metrics yet: run `replay learn`."
        return s
    s.figures = [(s.slug, plots.to_png(plots.learn_panels(rows)))]
    replayed = [r for r in rows if r.get("replayed_rows")]
    if replayed:  # learn --rescue replay: the replayed rows and their behaviour weights, per step
        runs_with = {(r["round"], r["adapter_name"]) for r in replayed}
        s.figures.append((f"{s.slug}-replay", plots.to_png(plots.learn_panels(
            [r for r in rows if (r["round"], r["adapter_name"]) in runs_with], plots.REPLAY_PANELS,
            "Replayed rows per optimizer step (learn --rescue replay)"))))
    s.columns = ["round", "adapter", "objective", "steps", "first loss", "last loss", "mean clip fraction",
                 "mean non-zero-advantage share", "max grad norm"]
    runs = defaultdict(list)
    for r in rows:
        runs[(r["round"], r["adapter_name"], r["objective"])].append(r)
    for (rnd, adapter, objective), run in sorted(runs.items()):
        run.sort(key=lambda r: r["step"])
        s.rows.append([str(rnd), adapter, objective, str(len(run)), _num(run[0]["loss"], 4), _num(run[-1]["loss"], 4),
                       _num(statistics.fmean(r["clip_frac"] for r in run)),
                       _pct(statistics.fmean(r["nonzero_adv_share"] for r in run)),
                       _num(max(r["grad_norm"] for r in run))])
    return s


def negatives_section(rows: list[dict], totals: list[dict]) -> Section:
    s = Section("negative_groups", "Negative groups: browse every sample")
    if not rows:
        s.note = "No negative groups: no scored round has a prompt whose samples were all wrong."
        return s
    s.html = report_negatives.browser_html(rows, {t["round"]: t["n"] for t in totals})
    return s


def compare_sections(stores: list[tuple[str, dict]]) -> list[Section]:
    """pass@k and negative-group share across stores (e.g. one store per objective)."""
    evals = [r for _, data in stores for r in data["eval"]]
    names = " vs ".join(label for label, _ in stores)
    lines = Section("compare_passk", "Across stores: pass@k by round")
    finals = Section("compare_final_passk", "Across stores: latest pass@k")
    if evals:
        lines.figures = [(lines.slug, plots.to_png(plots.passk_lines(plots.passk_series(evals),
                                                                      f"pass@k by round: {names}")))]
        chosen = plots.latest_passk(evals)
        entries = [(f"base ({r['store']})" if r["round"] == BASE_ROUND else f"{r['store']} · "
                    f"{r['adapter_name']} (round {r['round']})", r["k"], r["pass_at_k"], r["n_prompts"]) for r in chosen]
        finals.figures = [(finals.slug, plots.to_png(plots.grouped_bars(entries, f"Latest pass@k: {names}")))]
        finals.columns, finals.rows = passk_table(chosen)
    else:
        lines.note = finals.note = "None of the stores has an evaluation yet: run `replay eval` in each."
    shares = Section("compare_negative_share", "Across stores: negative-group share per round")
    series = {label: [(r["round"], r["negative_share"]) for r in _scored(data["rounds"])] for label, data in stores}
    series = {label: points for label, points in series.items() if points}
    if series:
        shares.figures = [(shares.slug, plots.to_png(plots.round_lines(
            series, f"Negative-group share per round: {names}", "negative share")))]
        shares.columns = ["store", "round", "accuracy", "negative share", "rescued"]
        shares.rows = [[label, str(r["round"]), _pct(r["accuracy"]), _pct(r["negative_share"]), str(r["rescued"])]
                       for label, data in stores for r in _scored(data["rounds"])]
    else:
        shares.note = "None of the stores has scored rollouts yet."
    return [lines, finals, shares]


ARM_STORE = re.compile(r"(?P<arm>.+)-s(?P<seed>\d+)")  # examples/rescue_tournament.sh: <arm>-s<seed>


def arms_sections(stores: list[tuple[str, dict]]) -> list[Section]:
    """Stores labelled <arm>-s<seed> (one per arm and seed, as examples/rescue_tournament.sh makes
    them), side by side per arm: per round the seeds' mean and range of held-out pass@1 (adapter
    main), negative groups left, generated tokens and trained tokens. Nothing unless two arms."""
    by_arm: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for label, data in stores:
        if m := ARM_STORE.fullmatch(label.rsplit("/", 1)[-1]):
            by_arm[m["arm"]].append((int(m["seed"]), data))
    if len(by_arm) < 2:
        return []
    evals = [r for seeds in by_arm.values() for _, d in seeds for r in d["eval"]
             if r["k"] == 1 and r["adapter_name"] == "main" and r["round"] != BASE_ROUND
             and not r["dataset"].startswith("prompts:")]
    dataset = statistics.mode([r["dataset"] for r in evals]) if evals else None

    def measures(data: dict) -> dict[str, dict[int, float]]:
        trained: dict[int, float] = defaultdict(float)
        for r in data["learn"]:
            if r["adapter_name"] == "main" and r.get("tokens") is not None:
                trained[r["round"]] += r["tokens"]
        return {
            "pass1": {r["round"]: r["pass_at_k"] for r in data["eval"] if r["k"] == 1 and r["dataset"] == dataset
                      and r["adapter_name"] == "main" and r["round"] != BASE_ROUND},
            "negative": {r["round"]: r["negative_groups"] for r in _scored(data["rounds"])},
            "generated": {r["round"]: r["tokens"] for r in data["generated"] if r["tokens"] is not None},
            "trained": dict(trained),
        }

    spread: dict[str, dict[str, dict[int, list[float]]]] = {}  # measure -> arm -> round -> the seeds' values
    seeds_of = {}
    for arm, seeds in sorted(by_arm.items()):
        seeds_of[arm] = sorted(seed for seed, _ in seeds)
        for _, data in seeds:
            for key, values in measures(data).items():
                for rnd, value in values.items():
                    spread.setdefault(key, {}).setdefault(arm, defaultdict(list))[rnd].append(value)

    def points(key: str) -> dict[str, list[tuple[int, float, float, float]]]:
        return {arm: [(rnd, statistics.fmean(v), min(v), max(v)) for rnd, v in sorted(rounds.items())]
                for arm, rounds in spread.get(key, {}).items()}

    s = Section("compare_arms", "Across stores: arms (seeds pooled)")
    names = {"pass1": f"held-out pass@1 ({dataset})" if dataset else "held-out pass@1 (no evaluation yet)",
             "negative": "negative groups left", "generated": "generated tokens", "trained": "trained tokens"}
    panels = [(names[key], points(key)) for key in names]
    s.figures = [(s.slug, plots.to_png(plots.arm_panels(panels, "Arms by round: mean over seeds, bar = range")))]
    s.note = ("Stores named <arm>-s<seed>, one per arm and seed; each point is the seeds' mean, each bar their "
              "lowest to highest value. Seeds: " + "; ".join(f"{arm} {', '.join(map(str, seeds))}"
                                                           for arm, seeds in seeds_of.items()) + ".")

    def cell(key: str, arm: str, rnd: int, fmt: str) -> str:
        values = spread.get(key, {}).get(arm, {}).get(rnd)
        if not values:
            return "–"
        mean = format(statistics.fmean(values), fmt)
        return mean if len(values) == 1 else f"{mean} [{format(min(values), fmt)}, {format(max(values), fmt)}]"

    s.columns = ["arm", "seeds", "round", "held-out pass@1", "negative groups", "generated tokens", "trained tokens"]
    for arm in sorted(by_arm):
        rounds = sorted({rnd for key in spread for rnd in spread[key].get(arm, {})})
        s.rows += [[arm, str(len(seeds_of[arm])), plots.round_label(rnd), cell("pass1", arm, rnd, ".3f"),
                    cell("negative", arm, rnd, ".1f"), cell("generated", arm, rnd, ".0f"),
                    cell("trained", arm, rnd, ".0f")] for rnd in rounds]
    return [s]


def store_labels(paths: list[Path]) -> list[str]:
    """Directory names; parent/name where two stores share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def render_html(title: str, facts: list[tuple[str, str]], sections: list[Section], banner: str | None) -> str:
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style>"
           f"</head><body><h1>{esc(title)}</h1>",
           "<table class='facts'>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
           + "</table>"]
    if banner:
        out.append(f"<p class='banner'>{esc(banner)}</p>")
    out.append("<ul class='toc'>" + "".join(f"<li><a href='#{s.slug}'>{esc(s.title)}</a></li>" for s in sections)
               + "</ul>")
    for s in sections:
        out.append(f"<section id='{s.slug}'><h2>{esc(s.title)}</h2>")
        if s.note:
            out.append(f"<p class='note'>{esc(s.note)}</p>")
        for stem, png in s.figures:
            data = base64.b64encode(png).decode("ascii")
            out.append(f"<img alt='{esc(stem)}' src='data:image/png;base64,{data}'>")
        if s.columns:
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in s.columns) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in s.rows)
                       + "</table>")
        if s.html:
            out.append(s.html)
        out.append("</section>")
    out.append(f"<script>{report_negatives.SORT_JS}</script></body></html>")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;margin:0.5em 0 1.5em;"
        "font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "table.facts th,table.facts td{text-align:left}.note{color:#555}"
        ".banner{background:#fff3cd;border:1px solid #e0c060;padding:0.8em}section{margin-top:2em}"
        + report_negatives.CSS)


def _load(store: Store, label: str) -> dict[str, list[dict]]:
    con = store.connect()  # one connection for all queries: registering the views is the slow part
    try:
        data = {name: con.sql(sql).to_arrow_table().to_pylist() for name, sql in QUERIES.items()}
    except duckdb.Error as exc:  # a corrupt shard: one line, as for every other query of the store
        raise store.query_error(exc) from None
    finally:
        con.close()
    for r in data["eval"]:
        r["store"] = label
    return data


def write_report(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                 compare: tuple[str | os.PathLike, ...] | list = ()) -> list[Path]:
    """Write <out_dir>/*.png and <out_dir>/index.html; returns the written paths (PNGs first)."""
    paths = [resolve(p) for p in (store_path, *compare)]  # directories or s3:// stores
    opened = [Store.open(p) for p in paths]
    out = Path(out_dir)
    for store in opened:  # only stages write into a store: not the page, nor over its files
        store.refuse_inside(out, "--out")
    if out.exists() and not out.is_dir():
        raise ReplayError(f"cannot write the report to {out}: not a directory")
    if not out.is_dir() and not out.parent.is_dir():
        raise ReplayError(f"cannot write the report to {out}: directory {out.parent} does not exist; create it first")
    stores = [(label, _load(store, label)) for label, store in zip(store_labels(paths), opened)]
    label, data = stores[0]
    sections = [passk_section(data["eval"]), adapters_section(data["eval"], data["learn"]),
                shares_section(data["rounds"]), rescues_section(data["rounds"], data["rescues"]),
                rescue_eval_section(data["rescue_eval"]), hints_section(data["hints"]),
                confidence_section(data["wrong"]), learn_section(data["learn"]),
                negatives_section(data["negatives"], data["negative_totals"])]
    sections += compare_sections(stores) + arms_sections(stores) if len(stores) > 1 else []
    facts = [("store", str(opened[0].root)), ("base model", str(opened[0].meta.get("base_model"))),
             ("rounds", ", ".join(str(r["round"]) for r in data["rounds"]) or "none"),
             ("rollouts", str(sum(r["rollouts"] for r in data["rounds"]))),
             ("compared with", ", ".join(lbl for lbl, _ in stores[1:]) or "–"),
             ("generated", utc_now().strftime("%Y-%m-%d %H:%M UTC"))]
    empty = not (data["rounds"] or data["eval"] or data["learn"])
    banner = "This store is empty: no rollouts, evaluations or learn metrics yet." if empty else None
    files = [(out / f"{stem}.png", png) for section in sections for stem, png in section.figures]
    files.append((out / "index.html", render_html(f"replay report: {label}", facts, sections, banner).encode()))
    try:
        for path, payload in files:
            atomic_write_bytes(path, payload)  # creates out_dir (its parent exists)
    except OSError as exc:
        raise ReplayError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return [path for path, _ in files]
