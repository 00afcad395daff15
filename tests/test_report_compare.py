"""`preftune report RUN_A RUN_B ... --out DIR`: several runs on one page."""

import json
import re

import matplotlib.image as mpimg
import pytest
from matplotlib.cbook import is_math_text
from preftune_test_data import make_config
from test_report import TRAIN_PLOTS, assert_real_picture, generate_eval, write_metrics
from typer.testing import CliRunner

from preftune.cli import app
from preftune.config import dump_config
from preftune.report import write_report
from preftune.report_compare import (
    comparison_table,
    draw_overlay,
    load_run,
    run_labels,
    write_comparison,
)
from preftune.report_plots import TRAINING_PLOTS, Panel, PlotSpec


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def squash(text: str) -> str:
    return "".join(text.split())  # rich wraps long lines anywhere


def make_run(folder, n_steps=60, eval_every=20, finished=True, evals=(), **sections):
    """A run folder as `preftune train` leaves it: metrics.jsonl, the full config.yaml dumped from
    the schema, final/ when it finished, and final/eval.json when it was evaluated."""
    write_metrics(folder, n_steps=n_steps, eval_every=eval_every)
    config = make_config(folder.parent, "/models/pi_sft", "/data/D.jsonl", out=folder.name,
                         **sections)
    dump_config(config, folder / "config.yaml")
    if finished:
        (folder / "final").mkdir()
    if evals:
        (folder / "final" / "eval.json").write_text(json.dumps({"evals": list(evals)}))
    return folder


def last(folder, key):
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line][-1]


def row(html, name):
    """The cells of the table row named `name`, as text."""
    match = re.search(rf"<tr><td>{re.escape(name)}</td>(.*?)</tr>", html)
    assert match, f"no row {name!r}"
    return re.findall(r"<td[^>]*>(.*?)</td>", match.group(1))


@pytest.fixture
def sweep(tmp_path):
    """Two finished beta runs of different lengths, evaluated, and an unfinished IPO run without
    evaluations at another learning rate."""
    pairs = {"kind": "pairs", "model": "final", "data": "/data/D_eval.jsonl", "split": "train",
             "eval/loss": 0.5, "eval/rewards/accuracies": 0.75}
    return [
        make_run(tmp_path / "beta0.1", loss={"beta": 0.1},
                 evals=[generate_eval(0.1, 6.0, 1.5, 0.8), pairs]),
        make_run(tmp_path / "beta0.5", n_steps=40, loss={"beta": 0.5},
                 evals=[generate_eval(0.5, 2.0, 0.8, 0.65)]),
        make_run(tmp_path / "ipo", n_steps=30, eval_every=1000, finished=False,
                 loss={"type": "ipo", "beta": 0.1}, optim={"lr": 5e-4}),
    ]


def test_comparison_names_each_run_its_differing_settings_and_final_numbers(sweep, tmp_path):
    html = write_comparison(sweep, tmp_path / "compare").read_text()
    assert "<th>beta0.1</th><th>beta0.5</th><th>ipo</th>" in html
    # Only the keys that differ, plus model and loss type, which are always shown.
    assert row(html, "loss.beta") == ["0.1", "0.5", "0.1"]
    assert row(html, "loss.type") == ["sigmoid", "sigmoid", "ipo"]
    assert row(html, "optim.lr") == ["0.001", "0.001", "0.0005"]
    assert row(html, "model.path") == ["pi_sft"] * 3
    for same in ("data.max_length", "train.batch_size", "train.output_dir", "optim.scheduler"):
        assert f"<td>{same}</td>" not in html
    assert row(html, "status") == ["finished", "finished", "unfinished (no final/)"]
    assert row(html, "last step") == ["60", "40", "30"]
    # sigmoid and ipo losses have no common unit; the row says so rather than give one.
    assert row(html, "train loss, last step (unit differs by loss type)") == [
        f"{last(run, 'loss'):.4g}" for run in sweep]
    assert row(html, "eval/loss, last (unit differs by loss type)") == [
        f"{0.69 - 0.3:.4g} (step 60)", f"{0.69 - 0.3:.4g} (step 40)", "–"]
    assert row(html, "eval/rewards/accuracies, best (fraction of pairs)") == [
        "0.9 (step 60)", "0.9 (step 40)", "–"]
    assert row(html, "win rate [95% CI] (reward:tests:length)") == [
        "0.800 [0.700, 0.900]", "0.650 [0.550, 0.750]", "–"]
    assert row(html, "KL ± se, nats per response (reward:tests:length)") == ["6 ± 0.3", "2 ± 0.3", "–"]
    assert row(html, "held-out accuracy (pairs of D_eval.jsonl)") == ["0.75", "–", "–"]
    # One sentence for each thing a reader could misread.
    assert "ipo has no final/: it is still training or was stopped" in html
    assert "ipo has no evaluations" in html
    assert "different lengths (steps: beta0.1 60, beta0.5 40, ipo 30)" in html
    assert "The runs use different loss types" in html
    for name in TRAIN_PLOTS + ["reward_kl.png"]:
        assert_real_picture(tmp_path / "compare" / "plots" / name)
    wins = mpimg.imread(tmp_path / "compare" / "plots" / "win_rates.png")  # one short row per run
    assert wins.shape[0] > 200 and wins[..., :3].std() > 0.05
    for name in TRAIN_PLOTS + ["reward_kl.png", "win_rates.png"]:
        assert f'src="plots/{name}"' in html
    assert not (sweep[0] / "report.html").exists()  # no run's own report is touched


