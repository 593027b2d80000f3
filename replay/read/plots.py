"""Figures of `replay report`: rows (lists of dicts read from the store's views) in, Figures out.

Built on matplotlib's object API (Figure + the Agg canvas), never pyplot: no global state, no GUI
backend, nothing to close, safe to call from any thread.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from schemas import BASE_ROUND

SIZE = (8, 4.5)
DPI = 110
KINDS = ("negative", "mixed", "positive")
KIND_COLORS = {"negative": "#d62728", "mixed": "#ff9f1c", "positive": "#2ca02c"}
STYLES = ("-", "--", ":", "-.")
LEARN_PANELS = (("loss", "loss"), ("clip_frac", "clip fraction"),
                ("nonzero_adv_share", "share of samples with non-zero advantage"), ("grad_norm", "grad norm"),
                ("grad_share_negative", "share of the step's Σ|w·A| from negative groups"),
                ("grad_share_mixed", "share of the step's Σ|w·A| from mixed groups"))
# learn --rescue replay: the replayed rows of each step and their behaviour weights π_θold/μ
REPLAY_PANELS = (("replayed_rows", "replayed rows"), ("replay_ess", "effective sample size of replayed rows"),
                 ("behaviour_weight_mean", "mean behaviour weight (per token)"),
                 ("behaviour_weight_max", "max behaviour weight"),
                 ("behaviour_truncated_share", "share of replayed tokens truncated (tis)"),
                 ("behaviour_masked_share", "share of replayed rows masked (seq-mask)"))
SHARE_PANELS = ("nonzero_adv_share", "grad_share_negative", "grad_share_mixed", "behaviour_truncated_share",
                "behaviour_masked_share")


def round_label(round: int) -> str:
    return "base" if round == BASE_ROUND else str(round)


def to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _axes(title: str, xlabel: str, ylabel: str, size=SIZE):
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _round_ticks(ax, rounds) -> None:
    rounds = sorted(set(rounds))
    ax.set_xticks(rounds, [round_label(r) for r in rounds])


def _colors(n: int) -> list:
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    return [matplotlib.colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _legend_right(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def passk_series(rows: list[dict]) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """{(series label, k): sorted [(round, pass@k)]} from eval rows (store, adapter_name, dataset, k, ...).

    The base model (round -1) is every adapter's starting point: its value starts each adapter's
    line of the same store and dataset. A label names only what varies between the rows.
    """
    base = {(r["store"], r["dataset"], r["k"]): r["pass_at_k"] for r in rows if r["round"] == BASE_ROUND}
    trained = [r for r in rows if r["round"] != BASE_ROUND]
    n_stores = len({r["store"] for r in rows})
    n_datasets = len({r["dataset"] for r in rows})
    n_adapters = len({r["adapter_name"] for r in trained})

    def label(store: str, adapter: str, dataset: str) -> str:
        parts = [store] if n_stores > 1 else []
        parts += [adapter] if n_adapters > 1 or adapter == "base" else []
        parts += [dataset] if n_datasets > 1 else []
        return " · ".join(parts)

    series: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in trained:
        points = series[(label(r["store"], r["adapter_name"], r["dataset"]), r["k"])]
        points[r["round"]] = r["pass_at_k"]
        if (r["store"], r["dataset"], r["k"]) in base:
            points[BASE_ROUND] = base[(r["store"], r["dataset"], r["k"])]
    covered = {(r["store"], r["dataset"], r["k"]) for r in trained}
    for (store, dataset, k), value in base.items():
        if (store, dataset, k) not in covered:  # only the base model was evaluated there
            series[(label(store, "base", dataset), k)][BASE_ROUND] = value
    return {key: sorted(points.items()) for key, points in sorted(series.items())}


def latest_passk(rows: list[dict]) -> list[dict]:
    """The base model's rows (of the first store that has them: stores compared share a base model),
    then each (store, adapter, dataset)'s rows at its latest evaluated round."""
    latest: dict[tuple, int] = {}
    for r in rows:
        key = (r["store"], r["adapter_name"], r["dataset"])
        latest[key] = max(latest.get(key, r["round"]), r["round"])
    base_store = next((r["store"] for r in rows if r["round"] == BASE_ROUND), None)
    return ([r for r in rows if r["round"] == BASE_ROUND and r["store"] == base_store]
            + [r for r in rows if r["round"] != BASE_ROUND
               and latest[(r["store"], r["adapter_name"], r["dataset"])] == r["round"]])


def shown_ks(ks, most: int = 4) -> list[int]:
    """At most `most` of the sorted ks, evenly spread, always the first and the last (tables keep all)."""
    ks = sorted(set(ks))
    return ks if len(ks) <= most else [ks[int(i)] for i in np.linspace(0, len(ks) - 1, most).round()]


