"""The report's negative-group browser, in the HTML and in a real headless Chromium: the page loads
with no console error and no network request, every image decodes, the index sorts, each group
links to its samples, and hostile text from the store stays text."""

import importlib.util
import re
import shutil

import pytest

from replay.read.report import write_report
from replay.read.report_negatives import group_anchor
from replay.store import Store
from tests._store_rows import prompt_row, rollout_row, verdict_row
from tests.test_report import build_store

HOSTILE = "<script>alert('x')</script> & \"q\" </td></table>"
HOSTILE_COMPLETION = "</pre><img src=x onerror=alert(1)> \\boxed{7}"


@pytest.fixture(scope="module")
def page_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    store = build_store(root / "store")
    prompt = prompt_row(HOSTILE, answer="</b>8")
    store.write("prompts", [prompt])
    pid = prompt["prompt_id"]
    # a third negative group in round 0, with the most confident wrong answers of the round
    store.write("rollouts", [rollout_row(0, pid, i, (-0.01, -0.02), text=HOSTILE_COMPLETION) for i in range(4)],
                round=0)
    store.write("verdicts", [verdict_row(0, pid, i, False, status="ok" if i else "no_answer") for i in range(4)],
                round=0)
    write_report(root / "store", root / "out")
    return root / "out" / "index.html", Store.open(root / "store"), pid


def _index_rows(page: str) -> list[list[str]]:
    body = page.split("id='negative_index'", 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_index_lists_every_negative_group_most_confident_first(page_path):
    path, store, pid = page_path
    page = path.read_text(encoding="utf-8")
    expected = store.query("SELECT round, prompt_id, mean_confidence FROM negative_groups "
                           "ORDER BY round, mean_confidence DESC, prompt_id").to_pylist()  # ties: by id, as the page
    rows = _index_rows(page)
    assert len(rows) == len(expected) == 4  # round 0: P0, P1 and the hostile one; round 1: P1
    assert [int(r[0]) for r in rows] == [e["round"] for e in expected]
    for row, e in zip(rows, expected):
        assert f"href='#{group_anchor(e['round'], e['prompt_id'])}'" in row[1]
        assert float(row[6]) == pytest.approx(e["mean_confidence"], abs=5e-4)
    assert rows[0][1].endswith(f">{pid[:12]}</a>")  # the most confident group of round 0 leads
    for e in expected:  # every group has its samples block, G rows each
        block = page.split(f"id='{group_anchor(e['round'], e['prompt_id'])}'", 1)[1].split("</div>", 1)[0]
        assert block.count("<details>") == 4
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                    reason="playwright (Python package) not installed: pip install 'replay-rlvr[dev]'")
@pytest.mark.skipif(_chromium() is None, reason="no Chromium here: apt-get install chromium (Debian package)")
def test_the_page_in_a_real_browser(page_path):
    from playwright.sync_api import sync_playwright

    path, store, pid = page_path
    problems, requests, dialogs = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")

            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            assert len(images) == 7 and all(done and width > 0 for done, width, _ in images), images

            def column(index):
                return page.eval_on_selector_all(
                    "#negative_index tbody tr", f"rows => rows.map(r => r.cells[{index}].textContent)")

            header = page.locator("#negative_index th", has_text="max confidence")
            header.click()
            ascending = [float(x) for x in column(7)]
            assert ascending == sorted(ascending) and len(set(ascending)) > 1
            assert header.get_attribute("aria-sort") == "ascending"
            header.click()
            assert [float(x) for x in column(7)] == sorted(ascending, reverse=True)
            page.locator("#negative_index th", has_text="problem").click()
            assert column(3) == sorted(column(3))
            page.locator("#negative_index th", has_text="round").click()
            assert [int(x) for x in column(0)] == sorted(int(x) for x in column(0))

            anchor = group_anchor(0, pid)
            page.locator(f"#negative_index a[href='#{anchor}']").click()
            assert page.evaluate("location.hash") == f"#{anchor}"
            target = page.locator(".group:target")
            assert target.get_attribute("id") == anchor
            assert HOSTILE in target.inner_text()  # hostile text shown as text
            target.locator("summary").first.click()
            assert HOSTILE_COMPLETION in target.locator("pre").first.inner_text()
            assert target.locator("tr").count() == 5  # header + 4 samples
        finally:
            browser.close()
    assert problems == [] and dialogs == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