def test_eight_runs_get_distinct_styles_and_a_legend_naming_each(tmp_path):
    folders = [tmp_path / f"lr{n}" for n in range(8)]
    for folder in folders:
        write_metrics(folder, n_steps=5, eval_every=5)
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]
    fig = draw_overlay(runs, [Panel("loss", "Loss", "loss", "loss")], smoothing=0.6)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        f"lr{n}" for n in range(8)] + ["train (EMA 0.6)", "eval"]
    (ax,) = fig.axes
    styles = {(line.get_color(), line.get_marker()) for line in ax.get_lines()
              if line.get_marker() not in (None, "None", "")}
    assert len(styles) == 8
    fig = draw_overlay(runs, [Panel("grad_norm", "Gradient norm", "norm", "grad norm")], smoothing=0.6)
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == "train (EMA 0.6)"  # no eval


def test_gradient_norms_spanning_decades_get_a_log_axis_as_in_one_runs_report(tmp_path):
    folders = [tmp_path / "calm", tmp_path / "spiky"]
    for folder in folders:
        write_metrics(folder, n_steps=5, eval_every=5)
    lines = [json.loads(x) for x in (folders[1] / "metrics.jsonl").read_text().splitlines()]
    lines[0]["grad_norm"] = 500.0  # an early spike, 100x the calm run's norms
    (folders[1] / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]
    panel = [panel for spec in TRAINING_PLOTS for panel in spec.panels if panel.key == "grad_norm"]
    assert draw_overlay(runs[:1], panel, smoothing=0.6).axes[0].get_yscale() == "linear"
    assert draw_overlay(runs, panel, smoothing=0.6).axes[0].get_yscale() == "log"
    assert draw_overlay(runs, panel, smoothing=0.6).axes[0].get_ylabel() == (
        "global L2 norm of the gradient, log scale")  # the label says it, as one run's does
    assert draw_overlay(runs[:1], panel, smoothing=0.6).axes[0].get_ylabel() == (
        "global L2 norm of the gradient")


