"""The run report: plots exist, are real pictures, and the HTML shows them."""

import json
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pytest

from preftune.errors import UserError
from preftune.report import (
    ema,
    load_metrics,
    plot_frontier,
    plot_win_rates,
    win_rate_labels,
    write_report,
)
from preftune.report_compare import write_comparison

TRAIN_PLOTS = ["loss.png", "rewards.png", "accuracy_margins.png", "optimization.png"]
EVAL_PLOTS = ["reward_kl.png", "win_rates.png"]


def write_metrics(run_dir, n_steps=60, eval_every=20, token_metrics=False, wpo=False):
    """A DPO-shaped run: rewards part, loss falls, lr warms up then decays, evals every 20.
    token_metrics, wpo: also the keys train.token_metrics and loss.wpo_weighting log."""
    rng = np.random.default_rng(0)
    lines = []
    for step in range(1, n_steps + 1):
        t = step / n_steps
        chosen, rejected = 0.5 * t + rng.normal(0, 0.2), -t + rng.normal(0, 0.2)
        lines.append({
            "step": step, "epoch": t, "loss": math.log1p(math.exp(rejected - chosen)),
            "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracies": float(chosen > rejected), "rewards/margins": chosen - rejected,
            "logps/chosen": -50.0 + chosen, "logps/rejected": -55.0 + rejected,
            "grad_norm": 3.0 * (1 - t) + 0.2, "learning_rate": 1e-5 * min(1.0, 5 * t) * (1.1 - t),
            "tokens_per_second": 900.0, **settings_metrics(step, t, token_metrics, wpo),
        })
        if step % eval_every == 0:
            lines.append({"step": step, "eval/loss": 0.69 - 0.3 * t, "eval/rewards/chosen": 0.4 * t,
                          "eval/rewards/rejected": -0.8 * t, "eval/rewards/accuracies": 0.5 + 0.4 * t,
                          "eval/rewards/margins": 1.2 * t,
                          **{f"eval/{k}": v for k, v in settings_metrics(step, t, token_metrics, wpo).items()}})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def settings_metrics(step, t, token_metrics, wpo) -> dict:
    """What train.token_metrics and loss.wpo_weighting add to a line (shaped, not computed)."""
    values = {}
    if token_metrics:
        values |= {"entropy": 6.1 - 0.2 * t + 0.02 * math.sin(step), "mean_token_accuracy": 0.8 * t,
                   "logits/chosen": -0.1 * t, "logits/rejected": 0.1 * t + 0.01 * math.cos(step)}
    if wpo:
        values["wpo/weight"] = 1.0 - 0.1 * t + 0.05 * math.sin(step)
    return values


def generate_eval(beta, kl, reward, rate, method="DPO"):
    return {"kind": "generate", "method": method, "beta": beta, "model": f"runs/b{beta}/final",
            "reference": "sft", "judge": "reward:tests:length", "n_prompts": 64,
            "win_rate": rate, "win_rate_ci": [rate - 0.1, rate + 0.1], "ties": 1,
            "mean_reward": {"policy": reward, "reference": 0.0},
            "mean_reward_se": {"policy": 0.1, "reference": 0.1}, "kl": kl, "kl_se": 0.3,
            "mean_length": {"policy": 30.0, "reference": 28.0}}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    (run / "config.yaml").write_text("model: tiny\nloss:\n  beta: 0.1\ntrain:\n  epochs: 1\n")
    for beta, kl, reward, rate in [(0.1, 6.0, 1.5, 0.8), (0.5, 2.0, 0.8, 0.65)]:
        (run / f"b{beta}").mkdir()
        (run / f"b{beta}" / "eval.json").write_text(json.dumps(generate_eval(beta, kl, reward, rate)))
    return run


def assert_real_picture(path):
    """More than a blank canvas: kilobytes of PNG and pixels that vary."""
    assert path.stat().st_size > 15_000, path
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05, f"{path} looks blank"


def test_report_writes_every_plot_and_links_it(run_dir, tmp_path):
    baseline = tmp_path / "pft.json"
    baseline.write_text(json.dumps([generate_eval(None, 4.0, 0.6, 0.6, method="Preferred-FT")]))
    report = write_report(run_dir, eval_paths=[baseline])
    assert report == run_dir / "report.html"
    html = report.read_text()
    for name in TRAIN_PLOTS + EVAL_PLOTS:
        assert_real_picture(run_dir / "plots" / name)
        assert f'src="plots/{name}"' in html  # relative, so the folder can move
    assert html.count("<img ") == len(TRAIN_PLOTS + EVAL_PLOTS)
    # The summary holds the final metrics, config highlights and each evaluation.
    assert "<td>rewards/accuracies (fraction of pairs)</td>" in html
    assert "<td>loss.beta</td>" in html
    for label in ("DPO β=0.1", "DPO β=0.5", "Preferred-FT"):
        assert f"<td>{label}</td>" in html
    assert "0.800 [0.700, 0.900]" in html


