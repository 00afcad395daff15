"""The demo's report.html and a run's report.html as a reader sees them, in Chromium: offline, no
errors, every figure drawn and captioned, no sideways scrolling on a phone, readable contrast,
and the demo's tables showing demo.json's and eval.json's numbers."""

import json
from dataclasses import replace

import pytest
from preftune_test_data import torch_threads

from preftune.demo.pipeline import QUICK_SIZES, DemoPaths, planned_runs, run_demo
from preftune.demo.pretrain import QUICK
from preftune.demo.summary import format_row
from preftune.evaluate import read_eval_records
from preftune.report import write_report
from preftune.report_compare import write_comparison

# The demo's own pipeline at a size a browser test can afford (about 10 s): the page has every
# kind of table and figure of a full demo, at other numbers.
TINY = replace(QUICK_SIZES, pretrain=replace(QUICK, steps=30), train_prompts=64, heldout_prompts=16,
               max_new_tokens=16, epochs=1, batch_size=16)
VIEWPORTS = [(1280, 860), (390, 844)]

# WCAG relative luminance and contrast ratio of every element's own text against the first
# opaque background behind it.
CONTRAST_JS = """() => {
  const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = el => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] === 1)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const worst = [];
  for (const el of document.body.querySelectorAll('*')) {
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) worst.push([el.tagName, el.textContent.slice(0, 40), ratio]);
  }
  return worst;
}"""


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-browser") / "demo"
    with torch_threads(1):
        run_demo(out, TINY, echo=lambda message: None, progress=False)
    return out


def _open(browser, path, width, height):
    """The page at a viewport, with every request and console complaint it makes recorded."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(10_000)
    requests, complaints = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: complaints.append(f"{message.type}: {message.text}")
            if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: complaints.append(f"page error: {error}"))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return context, page, requests, complaints


def _table(page, heading_start: str) -> list[list[str]]:
    """The body rows of the table under the h2 that starts with `heading_start`."""
    return page.evaluate("""start => {
      const h = [...document.querySelectorAll('h2')].find(e => e.textContent.startsWith(start));
      const next = h.nextElementSibling;
      const table = next.tagName === 'TABLE' ? next : next.querySelector('table');
      return [...table.rows].slice(1).map(r => [...r.cells].map(c => c.textContent));
    }""", heading_start)


@pytest.mark.parametrize(("width", "height"), VIEWPORTS)
@pytest.mark.parametrize("which", ["demo", "run"])
def test_report_reads_well_offline(browser, demo_folder, which, width, height):
    folder = demo_folder if which == "demo" else planned_runs(DemoPaths(demo_folder), TINY.betas)[0].folder
    context, page, requests, complaints = _open(browser, folder / "report.html", width, height)
    try:
        assert page.title() and page.title() == page.inner_text("h1")
        assert page.evaluate("document.documentElement.lang") == "en"
        outside = [url for url in requests if not url.startswith(folder.as_uri() + "/")]
        assert not outside, f"fetched from outside the report's folder: {outside}"
        assert not complaints
        figures = page.evaluate("""[...document.querySelectorAll('figure')].map(f => {
          const img = f.querySelector('img');
          return {title: f.querySelector('h3').textContent, alt: img.alt,
                  caption: f.querySelector('figcaption').textContent,
                  drawn: img.complete && img.naturalWidth > 0,
                  fits: img.getBoundingClientRect().right <= document.documentElement.clientWidth};
        })""")
        assert len(figures) >= (5 if which == "demo" else 6)
        for figure in figures:
            assert figure["drawn"] and figure["fits"] and figure["alt"], figure
            assert len(figure["caption"]) > 30, figure
        scroll, client = page.evaluate("[document.documentElement.scrollWidth, "
                                       "document.documentElement.clientWidth]")
        assert scroll <= client, f"the page scrolls sideways at {width} px ({scroll} > {client})"
        assert page.evaluate(CONTRAST_JS) == []
    finally:
        context.close()


def test_demo_report_shows_the_numbers_of_demo_json_and_eval_json(browser, demo_folder):
    summary = json.loads((demo_folder / "demo.json").read_text())
    context, page, _, _ = _open(browser, demo_folder / "report.html", *VIEWPORTS[0])
    try:
        assert _table(page, "Results on") == [format_row(row) for row in summary["results"]]
        times = dict(_table(page, "Time per step"))
        assert times == {step: f"{s:.1f}" for step, s in summary["seconds"].items()}
    finally:
        context.close()
    runs = planned_runs(DemoPaths(demo_folder), TINY.betas)
    for row, run in zip(summary["results"][1:], runs):
        (record,) = read_eval_records(run.final / "eval.json")
        assert (row["win_rate"], row["win_rate_ci"], row["kl"], row["kl_se"]) == (
            record["win_rate"], record["win_rate_ci"], record["kl"], record["kl_se"])
        assert row["mean_reward"] == record["mean_reward"]["policy"]
        assert summary["results"][0]["mean_reward"] == record["mean_reward"]["reference"]


@pytest.mark.parametrize("which", ["run", "comparison"])
def test_numbers_stay_on_one_line_on_a_phone(browser, tmp_path, which):
    """At 390 px a learning rate broke as '1.283e-' over '06', and '0.375 [0.165, 0.646]' or
    '0.2 ± 0.009' over two lines; a number cell now keeps its line (the table scrolls sideways
    inside its frame, the page does not)."""
    from test_report import generate_eval, write_metrics
    from test_report_compare import make_run

    if which == "run":
        write_metrics(tmp_path / "run", n_steps=10, eval_every=5)
        (tmp_path / "run" / "eval.json").write_text(json.dumps(generate_eval(0.1, 6.0, 1.5, 0.8)))
        page_path = write_report(tmp_path / "run")
    else:
        runs = [make_run(tmp_path / f"beta{beta}", n_steps=10, eval_every=5, loss={"beta": beta},
                         evals=[generate_eval(beta, 6.0, 1.5, 0.8)]) for beta in (0.1, 0.5)]
        page_path = write_comparison(runs, tmp_path / "compare")
    context, page, requests, complaints = _open(browser, page_path, *VIEWPORTS[1])
    try:
        assert not complaints
        assert all(url.startswith(page_path.parent.as_uri() + "/") for url in requests), requests
        broken = page.evaluate("""[...document.querySelectorAll('td.num')].filter(td => {
          const range = document.createRange();
          range.selectNodeContents(td);
          return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size > 1;
        }).map(td => td.textContent)""")
        assert page.evaluate("document.querySelectorAll('td.num').length") > 10
        assert broken == []
        scroll, client = page.evaluate("[document.documentElement.scrollWidth, "
                                       "document.documentElement.clientWidth]")
        assert scroll <= client, f"the page scrolls sideways ({scroll} > {client})"
    finally:
        context.close()