def test_accuracy_and_margin_get_the_chance_line_and_ranges_of_one_runs_report(tmp_path):
    """The comparison draws report_plots.draw_guides as one run's report does: accuracy on
    [0, 1] with chance at 0.5 (named in a legend), margin and token accuracy against their guides."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        write_metrics(folder, n_steps=5, eval_every=5, token_metrics=True)
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]

    def guides(ax):  # horizontal lines across the whole axis: (y, label)
        return [(line.get_ydata()[0], line.get_label()) for line in ax.get_lines()
                if list(line.get_xdata()) == [0, 1] and len(set(line.get_ydata())) == 1]

    (spec,) = [spec for spec in TRAINING_PLOTS if spec.file == "accuracy_margins.png"]
    accuracy, margin = draw_overlay(runs, spec.panels, smoothing=0.6).axes
    assert guides(accuracy) == [(0.5, "chance (0.5)")]
    assert accuracy.get_ylim() == (-0.02, 1.02)
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["chance (0.5)"]
    assert [y for y, _ in guides(margin)] == [0.0]
    (spec,) = [spec for spec in TRAINING_PLOTS if spec.file == "entropy_token_accuracy.png"]
    assert draw_overlay(runs, spec.panels, smoothing=0.6).axes[1].get_ylim() == (-0.02, 1.02)


def test_run_names_with_dollar_signs_are_drawn_as_written_not_as_tex(tmp_path):
    """matplotlib reads text between two '$' as TeX: 'lr$1e-4$' lost its dollars in the legend,
    and 'r$\\q$' stopped the whole comparison with a ParseFatalException (unknown symbol)."""
    folders = [tmp_path / "lr$1e-4$", tmp_path / "r$\\q$"]
    for folder in folders:
        make_run(folder, n_steps=5, eval_every=5, evals=[generate_eval(0.1, 6.0, 1.5, 0.8)])
    write_comparison(folders, tmp_path / "compare")
    assert_real_picture(tmp_path / "compare" / "plots" / "reward_kl.png")  # runs in its legend
    assert (tmp_path / "compare" / "plots" / "win_rates.png").is_file()  # and its row names
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]
    fig = draw_overlay(runs, [Panel("loss", "Loss", "loss", "loss")], smoothing=0.6)
    texts = [t.get_text() for t in fig.legends[0].get_texts()][:2]
    assert not any(is_math_text(t) for t in texts)
    assert [t.replace(r"\$", "$") for t in texts] == ["lr$1e-4$", "r$\\q$"]  # as matplotlib shows them


def test_the_legend_says_the_learning_rate_is_drawn_unsmoothed(tmp_path):
    """The learning rate is drawn raw (Panel.smooth False), as one run's report says ("learning
    rate, train"); the comparison's legend called every train line of the figure an EMA."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        write_metrics(folder, n_steps=5, eval_every=5)
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]
    (spec,) = [spec for spec in TRAINING_PLOTS if spec.file == "optimization.png"]
    fig = draw_overlay(runs, spec.panels, smoothing=0.6)
    assert [t.get_text() for t in fig.legends[0].get_texts()][2] == "train (EMA 0.6; learning rate raw)"
    fig = draw_overlay(runs, spec.panels[1:], smoothing=0.6)
    assert [t.get_text() for t in fig.legends[0].get_texts()][2] == "train"