SETTINGS_PLOTS = ["entropy_token_accuracy.png", "logits.png", "wpo_weight.png"]


def _drawn_figures(monkeypatch) -> dict:
    """{PNG name: matplotlib figure} of every plot the report saves from now on."""
    import preftune.report as report

    drawn, save = {}, report._save

    def keep(fig, path):
        drawn[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return drawn


def _named_lines(ax) -> dict:
    return {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_token_metrics_and_wpo_weight_are_plotted_as_the_other_curves(tmp_path, monkeypatch):
    """train.token_metrics' and loss.wpo_weighting's keys get their plots, smoothed, with the eval/
    points overlaid, a caption saying what each means and rows in the final metrics; a run
    without them gets none of these."""
    drawn = _drawn_figures(monkeypatch)
    write_metrics(tmp_path, n_steps=10, eval_every=5, token_metrics=True, wpo=True)
    html = write_report(tmp_path, smoothing=0.5).read_text()
    for name in SETTINGS_PLOTS:
        assert_real_picture(tmp_path / "plots" / name)
        assert f'src="plots/{name}"' in html
    entropy, accuracy = drawn["entropy_token_accuracy.png"].axes
    lines = _named_lines(entropy)
    assert set(lines) == {"entropy, train (EMA 0.5)", "entropy, eval"}
    np.testing.assert_allclose(lines["entropy, eval"], [[5, 6.0 + 0.02 * math.sin(5)], [10, 5.9 + 0.02 * math.sin(10)]])
    assert entropy.get_ylabel() == "nats per completion token"
    assert set(_named_lines(accuracy)) == {"token accuracy, train (EMA 0.5)", "token accuracy, eval"}
    (logits,) = drawn["logits.png"].axes
    assert set(_named_lines(logits)) == {"chosen, train (EMA 0.5)", "chosen, eval",
                                         "rejected, train (EMA 0.5)", "rejected, eval"}
    (weight,) = drawn["wpo_weight.png"].axes
    assert _named_lines(weight)["WPO weight, eval"][1] == pytest.approx([10.0, 0.9 + 0.05 * math.sin(10)])
    for caption in ("Entropy: how unsure the policy is of the next token", "Token accuracy: the share",
                    "The policy&#x27;s logits averaged over the vocabulary", "WPO&#x27;s pair weight"):
        assert caption in html
    for key in ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "wpo/weight"):
        assert f"<td>{key} (" in html  # its row, with its unit

    # A run that logged only the WPO weight gets only its plot.
    wpo_only = tmp_path / "wpo"
    write_metrics(wpo_only, n_steps=10, eval_every=5, wpo=True)
    write_report(wpo_only)
    assert sorted(p.name for p in (wpo_only / "plots").iterdir()) == sorted(TRAIN_PLOTS + ["wpo_weight.png"])

    # A run that logged neither keeps the report it had: four training plots, no new caption or row.
    plain = tmp_path / "plain"
    write_metrics(plain, n_steps=10, eval_every=5)
    drawn.clear()
    html = write_report(plain).read_text()
    assert sorted(drawn) == sorted(TRAIN_PLOTS)
    assert sorted(p.name for p in (plain / "plots").iterdir()) == sorted(TRAIN_PLOTS)
    assert html.count("<figure") == len(TRAIN_PLOTS)
    for text in ("Entropy", "Mean logits", "WPO", "<td>entropy (", "<td>wpo/weight ("):
        assert text not in html


def test_report_without_evaluations_has_training_plots_only(tmp_path):
    write_metrics(tmp_path)
    html = write_report(tmp_path, smoothing=0.0).read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(TRAIN_PLOTS)
    assert "reward_kl.png" not in html and "<h2>Evaluations</h2>" not in html


@pytest.mark.parametrize("loss_yaml, caption", [
    ("", "Preference loss (DPO), nats per pair."),
    ("loss:\n  type: [sigmoid, sft]\n", "Preference loss (sigmoid + sft), nats per pair."),  # RPO
    # IPO's loss is a squared log-ratio gap and a hinge's a clipped one, neither in nats.
    ("loss:\n  type: [ipo, sft]\n", "Preference loss (ipo + sft), loss per pair."),
    ("loss:\n  type: hinge\n", "Preference loss (hinge), loss per pair."),
    ("loss:\n  type: sft\n", "NLL of the chosen responses, nats per token."),  # Preferred-FT
])
def test_the_loss_plot_names_the_runs_loss_and_its_unit(tmp_path, loss_yaml, caption):
    write_metrics(tmp_path)
    (tmp_path / "config.yaml").write_text("model: tiny\n" + loss_yaml)
    assert caption in write_report(tmp_path, smoothing=0.0).read_text()


def test_missing_keys_are_noted_and_their_panels_skipped(tmp_path):
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    html = write_report(tmp_path).read_text()
    assert (tmp_path / "plots" / "loss.png").exists()
    assert not (tmp_path / "plots" / "rewards.png").exists()
    note = re.search(r"has no training values for ([^;]*);", html)
    assert note and set(note.group(1).split(", ")) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "grad_norm", "learning_rate"}


