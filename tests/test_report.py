"""`replay report` on hand-built stores: valid PNGs, an HTML page with the images and the numbers."""

import base64
import re

import matplotlib.image
import pytest

from replay.read import plots
from replay.errors import ReplayError
from replay.read.report import passk_table, store_labels, write_report
from replay.store import Store
from tests._store_rows import NOW, prompt_row, rollout_row, verdict_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# 5 prompts x 4 samples; 1 = correct. Round 0: P0, P1 negative, P2, P3 mixed, P4 positive (negative share 40%).
# Round 1: P0 rescued (mixed), P1 still negative (20%). Round 2: P1 rescued, no negative group left.
OUTCOMES = {
    0: [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]],
    1: [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]],
    2: [[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]],
}
# pass@k of the evaluated policies: (round, adapter) -> {k: value}
PASSK = {(-1, "base"): {1: 0.25, 4: 0.5}, (0, "main"): {1: 0.375, 4: 0.625},
         (1, "main"): {1: 0.5, 4: 0.75}, (1, "grpo"): {1: 0.4375, 4: 0.6875}}


def eval_row(round, adapter, k, value):
    return dict(round=round, adapter_name=adapter, dataset="arith:test:16", group_by="all", group_value="all",
                k=k, pass_at_k=value, n_prompts=16, n_samples=4, created_at=NOW)


def metrics_row(round, adapter, objective, step):
    # GRPO gives negative and positive groups zero advantage: fewer samples carry a gradient
    share = 0.4 if objective == "grpo" else 0.8 + 0.05 * round
    return dict(round=round, adapter_name=adapter, objective=objective, step=step, epoch=0,
                loss=0.5 / (step + 1) + 0.1 * round + share / 10, clip_frac=0.02 * step * share, dual_clip_frac=0.0,
                ratio_mean=1.0, ratio_max=1.2, grad_norm=1.0 + 0.1 * step + share, tokens=512,
                nonzero_adv_share=share, negative_group_share=0.4, lr=1e-5, seconds=0.5,
                grad_share_negative=None if round == 0 else 0.1 * (objective != "grpo"),
                grad_share_mixed=None if round == 0 else 1 - 0.1 * (objective != "grpo"), grad_share_positive=0.0)


def build_store(path, outcomes=OUTCOMES, passk=PASSK, learn=True):
    store = Store.create(path, base_model="test-model")
    prompts = [prompt_row(f"What is {i} + {i}?", answer=str(2 * i), level=i % 3 + 1) for i in range(5)]
    store.write("prompts", prompts)
    for round, groups in outcomes.items():
        rollouts, verdicts = [], []
        for p, outcome in zip(prompts, groups):
            for idx, correct in enumerate(outcome):
                # wrong answers of negative groups are the more confident ones here
                lp = -0.1 - 0.2 * idx if sum(outcome) == 0 else -0.6 - 0.3 * idx
                rollouts.append(rollout_row(round, p["prompt_id"], idx, (lp, lp, lp),
                                            policy_round=round - 1 if round else None))
                verdicts.append(verdict_row(round, p["prompt_id"], idx, bool(correct)))
        store.write("rollouts", rollouts, round=round)
        store.write("verdicts", verdicts, round=round)
    for (round, adapter), values in passk.items():
        store.write("eval", [eval_row(round, adapter, k, v) for k, v in values.items()], round=round)
    if learn:
        for round, adapter, objective in ((0, "main", "lens"), (1, "main", "lens"), (1, "grpo", "grpo")):
            store.write("learn_metrics", [metrics_row(round, adapter, objective, s) for s in range(6)],
                        round=round, name=adapter)
    return store