def test_the_loss_caption_says_how_the_curves_are_smoothed(tmp_path):
    """With smoothing 0 there is no EMA, yet the caption spoke of faint raw lines and bold EMAs."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        write_metrics(folder, n_steps=10, eval_every=5)
    html = write_comparison(folders, tmp_path / "compare", smoothing=0).read_text()
    assert ("Each run&#x27;s loss. Lines are the raw per-step values, unsmoothed (smoothing 0). "
            "Dashed lines with open markers are evaluations.</figcaption>") in html
    assert "EMA" not in html


def test_a_run_missing_plotted_keys_is_named_as_one_runs_report_names_it(tmp_path):
    """A run that logged no grad_norm (an older or foreign metrics.jsonl) is simply absent from
    that plot; the page says so, as its own report does."""
    folders = [tmp_path / "full", tmp_path / "old"]
    for folder in folders:
        write_metrics(folder, n_steps=5, eval_every=5)
    lines = [json.loads(x) for x in (folders[1] / "metrics.jsonl").read_text().splitlines()]
    (folders[1] / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in x.items() if k != "grad_norm"}) + "\n" for x in lines))
    html = write_comparison(folders, tmp_path / "compare").read_text()
    assert ("old has no training values for grad_norm; those curves of it are missing from the "
            "plots.") in html
    assert "full has no training values" not in html
    assert "has no training values for grad_norm" in write_report(folders[1]).read_text()


def test_equal_folder_names_are_told_apart(tmp_path):
    folders = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "x" / "a" / "best",
               tmp_path / "y" / "a" / "best", tmp_path / "other"]
    assert run_labels(folders) == ["a/run", "b/run", "x/a/best", "y/a/best", "other"]


def test_one_run_gives_todays_report_and_several_a_comparison(sweep, tmp_path):
    def page(path):  # the page without the minute it was written
        return re.sub(r"generated [\d\- :]+\.", "", path.read_text())

    result = cli("report", sweep[1], "--smoothing", "0.3")
    assert result.exit_code == 0 and result.output.strip() == f"report: {sweep[1] / 'report.html'}"
    from_cli = page(sweep[1] / "report.html")
    assert from_cli == page(write_report(sweep[1], smoothing=0.3))
    assert "runs compared" not in from_cli
    result = cli("report", sweep[0], sweep[1], "--out", tmp_path / "compare")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report: {tmp_path / 'compare' / 'report.html'}"
    assert "preftune report: 2 runs compared" in (tmp_path / "compare" / "report.html").read_text()


def test_comparison_mistakes_are_one_sentence(sweep, tmp_path):
    a, b, _ = sweep
    (tmp_path / "notes").mkdir()
    (tmp_path / "demo" / "runs").mkdir(parents=True)
    (tmp_path / "demo" / "demo.json").write_text("{}")
    cases = [
        ((a, b), f"comparing 2 runs needs --out DIR, the folder for the comparison's report.html "
                 f"and plots (each run keeps its own report), e.g. --out {tmp_path / 'compare'}."),
        ((a, b, "--out", a), f"--out {a} is one of the runs compared"),
        ((a, tmp_path / "nowhere", "--out", tmp_path / "c"), f"{tmp_path / 'nowhere'}: no such run folder"),
        ((a, a / "metrics.jsonl", "--out", tmp_path / "c"), f"{a / 'metrics.jsonl'} is a file, not a run folder"),
        ((a, tmp_path / "notes", "--out", tmp_path / "c"),
         f"{tmp_path / 'notes'} is not a run folder: it holds neither metrics.jsonl nor any eval.json"),
        ((a, tmp_path, "--out", tmp_path / "c"), f"{tmp_path} is not a run but holds runs; pass them instead: {a} {b}"),
        ((a, tmp_path / "demo", "--out", tmp_path / "c"),
         f"{tmp_path / 'demo'} is a `preftune demo` folder, not a run; compare its runs instead"),
        ((a, b, tmp_path / "beta0.1", "--out", tmp_path / "c"), f"{a} is given twice"),
        ((a, b, "--eval", a / "final" / "eval.json", "--out", tmp_path / "c"),
         "--eval adds evaluations to one run's report"),
    ]
    for args, sentence in cases:
        result = cli("report", *args)
        assert result.exit_code == 2, (args, result.output)
        assert squash(sentence) in squash(result.output), (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "c").exists()  # refused before writing anything


def test_resumed_empty_and_evaluation_only_runs_are_shown(tmp_path):
    # A resume that logged step 2 again: the last line of a step wins, as in one run's report.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    lines = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}, {"step": 2, "loss": 0.7},
             {"step": 3, "loss": 0.6}]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    started = tmp_path / "started"
    started.mkdir()
    (started / "metrics.jsonl").write_text("")
    baseline = tmp_path / "pi_sft"
    baseline.mkdir()
    (baseline / "eval.json").write_text(json.dumps(generate_eval(None, 0.0, 0.2, 0.5, "SFT")))
    html = write_comparison([resumed, started, baseline], tmp_path / "compare", smoothing=0).read_text()
    assert row(html, "train loss, last step (nats per pair, mean over pairs)") == ["0.6", "–", "–"]
    assert row(html, "last step") == ["3", "–", "–"]
    assert "started has logged no step yet (its metrics.jsonl is empty): no curves." in html
    assert "pi_sft has no metrics.jsonl: evaluations only, no training curves." in html
    assert "resumed has no config.yaml, so its settings are shown as unknown" in html
    assert row(html, "win rate [95% CI] (reward:tests:length)")[2].startswith("0.500")
    assert_real_picture(tmp_path / "compare" / "plots" / "loss.png")


def test_comparison_shows_the_token_wise_kl_where_an_evaluation_has_it(tmp_path):
    # beta0.1's eval.json predates `kl_tokens`: it still reports, with '–' in that row.
    older = make_run(tmp_path / "beta0.1", n_steps=5, eval_every=5, evals=[generate_eval(0.1, 6.0, 1.5, 0.8)])
    newer = make_run(tmp_path / "beta0.5", n_steps=5, eval_every=5, evals=[
        {**generate_eval(0.5, 2.0, 0.8, 0.65), "kl_tokens": 1.75, "kl_tokens_se": 0.05}])
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip([older, newer], ["beta0.1", "beta0.5"]))]
    _, _, rows = comparison_table(runs)
    by_name = {r[0]: r[1:] for r in rows}
    assert by_name["KL ± se, nats per response (reward:tests:length)"] == ["6 ± 0.3", "2 ± 0.3"]
    assert by_name["token-wise KL ± se, nats per response (reward:tests:length)"] == ["–", "1.75 ± 0.05"]


def test_token_metrics_and_wpo_weight_overlay_the_runs_that_logged_them_and_name_the_others(tmp_path, monkeypatch):
    """Runs that did not log a figure's keys (train.token_metrics, loss.wpo_weighting off) are absent
    from it, and the figure and its caption name them; with no run logging them, no figure."""
    import preftune.report_compare as compare

    figures = {}
    draw = compare.draw_overlay

    def keep(runs, panels, smoothing):
        figures[panels[0][0]] = fig = draw(runs, panels, smoothing)
        return fig

    monkeypatch.setattr(compare, "draw_overlay", keep)
    both, wpo, plain = tmp_path / "both", tmp_path / "wpo", tmp_path / "plain"
    write_metrics(both, n_steps=5, eval_every=5, token_metrics=True, wpo=True)
    write_metrics(wpo, n_steps=5, eval_every=5, wpo=True)
    write_metrics(plain, n_steps=5, eval_every=5)
    html = write_comparison([both, wpo, plain], tmp_path / "compare").read_text()
    for name, first_key, logged, absent in (
            ("entropy_token_accuracy.png", "entropy", ["both"], "wpo, plain"),
            ("logits.png", "logits/chosen", ["both"], "wpo, plain"),
            ("wpo_weight.png", "wpo/weight", ["both", "wpo"], "plain")):
        assert_real_picture(tmp_path / "compare" / "plots" / name)
        assert f'src="plots/{name}"' in html
        fig = figures[first_key]
        assert [t.get_text() for t in fig.legends[0].get_texts()] == [*logged, "train (EMA 0.6)", "eval"]
        assert fig.get_suptitle() == f"Not logged by {absent}, so absent here."
        figure = re.search(rf'<figure id="plots/{re.escape(name)}">.*?</figure>', html, re.S).group(0)
        assert f"Not logged by {absent}, so absent here.</figcaption>" in figure
    assert len(figures["wpo/weight"].axes[0].get_lines()) == 2 * 3  # raw, EMA and eval of both runs

    html = write_comparison([wpo, plain], tmp_path / "compare-2").read_text()
    assert sorted(p.name for p in (tmp_path / "compare-2" / "plots").iterdir()) == sorted(TRAIN_PLOTS + ["wpo_weight.png"])
    assert "Entropy" not in html and "Not logged by plain, so absent here." in html
    write_metrics(tmp_path / "plain-too", n_steps=5, eval_every=5)
    write_comparison([plain, tmp_path / "plain-too"], tmp_path / "compare-3")
    assert sorted(p.name for p in (tmp_path / "compare-3" / "plots").iterdir()) == sorted(TRAIN_PLOTS)
    assert "Not logged" not in (tmp_path / "compare-3" / "report.html").read_text()


def test_a_curve_added_to_the_plot_table_shows_in_both_reports(tmp_path, monkeypatch):
    """Both reports draw their training figures from report_plots.TRAINING_PLOTS, so one entry
    there is a figure, with its heading and captions, in one run's report and in a comparison."""
    import preftune.report as report
    import preftune.report_compare as compare

    logps = PlotSpec("logps.png", "Log-probabilities",
                     (Panel("logps/chosen", "Chosen", "nats per response", "chosen"),
                      Panel("logps/rejected", "Rejected", "nats per response", "rejected")),
                     caption="Log-probs of this run.", compare_caption="Log-probs of each run.")
    assert report.TRAINING_PLOTS is compare.TRAINING_PLOTS is TRAINING_PLOTS  # one table, not two copies
    for module in (report, compare):
        monkeypatch.setattr(module, "TRAINING_PLOTS", (*module.TRAINING_PLOTS, logps))
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        write_metrics(run, n_steps=10, eval_every=5)
    html = write_report(runs[0]).read_text()
    assert_real_picture(runs[0] / "plots" / "logps.png")
    assert "<h3>Log-probabilities</h3>" in html and "Log-probs of this run." in html
    html = write_comparison(runs, tmp_path / "compare").read_text()
    assert_real_picture(tmp_path / "compare" / "plots" / "logps.png")
    assert "<h3>Log-probabilities</h3>" in html and "Log-probs of each run." in html