def test_resumed_run_keeps_the_last_line_of_a_repeated_step(tmp_path):
    lines = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}, {"step": 2, "loss": 0.7},
             {"step": 2, "eval/loss": 0.75}, {"step": 3, "loss": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    metrics = load_metrics(tmp_path / "metrics.jsonl")
    steps, values = metrics.series("loss")
    assert steps.tolist() == [1, 2] and values.tolist() == [0.9, 0.7]  # null at step 3 skipped
    assert metrics.series("eval/loss")[1].tolist() == [0.75]


def test_frontier_from_a_list_of_evals(tmp_path):
    evals = [generate_eval(b, kl, r, w) for b, kl, r, w in
             [(0.05, 9.0, 2.0, 0.85), (0.1, 6.0, 1.6, 0.8), (0.5, 2.0, 0.8, 0.6)]]
    evals.append(generate_eval(None, 5.0, 0.7, 0.6, method="Preferred-FT"))
    evals.append({"kind": "generate", "label": "pi_sft", "kl": 0.0, "kl_se": 0.0,
                  "mean_reward": {"policy": 0.0}, "win_rate": 0.5, "n_prompts": 64})
    assert_real_picture(plot_frontier(evals, tmp_path / "frontier.png"))
    # Without an interval in the file, the win-rate plot rebuilds Wilson's from n_prompts.
    assert_real_picture(plot_win_rates(evals, tmp_path / "wins.png"))


def test_the_frontier_gives_kl_the_unit_the_tables_give_it(run_dir, monkeypatch):
    """The evaluations table and the CLI say KL in 'nats per response'; the plot's axis said 'nats
    per sequence', which reads as over prompt and response, for the same number."""
    drawn = _drawn_figures(monkeypatch)
    html = write_report(run_dir).read_text()
    assert "<th>KL ± se (nats per response)</th>" in html
    (ax,) = drawn["reward_kl.png"].axes
    assert ax.get_xlabel() == "KL(π ‖ π_ref), nats per response (estimated from samples)"


def test_the_win_rate_plot_keeps_its_title_and_axis_label_inside_beside_long_names(monkeypatch,
                                                                                   tmp_path):
    """A comparison names a row 'run: model (judge on prompts)'; beside such a name the title and
    the x label, centred on the narrowed axes, ran out of the picture and were cut off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    drawn = _drawn_figures(monkeypatch)
    long_name = "sweep/beta0.1: runs/beta0.1/final β=0.1 (reward:my_rewards.py:score on prompts.jsonl)"
    evals = [{**generate_eval(0.1, 6.0, 1.5, 0.8), "label": long_name},
             {**generate_eval(0.5, 2.0, 0.8, 0.65), "label": "beta0.5"}]
    plot_win_rates(evals, tmp_path / "win_rates.png")
    fig = drawn["win_rates.png"]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    assert any(t.get_text().startswith("Win rate against the reference (") for t in texts)
    assert any(t.get_text().startswith("win rate against the reference (") for t in texts)
    for text in texts:  # the title, the axis labels, the names: all of each in the picture
        box = text.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width, text.get_text()


def test_a_win_rate_without_an_interval_is_not_shown_as_a_certain_one(tmp_path, monkeypatch):
    """A record with a win rate but neither win_rate_ci nor n_prompts read '0.800 [0.800, 0.800]'
    in the table and a bar of zero width in the plot: a certainty no evaluation gives."""
    from test_report_compare import row

    drawn = _drawn_figures(monkeypatch)
    bare = {**generate_eval(0.1, 6.0, 1.5, 0.8), "win_rate_ci": None}
    del bare["n_prompts"]
    (tmp_path / "eval.json").write_text(json.dumps(bare))
    html = write_report(tmp_path).read_text()
    assert row(html, "DPO β=0.1")[3] == "0.800 (no interval)"
    (ax,) = drawn["win_rates.png"].axes
    assert "0.80 (no interval)" in [t.get_text() for t in ax.texts]
    # The comparison's row says the same.
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(bare))
        runs.append(tmp_path / name)
    compared = write_comparison(runs, tmp_path / "compare").read_text()
    assert row(compared, "win rate [95% CI] (reward:tests:length)") == ["0.800 (no interval)"] * 2


def test_ema_is_debiased_and_zero_means_raw():
    np.testing.assert_allclose(ema([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(ema([1.0, 3.0], 0.0), [1.0, 3.0])
    # (0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25) = 1.75 / 0.75
    assert ema([1.0, 3.0], 0.5)[1] == pytest.approx(1.75 / 0.75)
    with pytest.raises(UserError, match="smoothing"):
        ema([1.0], 1.0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no metrics"),
        ('{"loss": 0.7}\n', "record 1: no numeric 'step'"),
        ('{"step": 1, "speed": 3}\n', "none of the keys the report plots"),
        ('{"step": 1, "loss": 0.7}\n{oops\n', "line 2: not valid JSON"),
    ],
)
def test_broken_metrics_are_user_errors(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        write_report(tmp_path)


def test_empty_folder_and_bad_eval_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="neither metrics.jsonl nor any eval.json"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="no such run folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(UserError, match="eval.json, line 1: not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps({"kind": "pairs", "eval/loss": 0.5}))
    html = write_report(tmp_path).read_text()  # an eval-only folder still gets a report
    assert "No metrics.jsonl" in html and "<td>pairs</td>" in html


def test_run_text_cannot_inject_markup(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(
        {**generate_eval(0.1, 1.0, 1.0, 0.7), "label": "<script>alert(1)</script>"}))
    html = write_report(tmp_path).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_report_command(tmp_path):
    from typer.testing import CliRunner

    from preftune.report_cli import app

    # Evaluations only, so the command is tested without paying for the training plots again.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text(json.dumps(generate_eval(0.1, 6.0, 1.5, 0.8)))
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(generate_eval(1.0, 1.0, 0.4, 0.55)))
    result = CliRunner().invoke(app, [str(run_dir), "--eval", str(extra), "--smoothing", "0.3",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report: {tmp_path / 'out' / 'report.html'}"
    assert "<td>DPO β=1</td>" in (tmp_path / "out" / "report.html").read_text()
    assert (tmp_path / "out" / "plots" / "win_rates.png").exists()
    # Mistakes reach the top-level CLI as UserError, which prints them and exits 2.
    result = CliRunner().invoke(app, [str(tmp_path / "missing")])
    assert isinstance(result.exception, UserError)
    # --out naming a file was a NotADirectoryError traceback, for one run and for several.
    for runs in ([run_dir], [run_dir, tmp_path / "out"]):
        result = CliRunner().invoke(app, [*map(str, runs), "--out", str(extra)])
        assert isinstance(result.exception, UserError) and "is a file; name a folder" in str(result.exception)
    # It said "smoothing must be ...", not naming the option typed, for one run and for several.
    for runs in ([run_dir], [run_dir, run_dir]):
        result = CliRunner().invoke(app, [*map(str, runs), "--smoothing", "5", "--out", str(tmp_path / "o")])
        assert str(result.exception) == "--smoothing must be in [0, 1), got 5; 0 turns it off."


def test_evaluations_table_names_the_judge_and_data_and_waiting_votes(tmp_path):
    # Rows of one model judged differently, or on other prompts, must not read the same.
    human = {**generate_eval(0.1, 1.0, 1.0, 0.7), "judge": "human", "status": "awaiting_votes",
             "win_rate": None, "win_rate_ci": None, "prompts": "/data/prompts/held_out.txt"}
    reward = {**generate_eval(0.1, 1.0, 1.0, 0.7), "judge": "reward:/home/me/rm.py:score"}
    pairs = {"kind": "pairs", "model": "runs/b0.1/final", "data": "/data/dd", "split": "test",
             "eval/rewards/accuracies": 0.8}
    cooler = {**reward, "sampling": {"temperature": 0.5, "top_p": 1.0, "seed": 0, "top_k": 40}}
    (tmp_path / "eval.json").write_text(json.dumps({"evals": [human, reward, pairs, cooler]}))
    html = write_report(tmp_path).read_text()
    assert "<td>reward:rm.py:score at temperature 0.5, top-k 40</td>" in html
    assert "<td>human on held_out.txt</td>" in html and "<td>awaiting votes</td>" in html
    assert "<td>reward:rm.py:score</td>" in html and "<td>pairs of dd (test)</td>" in html


def test_reward_kl_frontier_never_mixes_judges_references_or_sampling(tmp_path, monkeypatch):
    # Rewards of two judges have different units, KL to two references or under two sampling
    # settings measure different things: each setting gets its own reward-KL figure.
    import preftune.report as report

    plotted = []
    draw = report.plot_frontier
    monkeypatch.setattr(report, "plot_frontier",
                        lambda evals, path, **kw: plotted.append(evals) or draw(evals, path, **kw))
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64}
    evals = [{**generate_eval(beta, kl, r, w), "sampling": {**sampling, "seed": beta}}
             for beta, kl, r, w in [(0.1, 6.0, 1.5, 0.8), (0.5, 2.0, 0.8, 0.65)]]
    evals += [{**evals[0], "judge": "reward:/rm/other.py:score", "mean_reward": {"policy": 40.0}},
              {**evals[1], "reference": "another-sft"},
              {**evals[1], "sampling": {**sampling, "temperature": 0.7}, "kl_note": "samples were "
               "drawn at temperature 0.7, not from the policy itself"}]
    (tmp_path / "eval.json").write_text(json.dumps({"evals": evals}))
    html = write_report(tmp_path).read_text()
    assert [[(e["judge"], e["reference"], e["sampling"]["temperature"]) for e in group]
            for group in plotted] == [
        [("reward:tests:length", "sft", 1.0)] * 2, [("reward:/rm/other.py:score", "sft", 1.0)],
        [("reward:tests:length", "another-sft", 1.0)], [("reward:tests:length", "sft", 0.7)]]
    for name in ("reward_kl.png", "reward_kl-2.png", "reward_kl-3.png", "reward_kl-4.png"):
        assert f'src="plots/{name}"' in html
    assert "Judge reward:other.py:score, reference sft." in html
    assert "Not KL(π ‖ π_ref) here: samples were drawn at temperature 0.7" in html


def test_win_rate_rows_of_one_model_judged_twice_are_told_apart():
    reward = generate_eval(0.1, 1.0, 1.0, 0.7)
    human = {**reward, "judge": "human", "prompts": "/data/held_out.txt"}
    other = generate_eval(0.5, 1.0, 1.0, 0.7)
    assert win_rate_labels([reward, human, other]) == [
        "DPO β=0.1 (reward:tests:length)", "DPO β=0.1 (human on held_out.txt)", "DPO β=0.5"]


def test_a_run_without_final_is_reported_as_unfinished(tmp_path):
    # Killed (or still training) at step 60: its report must not read as a finished run's.
    run = tmp_path / "run"
    write_metrics(run)
    (run / "config.yaml").write_text("loss: {type: sigmoid, beta: 0.1}\ntrain: {max_steps: 200}\n")
    html = write_report(run).read_text()
    assert f"No final/ in {run}: the run is still training or was stopped" in html
    assert "up to step 60" in html
    (run / "final").mkdir()
    assert "No final/" not in write_report(run).read_text()


def test_a_one_step_run_draws_its_points(tmp_path):
    # One training point is a line of length zero: without a marker its plots were empty axes.
    from matplotlib.figure import Figure

    from preftune.report import _curve

    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "loss": 0.69, "learning_rate": 1e-6, "rewards/chosen": 0.0}) + "\n")
    metrics = load_metrics(tmp_path / "metrics.jsonl")
    for key in ("loss", "learning_rate", "rewards/chosen"):
        for smoothing in (0.0, 0.6):
            ax = Figure().add_subplot()
            assert _curve(ax, metrics, key, key, "tab:blue", smoothing)
            (line,) = ax.get_lines()
            assert line.get_xydata().tolist() == [[1.0, metrics.train[0][key]]]
            assert line.get_marker() not in (None, "", " ", "None"), (key, smoothing)
    write_report(tmp_path)
    assert_real_picture(tmp_path / "plots" / "loss.png")


def test_evaluations_table_shows_the_token_wise_kl_and_an_older_record_without_it_still_reports(tmp_path):
    """eval.json files written before `kl_tokens` existed lack it: their cell reads '–'."""
    older = generate_eval(0.1, 6.0, 1.5, 0.8)
    newer = {**generate_eval(0.5, 2.0, 0.8, 0.65), "kl_tokens": 1.75, "kl_tokens_se": 0.05}
    (tmp_path / "eval.json").write_text(json.dumps({"evals": [older, newer]}))
    html = write_report(tmp_path).read_text()
    assert "<th>KL ± se (nats per response)</th><th>token-wise KL ± se (nats per response)</th>" in html

    def kl_cells(label):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", re.search(rf"<tr><td>{label}</td>(.*?)</tr>", html).group(1))
        return cells[5:7]  # after kind, judge, prompts, win rate, reward

    assert kl_cells("DPO β=0.1") == ["6 ± 0.3", "–"]
    assert kl_cells("DPO β=0.5") == ["2 ± 0.3", "1.75 ± 0.05"]
    assert_real_picture(tmp_path / "plots" / "reward_kl.png")  # the plot keeps using `kl`


def test_a_token_wise_kl_that_was_not_measured_says_so(tmp_path):
    """eval generate writes kl_tokens null, and prints 'token-wise none: the policy's and the
    reference's output layers differ in size', when it cannot measure it; the table showed '–', as
    for a record from before kl_tokens existed."""
    unmeasured = {**generate_eval(0.1, 6.0, 1.5, 0.8), "kl_tokens": None, "kl_tokens_se": None}
    (tmp_path / "eval.json").write_text(json.dumps(unmeasured))
    html = write_report(tmp_path).read_text()
    cells = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>DPO β=0.1</td>(.*?)</tr>", html).group(1))
    assert cells[5:7] == ["6 ± 0.3", "not measured (output layers differ in size)"]


def test_a_kl_of_one_prompt_says_it_has_no_standard_error(tmp_path):
    """A KL over a single prompt has no standard error (eval generate writes it null and prints the
    value alone); the table read '6 ± –', a dash where a number seemed lost."""
    one = {**generate_eval(0.1, 6.0, 1.5, 0.8), "n_prompts": 1, "kl_se": None,
           "kl_tokens": 5.5, "kl_tokens_se": None}
    (tmp_path / "eval.json").write_text(json.dumps(one))
    html = write_report(tmp_path).read_text()
    cells = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>DPO β=0.1</td>(.*?)</tr>", html).group(1))
    assert cells[5:7] == ["6 (no standard error)", "5.5 (no standard error)"]


def test_a_model_path_with_dollar_signs_is_drawn_as_written_not_as_tex(run_dir):
    """Win-rate rows and the reward-KL legend name a model by its path; matplotlib read the text
    between two '$' as TeX and stopped the report on 'r$\\q$' (unknown symbol \\q)."""
    evals = [{**generate_eval(0.1, 6.0, 1.5, 0.8), "method": None, "model": "runs/r$\\q$/final"}]
    html = write_report(run_dir, evals=evals).read_text()
    assert 'src="plots/win_rates.png"' in html and 'src="plots/reward_kl.png"' in html
    assert "r$\\q$/final β=0.1" in html  # the table, which is HTML, shows it as it is


def test_a_run_without_evaluations_says_so(tmp_path):
    """Without data.eval or data.eval_fraction the last evaluation column was all '–' and nothing
    said why; a run with eval/ lines gets no such note."""
    write_metrics(tmp_path / "plain", n_steps=10, eval_every=1000)
    html = write_report(tmp_path / "plain").read_text()
    assert ("metrics.jsonl has no eval/ lines (no data.eval or data.eval_fraction in training), so "
            "the plots have no evaluation curves and the last evaluation column is empty.") in html
    write_metrics(tmp_path / "evaluated", n_steps=10, eval_every=5)
    assert "has no eval/ lines" not in write_report(tmp_path / "evaluated").read_text()


def test_the_loss_caption_says_how_the_curve_is_smoothed(tmp_path):
    """With smoothing 0 there is no EMA, yet the caption spoke of faint raw lines and bold EMAs."""
    write_metrics(tmp_path / "run", n_steps=10, eval_every=5)
    html = write_report(tmp_path / "run", smoothing=0).read_text()
    assert "Lines are the raw per-step values, unsmoothed (smoothing 0).</figcaption>" in html
    assert "EMA" not in html
    html = write_report(tmp_path / "run", smoothing=0.8).read_text()
    assert "Faint lines are the raw per-step values, bold lines their EMA (weight 0.8)." in html


def test_a_log_axis_says_so_in_its_label(tmp_path, monkeypatch):
    """Gradient norms spanning decades get a log axis; its label says so, the linear one beside
    it does not."""
    drawn = _drawn_figures(monkeypatch)
    write_metrics(tmp_path, n_steps=10, eval_every=5)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lines[0]["grad_norm"] = 500.0  # an early spike, far above the others
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    write_report(tmp_path)
    grad_norm, learning_rate = drawn["optimization.png"].axes
    assert grad_norm.get_yscale() == "log"
    assert grad_norm.get_ylabel() == "global L2 norm of the gradient, log scale"
    assert learning_rate.get_ylabel() == "learning rate (per step)"


def test_a_pairs_evaluation_shows_its_held_out_loss_beside_its_accuracy(tmp_path):
    """`preftune eval pairs` writes eval/loss; the comparison showed it, one run's table did not."""
    pairs = {"kind": "pairs", "model": "run/final", "data": "run/eval_heldout.jsonl",
             "eval/rewards/accuracies": 0.75, "eval/loss": 0.5123}
    (tmp_path / "eval.json").write_text(json.dumps({"evals": [pairs]}))
    html = write_report(tmp_path).read_text()
    assert "<th>accuracy (fraction of pairs)</th><th>held-out loss (mean over pairs)</th>" in html
    (cells,) = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", html)
                if "eval_heldout.jsonl" in r]
    assert cells[8:10] == ["0.75", "0.5123"]