GRPO_PASSK = {(-1, "base"): {1: 0.25, 4: 0.5}, (0, "main"): {1: 0.3125, 4: 0.5625}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report of a LENS store compared with a GRPO store that rescued nothing (rendering is slow)."""
    root = tmp_path_factory.mktemp("report")
    build_store(root / "lens")
    build_store(root / "grpo", outcomes={0: OUTCOMES[0], 1: OUTCOMES[0]}, passk=GRPO_PASSK, learn=False)
    paths = write_report(root / "lens", root / "out", compare=[root / "grpo"])
    return paths, (root / "out" / "index.html").read_text(encoding="utf-8")


def test_report_writes_valid_pngs(report):
    paths, _ = report
    pngs = [p for p in paths if p.suffix == ".png"]
    assert {p.stem for p in pngs} == {"passk_by_round", "passk_by_adapter", "group_shares", "rescues",
                                       "wrong_confidence", "wrong_confidence_latest", "learn_metrics",
                                       "compare_passk", "compare_final_passk", "compare_negative_share"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        height, width, channels = matplotlib.image.imread(png).shape
        assert height >= 300 and width >= 600 and channels in (3, 4)
    assert paths[-1].name == "index.html"


def test_html_embeds_every_image_and_the_numbers(report):
    paths, page = report
    for png in (p for p in paths if p.suffix == ".png"):
        assert base64.b64encode(png.read_bytes()).decode() in page
    assert page.count("data:image/png;base64,") == len(paths) - 1
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    shares = _table_rows(page, "group_shares")
    assert shares[0][:1] == ["0"] and shares[0][5:11] == ["2", "2", "1", "40.0%", "40.0%", "20.0%"]
    assert shares[1][8] == "20.0%" and shares[2][8] == "0.0%"
    passk = _table_rows(page, "passk_by_round")
    assert ["base", "base", "arith:test:16", "16", "4", "0.250", "0.500"] in passk
    assert ["1", "grpo", "arith:test:16", "16", "4", "0.438", "0.688"] in passk
    rescues = _table_rows(page, "rescues")
    assert sorted((r[1], r[2]) for r in rescues) == [("0", "1"), ("0", "2"), ("1", "2")]
    learn = _table_rows(page, "learn_metrics")
    assert [r[:4] for r in learn] == [["0", "main", "lens", "6"], ["1", "grpo", "grpo", "6"],
                                      ["1", "main", "lens", "6"]]
    assert learn[0][4:6] == ["0.5800", "0.1633"]  # first and last loss: 0.5/1 + 0.08, 0.5/6 + 0.08
    assert [r[7] for r in learn] == ["80.0%", "40.0%", "85.0%"]


def test_confidence_table_separates_negative_and_mixed(report):
    _, page = report
    rows = {(r[0], r[1]): r for r in _table_rows(page, "wrong_confidence")}
    assert rows[("0", "negative")][2] == "8" and rows[("0", "mixed")][2] == "5"
    assert ("2", "negative") not in rows and rows[("2", "mixed")][2] == "2"


def _table_rows(page: str, section: str) -> list[list[str]]:
    body = re.search(f"<section id='{section}'>(.*?)</section>", page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]  # skip the header
    return [re.findall(r"<td>(.*?)</td>", row) for row in rows]


def test_empty_store_gives_a_page_that_says_so(tmp_path):
    Store.create(tmp_path / "empty")
    paths = write_report(tmp_path / "empty", tmp_path / "out")
    assert paths == [tmp_path / "out" / "index.html"]
    page = paths[0].read_text()
    assert "This store is empty" in page and "No evaluation yet" in page and "<img" not in page


def test_unwritable_output_and_missing_compare_store_are_one_line_errors(tmp_path):
    Store.create(tmp_path / "s")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ReplayError, match="cannot write the report"):
        write_report(tmp_path / "s", tmp_path / "file")
    with pytest.raises(ReplayError, match="no replay store"):
        write_report(tmp_path / "s", tmp_path / "out", compare=[tmp_path / "nowhere"])


def test_store_without_eval_or_learn_skips_those_plots_with_a_note(tmp_path):
    build_store(tmp_path / "s", passk={}, learn=False)
    paths = write_report(tmp_path / "s", tmp_path / "out")
    assert {p.stem for p in paths} == {"group_shares", "rescues", "wrong_confidence", "wrong_confidence_latest",
                                       "index"}
    page = paths[-1].read_text()
    assert "No evaluation yet" in page and "No learn metrics yet" in page and "This store is empty" not in page


def test_compare_stores_are_labelled_by_directory(report):
    _, page = report
    finals = _table_rows(page, "compare_final_passk")
    assert ["grpo", "0", "main", "arith:test:16", "16", "4", "0.312", "0.562"] in finals
    # the base model once (both stores share it), then each store's adapters at their latest round
    assert [r[:3] for r in finals] == [["lens", "base", "base"], ["lens", "1", "grpo"], ["lens", "1", "main"],
                                       ["grpo", "0", "main"]]
    shares = {(r[0], r[1]): r[3] for r in _table_rows(page, "compare_negative_share")}
    assert shares[("grpo", "1")] == "40.0%" and shares[("lens", "1")] == "20.0%"


def test_passk_series_starts_every_adapter_at_the_base_model():
    rows = [dict(store="s", dataset="d", k=k, round=rnd, adapter_name=a, pass_at_k=v)
            for (rnd, a), values in PASSK.items() for k, v in values.items()]
    series = plots.passk_series(rows)
    assert series[("main", 1)] == [(-1, 0.25), (0, 0.375), (1, 0.5)]
    assert series[("grpo", 4)] == [(-1, 0.5), (1, 0.6875)]
    assert set(series) == {("main", 1), ("main", 4), ("grpo", 1), ("grpo", 4)}
    only_base = plots.passk_series([r for r in rows if r["round"] == -1])
    assert only_base == {("base", 1): [(-1, 0.25)], ("base", 4): [(-1, 0.5)]}


def test_latest_passk_keeps_one_base_and_each_adapters_last_round():
    rows = [dict(store=store, dataset="d", k=1, round=rnd, adapter_name=a, pass_at_k=0.1)
            for store, evals in (("x", PASSK), ("y", GRPO_PASSK)) for rnd, a in evals]
    assert [(r["store"], r["round"], r["adapter_name"]) for r in plots.latest_passk(rows)] == [
        ("x", -1, "base"), ("x", 1, "main"), ("x", 1, "grpo"), ("y", 0, "main")]


def test_plots_show_at_most_four_ks_spread_from_first_to_last():
    assert plots.shown_ks([4, 1, 2]) == [1, 2, 4]
    assert plots.shown_ks([1, 2, 4, 8, 16, 32, 64]) == [1, 4, 16, 64]
    assert plots.shown_ks([1, 2, 4, 8, 16]) == [1, 2, 8, 16]
    series = {(label, k): [(-1, 0.1), (0, 0.2)] for label in ("lens", "grpo") for k in (1, 2, 4, 8, 16, 32, 64)}
    fig = plots.passk_lines(series, "t")
    assert fig.get_suptitle() == "t"
    assert [ax.get_title() for ax in fig.axes] == ["pass@1", "pass@4", "pass@16", "pass@64"]  # one panel per k
    for ax in fig.axes:  # one line per policy, each policy the same colour in every panel
        assert sorted(line.get_label() for line in ax.get_lines()) == ["grpo", "lens"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "0"]
    colours = {(ax.get_title(), line.get_label()): line.get_color() for ax in fig.axes for line in ax.get_lines()}
    assert len({c for (_, label), c in colours.items() if label == "lens"}) == 1
    assert colours[("pass@1", "lens")] != colours[("pass@1", "grpo")]


def test_passk_table_pivots_k_into_columns():
    rows = [dict(store="s", dataset="d", k=k, round=0, adapter_name="main", pass_at_k=k / 8, n_prompts=3,
                 n_samples=8) for k in (1, 8)]
    columns, body = passk_table(rows)
    assert columns == ["round", "adapter", "dataset", "prompts", "samples/prompt", "pass@1", "pass@8"]
    assert body == [["0", "main", "d", "3", "8", "0.125", "1.000"]]


def test_store_labels_use_the_parent_when_names_clash(tmp_path):
    paths = [tmp_path / "a" / "store", tmp_path / "b" / "store", tmp_path / "lens"]
    assert store_labels(paths) == ["a/store", "b/store", "lens"]


def test_rescue_eval_section_from_rows():
    from replay.read.report import rescue_eval_section

    assert "replay eval --prompts" in rescue_eval_section([]).note
    rows = [dict(round=r, adapter_name=a, prompt_set_id="ps-1", prompt_set_sql="select 1", n_prompts=4,
                 n_samples=2, k=k, pass_at_k=p, solved_share=s)
            for r, a, s in ((-1, "base", 0.25), (0, "main", 0.5)) for k, p in ((1, s / 2), (2, s))]
    section = rescue_eval_section(rows)
    assert len(section.figures) == 1 and section.figures[0][1].startswith(b"\x89PNG")
    assert section.rows == [["ps-1", "base", "base", "4", "2", "25.0%", "0.125"],
                            ["ps-1", "0", "main", "4", "2", "50.0%", "0.250"]]
    assert "ps-1 = select 1" in section.note
def test_learn_panels_plot_the_gradient_share_and_leave_older_rounds_blank():
    rows = [metrics_row(r, "main", "lens", s) for r in (0, 1) for s in range(3)]
    fig = plots.learn_panels(rows)
    titles = [ax.get_title() for ax in fig.axes]
    negative = fig.axes[titles.index("share of the step's Σ|w·A| from negative groups")]
    lines = {line.get_label(): list(line.get_ydata()) for line in negative.get_lines()}
    assert all(v != v for v in lines["round 0 · main (lens)"])  # NaN: written before the column existed
    assert lines["round 1 · main (lens)"] == pytest.approx([0.1] * 3)


def test_learn_panels_give_each_adapter_of_a_round_its_own_colour():
    rows = [metrics_row(1, adapter, objective, s) for adapter, objective in (("main", "lens"), ("grpo", "grpo"))
            for s in range(3)]
    fig = plots.learn_panels(rows)
    colors = [line.get_color() for line in fig.axes[0].get_lines()]
    assert len(colors) == 2 and colors[0] != colors[1]


def test_adapter_bars_carry_intervals_and_prompt_counts():
    assert plots.passk_halfwidth(0.5, 16) == pytest.approx(0.245)  # 1.96 * sqrt(0.25 / 16)
    assert plots.passk_halfwidth(1.0, 16) == 0.0
    fig = plots.grouped_bars([("main", 1, 0.5, 16), ("grpo", 1, 0.25, 16)], "pass@k by adapter")
    ax = fig.axes[0]
    (bars,) = [c for c in ax.containers if hasattr(c, "errorbar")]
    segments = bars.errorbar.lines[2][0].get_segments()
    assert [round(float(s[1][1] - s[0][1]) / 2, 4) for s in segments] == [0.245, round(1.96 * (3 / 256) ** 0.5, 4)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["main\n16 prompts", "grpo\n16 prompts"]


def test_compare_plots_name_their_stores(monkeypatch, tmp_path):
    from replay.read import report as report_module

    titles = []
    monkeypatch.setattr(plots, "to_png", lambda fig: titles.append(fig.get_suptitle() or fig.axes[0].get_title()) or b"")
    data = {"eval": [dict(eval_row(0, "main", 1, 0.5), store=name) for name in ("lens", "grpo")],
            "rounds": [dict(round=0, negative_groups=1, mixed_groups=1, positive_groups=0, accuracy=0.2,
                            negative_share=0.5, rescued=0)]}
    report_module.compare_sections([("lens", data), ("grpo", data)])
    assert len(titles) == 3 and all("lens vs grpo" in t for t in titles), titles


def test_arms_side_by_side_pool_their_seeds(monkeypatch):
    """Stores named <arm>-s<seed> (examples/rescue_tournament.sh): per arm and round the seeds' mean and
    [lowest, highest] of held-out pass@1, negative groups, generated tokens (hint rows too) and trained
    tokens; nothing when the stores are not two arms or more."""
    from replay.read import report as report_module

    figures = []
    monkeypatch.setattr(plots, "to_png", lambda fig: figures.append(fig) or b"")

    def data(pass1, negatives, generated, trained):
        return {"eval": [eval_row(2, "main", 1, pass1), eval_row(2, "main", 2, 0.9), eval_row(-1, "base", 1, 0.1),
                         dict(eval_row(2, "main", 1, 0.99), dataset="prompts:ps-0")],
                "rounds": [dict(round=r, negative_groups=n, mixed_groups=1, positive_groups=0) for r, n in
                           enumerate(negatives)],
                "generated": [dict(round=r, tokens=t) for r, t in enumerate(generated)],
                "learn": [dict(round=r, adapter_name=a, tokens=t) for r, t in enumerate(trained)
                          for a in ("main", "side")]}

    stores = [("grpo-s0", data(0.25, [4, 3, 2], [100, 110, 120], [10, 20, 30])),
              ("grpo-s1", data(0.75, [4, 5, 4], [100, 130, 140], [10, 40, 50])),
              ("runs/hint-s0", data(0.5, [4, 2, 1], [100, 120, 120], [10, 30, 30])),
              ("notes", data(1.0, [0, 0, 0], [1, 1, 1], [1, 1, 1]))]  # not an arm: left out
    [section] = report_module.arms_sections(stores)
    assert section.columns == ["arm", "seeds", "round", "held-out pass@1", "negative groups", "generated tokens",
                               "trained tokens"]
    assert section.rows == [
        ["grpo", "2", "0", "–", "4.0 [4.0, 4.0]", "100 [100, 100]", "10 [10, 10]"],
        ["grpo", "2", "1", "–", "4.0 [3.0, 5.0]", "120 [110, 130]", "30 [20, 40]"],
        ["grpo", "2", "2", "0.500 [0.250, 0.750]", "3.0 [2.0, 4.0]", "130 [120, 140]", "40 [30, 50]"],
        ["hint", "1", "0", "–", "4.0", "100", "10"], ["hint", "1", "1", "–", "2.0", "120", "30"],
        ["hint", "1", "2", "0.500", "1.0", "120", "30"]]
    [fig] = figures
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [
        "held-out pass@1 (arith:test:16)", "negative groups left", "generated tokens", "trained tokens"]
    assert fig.axes[0].get_legend_handles_labels()[1] == ["grpo", "hint"]  # one colour per arm, every panel
    assert report_module.arms_sections(stores[:2]) == []  # one arm: nothing to set side by side