def test_step_axes_have_whole_number_ticks(tmp_path):
    """Steps are integers; the comparison's axis was ticked at 2.5 and 7.5 for short runs."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        write_metrics(folder, n_steps=3, eval_every=3)
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]
    for spec in TRAINING_PLOTS[:3]:
        for ax in draw_overlay(runs, spec.panels, smoothing=0.6).axes:
            ticks = ax.get_xticks()
            assert ticks.size >= 2 and all(t == int(t) for t in ticks), (spec.file, ticks)


def test_curves_too_short_to_smooth_are_not_called_an_ema(tmp_path):
    """Curves of 2 steps or fewer are drawn raw; the legend and the loss caption said EMA."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        write_metrics(folder, n_steps=2, eval_every=1000)
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]
    fig = draw_overlay(runs, [Panel("loss", "Loss", "loss", "loss")], smoothing=0.6)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b", "train"]
    html = write_comparison(folders, tmp_path / "compare", smoothing=0.6).read_text()
    assert "unsmoothed: 2 steps or fewer are too few for an EMA." in html
    assert "EMA" not in html.replace("too few for an EMA", "")


def test_a_short_run_beside_a_long_one_is_named_raw_in_the_legend(tmp_path):
    """A 2-step run compared with a 10-step one is drawn raw, the long one as an EMA; the legend
    said 'train (EMA 0.6)' for both, so the short run's line read as smoothed."""
    folders = [tmp_path / "long", tmp_path / "short"]
    write_metrics(folders[0], n_steps=10, eval_every=1000)
    write_metrics(folders[1], n_steps=2, eval_every=1000)
    runs = [load_run(f, label, n) for n, (f, label) in enumerate(zip(folders, run_labels(folders)))]
    fig = draw_overlay(runs, [Panel("loss", "Loss", "loss", "loss")], smoothing=0.6)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "long (train EMA 0.6)", "short (train raw, 2 steps or fewer)", "train"]
    (spec,) = [spec for spec in TRAINING_PLOTS if spec.file == "optimization.png"]
    fig = draw_overlay(runs, spec.panels, smoothing=0.6)
    assert [t.get_text() for t in fig.legends[0].get_texts()][2] == "train (learning rate raw)"
    html = write_comparison(folders, tmp_path / "compare", smoothing=0.6).read_text()
    assert "bold lines their EMA (weight 0.6). short: 2 steps or fewer, drawn raw." in html