def passk_lines(series: dict[tuple[str, int], list[tuple[int, float]]], title: str) -> Figure:
    """Small multiples: one panel per k (at most four, `shown_ks`), one line and colour per policy,
    the same colour in every panel and a shared y axis, so panels compare at a glance."""
    ks = shown_ks(k for _, k in series)
    labels = sorted({label for label, k in series if k in ks})
    colors = dict(zip(labels, _colors(len(labels))))
    fig = Figure(figsize=(2.2 + 3.2 * len(ks), 4), dpi=DPI, layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    for ax, k in zip(axes, ks):
        ax.set_title(f"pass@{k}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        for label in labels:
            if points := series.get((label, k)):
                rounds, values = zip(*points)
                ax.plot(rounds, values, marker="o", color=colors[label], label=label)
        _round_ticks(ax, [r for (_, key_k), points in series.items() if key_k == k for r, _ in points])
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("pass@k (policy after learning that round)")
    if any(labels):  # one unnamed policy needs no legend
        _legend_right(axes[-1])
    return fig


def passk_halfwidth(p: float, n_prompts: int) -> float:
    """Half-width of a 95% interval for a mean of per-prompt pass@k values in [0, 1]: their variance
    is at most p(1-p), so 1.96·sqrt(p(1-p)/n) bounds the normal interval from above."""
    return 1.96 * float(np.sqrt(max(p * (1 - p), 0.0) / n_prompts)) if n_prompts else 0.0


def grouped_bars(entries: list[tuple], title: str, xlabel: str = "") -> Figure:
    """Bars of (group, k, pass@k[, prompts]): one cluster per group (adapter or store), one bar per k.
    With the prompt count, each bar gets its 95% interval and each group its count."""
    ks = shown_ks(e[1] for e in entries)
    entries = [e for e in entries if e[1] in ks]
    groups = list(dict.fromkeys(e[0] for e in entries))
    prompts = {e[0]: e[3] for e in entries if len(e) > 3}
    fig, ax = _axes(title, xlabel, "pass@k")
    width = 0.8 / len(ks)
    colors = _colors(len(ks))
    for j, k in enumerate(ks):
        chosen = [e for e in entries if e[1] == k]
        xs = [groups.index(e[0]) + (j - (len(ks) - 1) / 2) * width for e in chosen]
        values = [e[2] for e in chosen]
        errors = [passk_halfwidth(e[2], e[3]) for e in chosen] if prompts else None
        bars = ax.bar(xs, values, width * 0.95, color=colors[j], label=f"pass@{k}", yerr=errors,
                      error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333"})
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=1)
    if prompts:
        groups_shown = [f"{g}\n{prompts[g]} prompts" if g in prompts else g for g in groups]
        ax.set_title(f"{title}\n(bars: 95% interval bound, 1.96·√(p(1−p)/prompts))", fontsize="medium")
    else:
        groups_shown = groups
    if len(groups) > 3:
        ax.set_xticks(range(len(groups)), groups_shown, rotation=20, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(groups)), groups_shown)
    ax.set_ylim(0, 1.15)
    ax.grid(axis="x", visible=False)
    _legend_right(ax)
    return fig


def group_shares(rounds: list[dict]) -> Figure:
    """Stacked bars: share of negative / mixed / positive groups per round."""
    fig, ax = _axes("Group kinds per round (share of prompts)", "round", "share of groups")
    totals = np.array([sum(r[f"{kind}_groups"] for kind in KINDS) for r in rounds], dtype=float)
    xs = [r["round"] for r in rounds]
    bottom = np.zeros(len(rounds))
    for kind in KINDS:
        share = np.array([r[f"{kind}_groups"] for r in rounds]) / totals
        bars = ax.bar(xs, share, 0.7, bottom=bottom, color=KIND_COLORS[kind], label=kind)
        ax.bar_label(bars, labels=[f"{s:.0%}" if s >= 0.06 else "" for s in share], label_type="center",
                     fontsize="small", color="white")
        bottom += share
    _round_ticks(ax, xs)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(axis="x", visible=False)
    _legend_right(ax)
    return fig


def rescue_bars(rounds: list[dict]) -> Figure:
    """Per round: negative groups, and prompts rescued (negative in an earlier round, not now)."""
    fig, ax = _axes("Negative groups and rescues per round", "round", "prompts")
    xs = np.array([r["round"] for r in rounds], dtype=float)
    for offset, key, color, label in ((-0.2, "negative_groups", KIND_COLORS["negative"], "negative groups"),
                                      (0.2, "rescued", "#1f77b4", "rescued (was negative before)")):
        bars = ax.bar(xs + offset, [r[key] for r in rounds], 0.38, color=color, label=label)
        ax.bar_label(bars, fontsize="small", padding=1)
    _round_ticks(ax, xs.astype(int))
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.margins(y=0.12)
    ax.grid(axis="x", visible=False)
    _legend_right(ax)
    return fig


def confidence_hist(values: dict[str, list[float]], title: str) -> Figure:
    """Histograms (density) of the confidence of wrong answers, one per group kind, with means."""
    fig, ax = _axes(title, "confidence exp(mean token logprob)", "density")
    bins = np.linspace(0, 1, 26)
    for kind, vals in values.items():
        color = KIND_COLORS[kind]
        if not vals:
            ax.plot([], [], color=color, label=f"no {kind} groups")
            continue
        ax.hist(vals, bins=bins, density=True, color=color, alpha=0.35)
        ax.hist(vals, bins=bins, density=True, histtype="step", color=color, linewidth=1.5,
                label=f"{kind} groups (n={len(vals)}, mean {np.mean(vals):.2f})")
        ax.axvline(float(np.mean(vals)), color=color, linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    _legend_right(ax)
    return fig


def round_lines(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str) -> Figure:
    """One line per label over rounds, for shares in [0, 1] (e.g. negative-group share per store)."""
    fig, ax = _axes(title, "round", ylabel)
    for (label, points), color in zip(sorted(series.items()), _colors(len(series))):
        rounds, values = zip(*sorted(points))
        ax.plot(rounds, values, marker="o", color=color, label=label)
    _round_ticks(ax, [r for points in series.values() for r, _ in points])
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    _legend_right(ax)
    return fig


def learn_panels(rows: list[dict], panels=LEARN_PANELS, title: str = "Learn metrics per optimizer step") -> Figure:
    """Six metrics per step (by default loss, clip fraction, non-zero-advantage share, grad norm and
    the share of each step's Σ|w·A| from negative and mixed groups); a line per (round, adapter)."""
    fig = Figure(figsize=(11, 9), dpi=DPI, layout="constrained")
    axes = fig.subplots(3, 2, sharex=True).ravel()
    runs: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in rows:
        runs[(r["round"], r["adapter_name"])].append(r)
    adapters = sorted({a for _, a in runs})
    colors = dict(zip(sorted(runs), _colors(len(runs))))  # a colour per run: adapters of one round differ
    few_steps = max(len(v) for v in runs.values()) <= 25
    for ax, (key, panel) in zip(axes, panels):
        for (rnd, adapter), run in sorted(runs.items()):
            run = sorted(run, key=lambda r: r["step"])
            objective = run[0].get("objective") or adapter
            suffix = f" ({objective})" if objective != adapter else ""
            values = [math.nan if r.get(key) is None else r[key] for r in run]  # NULL: older stores
            ax.plot([r["step"] for r in run], values, color=colors[(rnd, adapter)],
                    linestyle=STYLES[adapters.index(adapter) % len(STYLES)], marker="o" if few_steps else None,
                    markersize=3, label=f"round {rnd} · {adapter}{suffix}")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        if key in SHARE_PANELS:
            ax.set_ylim(-0.02, 1.02)
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    for ax in axes[4:]:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylabel(panels[0][0])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
    fig.suptitle(title)
    return fig


def arm_panels(panels: list[tuple[str, dict[str, list[tuple[int, float, float, float]]]]], title: str) -> Figure:
    """One panel per (title, {arm: [(round, mean, low, high)]}): per arm a line through the seeds' mean
    and a bar from their lowest to their highest value, the same colour for an arm in every panel."""
    arms = sorted({arm for _, series in panels for arm in series})
    colors = dict(zip(arms, _colors(len(arms))))
    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(11, 3.6 * rows), dpi=DPI, layout="constrained")
    fig.suptitle(title)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    offsets = {arm: (i - (len(arms) - 1) / 2) * 0.06 for i, arm in enumerate(arms)}  # bars side by side
    for ax, (panel, series) in zip(axes, panels):
        ax.set_title(panel, fontsize="medium")
        ax.grid(alpha=0.3)
        for arm, points in sorted(series.items()):
            points = sorted(points)
            xs = [r + offsets[arm] for r, *_ in points]
            means = [m for _, m, _, _ in points]
            spread = [[m - lo for _, m, lo, _ in points], [hi - m for _, m, _, hi in points]]
            ax.errorbar(xs, means, yerr=spread, marker="o", capsize=3, color=colors[arm], label=arm)
        shown = [r for points in series.values() for r, *_ in points]
        _round_ticks(ax, shown)
        if shown:
            ax.set_xlim(min(shown) - 0.5, max(shown) + 0.5)
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#777")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if arms:
        _legend_right(axes[min(columns, len(panels)) - 1])
    return fig