def test_a_pairs_evaluation_says_how_many_pairs_its_means_are_over(tmp_path):
    """The count column read 'prompts' and showed '–' for `eval pairs`, whose n_pairs was in the
    file: its accuracy and loss read as means over an unknown number of pairs."""
    pairs = {"kind": "pairs", "model": "run/final", "data": "run/eval_heldout.jsonl", "n_pairs": 8,
             "eval/rewards/accuracies": 0.75, "eval/loss": 0.5123}
    (tmp_path / "eval.json").write_text(json.dumps({"evals": [pairs, generate_eval(0.1, 6.0, 1.5, 0.8)]}))
    html = write_report(tmp_path).read_text()
    header = re.findall(r"<th>(.*?)</th>", html.split("<h2>Evaluations</h2>")[1])
    assert header[3] == "prompts or pairs"
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", html)
            if "<td>pairs</td>" in r or "<td>generate</td>" in r]
    assert [(cells[1], cells[3]) for cells in rows] == [("pairs", "8"), ("generate", "64")]


def _table_rows(html: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under `heading`, by their first cell."""
    table = html.split(f"<h2>{heading}</h2>")[1].split("</table>")[0]
    rows = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)]
    return {cells[0]: cells[1:] for cells in rows}


def test_final_metrics_give_each_numbers_unit_and_what_it_is_a_mean_over(tmp_path):
    """The table listed bare numbers (logps/chosen -197.7, rewards/margins 2.07): per token or per
    response, over what? Each row now names its unit, the columns what they are means over."""
    write_metrics(tmp_path, n_steps=10, eval_every=5)
    (tmp_path / "config.yaml").write_text("model:\n  path: tiny\nloss:\n  type: ipo\n  beta: 0.1\n")
    rows = _table_rows(write_report(tmp_path).read_text(), "Final metrics")
    assert list(rows)[:6] == [
        "metric (unit)", "step (optimizer step)",
        "loss (per pair, mean over pairs)",  # ipo's loss is no log-likelihood
        "rewards/accuracies (fraction of pairs)",
        "rewards/margins (chosen − rejected, β·log(π/π_ref), nats, mean over pairs)",
        "rewards/chosen (β·log(π/π_ref), nats, mean over pairs)"]
    assert rows["metric (unit)"] == ["last train step (its batch)", "last evaluation (held-out pairs)"]
    assert "logps/chosen (nats per response, mean over pairs)" in rows
    assert "grad_norm (global L2 norm, before clipping)" in rows
    assert all(name.endswith(")") and "()" not in name for name in rows), rows  # none without a unit
    (tmp_path / "config.yaml").write_text("model:\n  path: tiny\n")  # DPO by default
    rows = _table_rows(write_report(tmp_path).read_text(), "Final metrics")
    assert "loss (nats per pair, mean over pairs)" in rows
    # sft's loss is per token of each chosen response, and still a mean over pairs (it said not).
    (tmp_path / "config.yaml").write_text("model:\n  path: tiny\nloss:\n  type: sft\n")
    rows = _table_rows(write_report(tmp_path).read_text(), "Final metrics")
    assert "loss (nats per token, mean over pairs)" in rows


def test_a_last_step_that_was_not_finite_says_so_not_a_dash(tmp_path):
    """The logger writes a NaN or inf as null; the table showed '–', as for a metric never logged."""
    write_metrics(tmp_path, n_steps=10, eval_every=5)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_train = [line for line in lines if "loss" in line][-1]
    last_train["loss"] = last_train["grad_norm"] = None
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = _table_rows(write_report(tmp_path).read_text(), "Final metrics")
    assert rows["loss (nats per pair, mean over pairs)"] == ["not finite", f"{0.69 - 0.3:.4g}"]
    assert rows["grad_norm (global L2 norm, before clipping)"] == ["not finite", "–"]  # not evaluated


def test_config_highlights_show_a_lora_run_and_values_as_yaml_writes_them(tmp_path):
    """model.lora was listed, yet flattened to model.lora.r etc. it never matched, so a LoRA run
    read as a full fine-tune; a loss mixture read "['sigmoid', 'sft']"."""
    write_metrics(tmp_path, n_steps=10, eval_every=5)
    (tmp_path / "config.yaml").write_text(
        "model:\n  path: tiny\n  lora:\n    r: 8\n    target_modules: [q_proj, v_proj]\n"
        "loss:\n  type: [sigmoid, sft]\n  weights: [1.0, 0.5]\n"
        "train:\n  eval_every: 5\n")
    rows = _table_rows(write_report(tmp_path).read_text(), "Config highlights")
    assert rows["model.lora.r"] == ["8"]
    assert rows["model.lora.target_modules"] == ["q_proj, v_proj"]
    assert rows["loss.type"] == ["sigmoid, sft"]
    assert rows["loss.weights"] == ["1, 0.5"]
    assert rows["train.eval_every"] == ["5"]


def test_the_mean_length_column_says_its_unit_is_tokens(tmp_path):
    """`preftune eval generate` prints lengths in tokens; the table's column gave no unit."""
    (tmp_path / "eval.json").write_text(json.dumps({"evals": [generate_eval(0.1, 6.0, 1.5, 0.8)]}))
    html = write_report(tmp_path).read_text()
    assert "<th>mean length, tokens (policy / ref)</th>" in html
    assert re.search(r"<td[^>]*>30 / 28</td>", html)


def test_step_axes_have_whole_number_ticks(tmp_path, monkeypatch):
    """Steps are integers; a short run's axis was ticked at 1.5, 2.5."""
    drawn = _drawn_figures(monkeypatch)
    write_metrics(tmp_path, n_steps=3, eval_every=3)
    write_report(tmp_path)
    for name in ("loss.png", "rewards.png", "accuracy_margins.png", "optimization.png"):
        for ax in drawn[name].axes:
            ticks = ax.get_xticks()
            assert ticks.size >= 2 and all(t == int(t) for t in ticks), (name, ticks)



def test_a_one_step_run_is_ticked_at_its_step(tmp_path, monkeypatch):
    """A run of one step: MaxNLocator found no two whole numbers around it and ticked the step
    axis at 0.96, 0.975, ..., 1.05."""
    drawn = _drawn_figures(monkeypatch)
    write_metrics(tmp_path, n_steps=1, eval_every=1)
    write_report(tmp_path)
    for name in ("loss.png", "rewards.png", "accuracy_margins.png", "optimization.png"):
        for ax in drawn[name].axes:
            assert list(ax.get_xticks()) == [1], name


def test_a_curve_too_short_to_smooth_is_not_called_an_ema(tmp_path, monkeypatch):
    """Curves of 2 steps or fewer are drawn raw; the loss caption still spoke of an EMA."""
    drawn = _drawn_figures(monkeypatch)
    write_metrics(tmp_path, n_steps=2, eval_every=1000)
    html = write_report(tmp_path, smoothing=0.6).read_text()
    assert "Lines are the raw per-step values, unsmoothed: 2 steps or fewer are too few for an EMA." in html
    assert "EMA (weight" not in html
    (ax,) = drawn["loss.png"].axes
    assert list(_named_lines(ax)) == ["loss, train"]  # one raw line, no EMA in the legend


@pytest.mark.parametrize("compared", [False, True], ids=["one run", "runs compared"])
def test_a_full_disk_while_rewriting_a_report_keeps_the_earlier_one_and_says_so(run_dir, tmp_path, monkeypatch,
                                                                              compared):
    # report.html and the plots were written in place: a full disk (or a kill) left half of
    # them over the earlier report, and printed an OSError traceback.
    import errno
    import os
    import shutil

    from typer.testing import CliRunner

    from preftune.cli import app

    if compared:
        shutil.copytree(run_dir, tmp_path / "other")
        args, out = [str(run_dir), str(tmp_path / "other"), "--out", str(tmp_path / "both")], tmp_path / "both"
    else:
        args, out = [str(run_dir)], run_dir
    assert CliRunner().invoke(app, ["report", *args]).exit_code == 0
    earlier = {p.name: p.read_bytes() for p in [out / "report.html", *(out / "plots").iterdir()]}

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert re.fullmatch(r"error: out of disk space while writing \S+\.png; any earlier \w+\.png there is "
                        r"unchanged; free some space and run the command again\.", message), message
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in [out / "report.html", *(out / "plots").iterdir()]} == earlier