def test_config_booleans_and_nulls_are_shown_as_config_yaml_writes_them(tmp_path):
    """The settings rows showed Python's True/False/None; config.yaml says true/false/null."""
    folders = [make_run(tmp_path / "a", n_steps=5, eval_every=5),
               make_run(tmp_path / "b", n_steps=5, eval_every=5,
                        loss={"wpo_weighting": True}, optim={"max_grad_norm": None})]
    (tmp_path / "c").mkdir()
    write_metrics(tmp_path / "c", n_steps=5, eval_every=5)  # no config.yaml: unknown, not null
    html = write_comparison([*folders, tmp_path / "c"], tmp_path / "compare").read_text()
    assert row(html, "loss.wpo_weighting") == ["false", "true", "–"]
    assert row(html, "optim.max_grad_norm") == ["1", "null", "–"]
    written = (tmp_path / "b" / "config.yaml").read_text()
    assert "wpo_weighting: true" in written and "max_grad_norm: null" in written


def test_metric_rows_give_units_and_the_step_of_each_runs_last_evaluation(tmp_path):
    """Runs of other lengths and eval cadences: 'eval/loss, last' put a run's evaluation at step 60
    beside another's at step 40 (its run went on to 50) with nothing to say so, and no row said its
    unit. A last training value the logger wrote as null (NaN) read '–', as if never logged."""
    runs = [make_run(tmp_path / "long", n_steps=60, eval_every=20),
            make_run(tmp_path / "short", n_steps=50, eval_every=20)]
    lines = [json.loads(x) for x in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    [line for line in lines if "loss" in line][-1]["loss"] = None
    (runs[1] / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    html = write_comparison(runs, tmp_path / "compare").read_text()
    assert row(html, "eval/loss, last (nats per pair, mean over pairs)") == [
        f"{0.69 - 0.3:.4g} (step 60)", f"{0.69 - 0.3 * 40 / 50:.4g} (step 40)"]
    assert row(html, "train loss, last step (nats per pair, mean over pairs)") == [
        f"{last(runs[0], 'loss'):.4g}", "not finite"]
    assert row(html, "eval/rewards/margins, last (chosen − rejected, β·log(π/π_ref), nats, "
                     "mean over pairs)")[1] == f"{1.2 * 40 / 50:.4g} (step 40)"
    # A number with its step is a number: right-aligned, digits under digits, as the others.
    assert f'<td class="num">{0.69 - 0.3:.4g} (step 60)</td>' in html


def test_the_margin_caption_warns_that_betas_scale_the_margins(sweep, tmp_path):
    """The rewards figure said runs of other β have rewards on other scales; the margin beside the
    accuracy, the same β-scaled quantity, was captioned as in one run's report."""
    html = write_comparison(sweep, tmp_path / "compare").read_text()
    caption = re.search(r'<figure id="plots/accuracy_margins.png">.*?<figcaption>(.*?)</figcaption>',
                        html, re.S).group(1)
    assert "Runs with different β have margins on different scales." in caption


def test_reward_and_accuracy_captions_say_what_each_point_is_a_mean_over(sweep, tmp_path):
    """Their points are means over a step's pairs (training) or the held-out pairs (evaluation);
    no caption of either report said so, so a dashed eval point read as one more training step."""
    said = ("Training points are means over each step&#x27;s pairs, evaluation points over the "
            "held-out pairs.")
    for html in (write_comparison(sweep, tmp_path / "compare").read_text(),
                 write_report(sweep[0]).read_text()):
        for name in ("rewards.png", "accuracy_margins.png"):
            caption = re.search(rf'<figure id="plots/{name}">.*?<figcaption>(.*?)</figcaption>',
                                html, re.S).group(1)
            assert caption.endswith(said), (name, caption)


def test_a_pairs_evaluation_does_not_rename_its_runs_win_rate(sweep, tmp_path, monkeypatch):
    """beta0.1 was evaluated with eval generate and eval pairs: its win-rate row read
    'beta0.1: DPO β=0.1 (reward:tests:length)' beside a plain 'beta0.5', as if it were two models
    or another judge, though the pairs evaluation is in no plot."""
    from test_report import _drawn_figures

    drawn = _drawn_figures(monkeypatch)
    write_comparison(sweep, tmp_path / "compare")
    (ax,) = drawn["win_rates.png"].axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["beta0.1", "beta0.5"]


def test_a_human_evaluation_awaiting_votes_does_not_rename_its_runs_win_rate(tmp_path, monkeypatch):
    """Like a pairs evaluation, one queued for people and not yet scored is in no plot, yet its
    run's win-rate row read 'a: DPO β=0.1' beside a plain 'b'."""
    from test_report import _drawn_figures

    drawn = _drawn_figures(monkeypatch)
    waiting = {**generate_eval(0.1, 6.0, 1.5, 0.8), "judge": "human", "status": "awaiting_votes",
               "win_rate": None, "win_rate_ci": None, "mean_reward": {"policy": None, "reference": None}}
    runs = [make_run(tmp_path / "a", n_steps=10, eval_every=5, evals=[generate_eval(0.1, 6.0, 1.5, 0.8), waiting]),
            make_run(tmp_path / "b", n_steps=10, eval_every=5, evals=[generate_eval(0.5, 2.0, 0.8, 0.65)])]
    write_comparison(runs, tmp_path / "compare")
    (ax,) = drawn["win_rates.png"].axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]


def test_the_model_data_loss_and_beta_are_shown_even_when_the_runs_share_them(tmp_path):
    """Two learning rates at one β: the page showed optim.lr and never said which β or data the
    runs used, though every reward and margin on it is in β·log(π/π_ref)."""
    runs = [make_run(tmp_path / "lr1", n_steps=10, eval_every=5, optim={"lr": 1e-3}),
            make_run(tmp_path / "lr2", n_steps=10, eval_every=5, optim={"lr": 5e-4})]
    html = write_comparison(runs, tmp_path / "compare").read_text()
    assert row(html, "optim.lr") == ["0.001", "0.0005"]
    assert row(html, "loss.beta") == ["0.1", "0.1"]
    assert row(html, "data.train") == ["D.jsonl", "D.jsonl"]
    assert row(html, "loss.type") == ["sigmoid", "sigmoid"]
    assert "<td>train.batch_size</td>" not in html  # the rest, when equal, stays out


def test_kl_sampled_at_another_temperature_is_flagged_and_an_unmeasured_one_said(tmp_path):
    """One run's report warns under the reward-KL plot that samples drawn at temperature 0.7 give
    no KL(π ‖ π_ref); the comparison's caption did not. A token-wise KL eval generate could not
    measure (kl_tokens null) had no row at all, as if never asked for."""
    note = "samples were drawn at temperature 0.7, not from the policy itself"
    tempered = {**generate_eval(0.1, 6.0, 1.5, 0.8), "sampling": {"temperature": 0.7},
                "kl_note": note, "kl_tokens": None, "kl_tokens_se": None}
    runs = [make_run(tmp_path / "a", n_steps=10, eval_every=5, evals=[tempered]),
            make_run(tmp_path / "b", n_steps=10, eval_every=5, evals=[{**tempered, "kl": 2.0}])]
    html = write_comparison(runs, tmp_path / "compare").read_text()
    caption = re.search(r'<figure id="plots/reward_kl.png">.*?<figcaption>(.*?)</figcaption>',
                        html, re.S).group(1)
    assert caption.endswith(f"Not KL(π ‖ π_ref) here: {note}")
    (name,) = [n for n in re.findall(r"<tr><td>(token-wise KL[^<]*)</td>", html)]
    assert row(html, name) == ["not measured (output layers differ in size)"] * 2


def test_runs_whose_held_out_pairs_differ_are_told_so(tmp_path):
    """A seed sweep with data.eval_fraction holds out other pairs in each run (hold_out draws them
    with train.seed), yet eval/loss rows sat side by side as if measured on one set."""
    runs = [make_run(tmp_path / f"seed{seed}", n_steps=10, eval_every=5,
                     data={"eval_fraction": 0.1}, train={"seed": seed}) for seed in (0, 1)]
    html = write_comparison(runs, tmp_path / "compare").read_text()
    assert ("The runs evaluate on different held-out pairs: data.eval_fraction draws them from "
            "data.train with train.seed, and these differ (train.seed: seed0 0, seed1 1), so their "
            "eval/ numbers are not on the same pairs") in html
    # Another split of the same data set holds out from other rows (it said nothing).
    splits = [make_run(tmp_path / split, n_steps=10, eval_every=5, data={"eval_fraction": 0.1, "split": split})
              for split in ("train_prefs", "test_prefs")]
    assert ("these differ (data.split: train_prefs train_prefs, test_prefs test_prefs)"
            in write_comparison(splits, tmp_path / "splits").read_text())
    same = [make_run(tmp_path / f"beta{beta}", n_steps=10, eval_every=5, data={"eval_fraction": 0.1},
                     loss={"beta": beta}) for beta in (0.1, 0.5)]
    assert "different held-out pairs" not in write_comparison(same, tmp_path / "same").read_text()
