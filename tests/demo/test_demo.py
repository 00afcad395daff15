"""`preftune demo` at --quick size end to end, its resume, its checks, and the --human flow over HTTP."""

import dataclasses
import json
import os
import re
import shutil
import socket
import threading
import time

import httpx
import pytest
from preftune_test_data import torch_threads
from typer.testing import CliRunner

from preftune.cli import app
from preftune.demo import world
from preftune.demo.cli import parse_betas
from preftune.demo.pipeline import QUICK_SIZES, DemoPaths, HumanLabeling, planned_runs, run_demo
from preftune.demo.summary import SUMMARY_KEYS, dpo_reward_at, failed_checks, result_checks
from preftune.errors import UserError
from preftune.labeling.store import Store


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The demo's default (--threads 1); restore the process setting for other tests."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `preftune demo --quick` run, shared by the tests that read its outputs. Its --out is
    relative, as `make demo`'s runs/demo is: paths recorded on the way must still match."""
    root = tmp_path_factory.mktemp("demo")
    started = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, ["demo", "--quick", "--out", "out"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == expected_status(root / "out"), result.output
    return root / "out", result.output, time.perf_counter() - started


def expected_status(out) -> int:
    """--quick's claims may fail (its numbers are not README's); the demo then exits 1."""
    return 1 if failed_checks(json.loads((out / "demo.json").read_text())) else 0


def test_quick_demo_shows_dpo_beats_pi_sft(quick_demo):
    out, _, _ = quick_demo
    summary = json.loads((out / "demo.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    pi_sft, *models = summary["results"]
    assert pi_sft["method"] == "pi_sft" and pi_sft["kl"] == 0.0
    dpo = [r for r in models if r["method"] == "DPO"]
    assert [r["beta"] for r in dpo] == list(QUICK_SIZES.betas)
    assert [r["method"] for r in models][-1] == "Preferred-FT"
    for row in dpo:
        assert row["mean_reward"] > pi_sft["mean_reward"]
        assert row["win_rate"] > 0.5
        assert row["kl"] > 0
        assert row["n_prompts"] == QUICK_SIZES.heldout_prompts
    assert {c["claim"] for c in summary["checks"]} and all(
        isinstance(c["holds"], bool) for c in summary["checks"])
    for example in summary["examples"]:  # the stored rewards are the latent reward's
        assert example["dpo_reward"] == pytest.approx(
            world.sentiment_reward(example["prompt"], example["dpo"]))


def test_quick_demo_keeps_every_artefact(quick_demo):
    out, _, _ = quick_demo
    paths = DemoPaths(out)
    for path in (paths.pi_sft / "config.json", paths.pi_sft / "pretrain.json", paths.pairs,
                 paths.dataset, paths.train_prompts, paths.heldout_prompts, paths.report,
                 out / "plots" / "reward_kl.png", out / "plots" / "win_rates.png"):
        assert path.is_file(), path
    assert len(paths.pairs.read_text().splitlines()) == QUICK_SIZES.train_prompts
    rows = [json.loads(line) for line in paths.dataset.read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected", "r1", "r2", "p"} <= set(r) for r in rows)
    for run in planned_runs(paths, QUICK_SIZES.betas):
        for name in ("metrics.jsonl", "config.yaml", "report.html", "final/eval.json",
                     "final/samples.jsonl"):
            assert (run.folder / name).is_file(), run.folder / name
        samples = [json.loads(line) for line in (run.final / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == QUICK_SIZES.heldout_prompts
    html = paths.report.read_text()
    assert "plots/reward_kl.png" in html and "dpo-beta0.1" in html and "_loss.png" in html


def test_quick_demo_prints_steps_table_examples_and_report(quick_demo):
    out, output, _ = quick_demo
    for step in range(1, 8):
        assert f"[{step}/7]" in output
    assert re.search(r"\d+\.\d s", output), "each step says how long it took"
    assert "pi_sft" in output and "dpo-beta0.1" in output and "preferred-ft" in output
    assert "Sample continuations" in output
    assert "report: out/report.html" in output.replace("\n", "")  # as the user named the folder


def test_rerun_resumes_without_redoing_any_step(quick_demo):
    out, _, first_seconds = quick_demo
    before = json.loads((out / "demo.json").read_text())["results"]
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == expected_status(out), result.output
    assert "kept the pi_sft already" in result.output
    assert "0 pairs sampled" in result.output
    assert "kept the evaluations already there" in result.output
    # The folder is named from elsewhere this time (absolute, not relative): the same results.
    def without_folders(results):
        return [{k: v for k, v in row.items() if k != "folder"} for row in results]

    assert without_folders(json.loads((out / "demo.json").read_text())["results"]) == without_folders(before)
    assert time.perf_counter() - started < first_seconds / 2


def test_full_size_folder_refuses_a_quick_pi_sft(quick_demo, tmp_path):
    out, _, _ = quick_demo
    shutil.copytree(out / "pi_sft", tmp_path / "pi_sft")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--betas", "0.1"])
    assert result.exit_code == 2 and "trained with other settings" in result.output


def test_parse_betas():
    assert parse_betas("0.05,0.1, 0.5") == (0.05, 0.1, 0.5)
    assert parse_betas("0.1,0.1") == (0.1,)
    for bad in ("", "0", "-1", "abc", "0.1,nan", "inf"):
        with pytest.raises(UserError):
            parse_betas(bad)


def test_dpo_reward_at_interpolates_between_betas():
    dpo = [{"kl": 2.0, "mean_reward": 1.0}, {"kl": 6.0, "mean_reward": 3.0}]
    assert dpo_reward_at(dpo, 4.0) == pytest.approx(2.0)  # half way from (2, 1) to (6, 3)
    assert dpo_reward_at(dpo, 9.0) == 3.0  # beyond every DPO run's KL: the best DPO reward
    # below the smallest DPO KL: on the line from pi_sft (KL 0, reward 0) to the first run
    assert dpo_reward_at(dpo, 1.0, origin=(0.0, 0.0)) == pytest.approx(0.5)


def test_checks_fail_when_dpo_loses():
    pi_sft = {"model": "pi_sft", "method": "pi_sft", "mean_reward": 0.0, "mean_reward_se": 0.1,
              "kl": 0.0}
    dpo = {"model": "dpo", "method": "DPO", "mean_reward": 0.1, "mean_reward_se": 0.1,
           "win_rate": 0.6, "kl": 1.0}
    pft = {"model": "preferred-ft", "method": "Preferred-FT", "mean_reward": 0.5, "kl": 1.0}
    assert [c["holds"] for c in result_checks([pi_sft, dpo, pft])] == [False, False, False]
    dpo.update(mean_reward=2.0, win_rate=0.8)
    assert [c["holds"] for c in result_checks([pi_sft, dpo, pft])] == [True, True, True]



def _summary_with_checks(holds: list[bool]) -> dict:
    pi_sft = {"model": "pi_sft", "method": "pi_sft", "beta": None, "mean_reward": 0.0,
              "mean_reward_se": 0.1, "win_rate": None, "win_rate_ci": None, "kl": 0.0,
              "kl_se": 0.0, "mean_length": 10.0, "n_prompts": 4}
    return {"results": [pi_sft], "examples": [], "report": "/elsewhere/report.html",
            "checks": [{"claim": f"claim {i}", "holds": h} for i, h in enumerate(holds)]}


@pytest.mark.parametrize(("holds", "status"), [([True, True], 0), ([True, False, False], 1)])
def test_demo_exits_1_when_a_check_fails(monkeypatch, tmp_path, holds, status):
    """So `make demo` fails on a claim that does not hold; the summary is printed all the same."""
    import preftune.demo.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_demo", lambda *args, **kwargs: _summary_with_checks(holds))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == status, result.output
    lines = result.output.strip().splitlines()
    assert f"summary: {out / 'demo.json'}" in lines
    if status:
        assert lines[-1] == f"2 of 3 checks failed (NO above); see {out / 'report.html'}"
    else:
        assert lines[-1] == f"summary: {out / 'demo.json'}"



def test_printed_paths_stay_whole_however_long_and_keep_their_brackets(monkeypatch, tmp_path):
    """A path rich broke at the console's width, or whose "[exp1]" it took for a style, could
    not be copied or clicked."""
    import preftune.demo.pipeline as pipeline

    out = tmp_path / "[exp1]" / ("a-long-folder-name-" * 8)

    def fake_demo(*args, echo, **kwargs):
        echo(f"      kept the pi_sft already in {out / 'pi_sft'}")
        return _summary_with_checks([False])

    monkeypatch.setattr(pipeline, "run_demo", fake_demo)
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.rstrip().splitlines()
    assert f"      kept the pi_sft already in {out / 'pi_sft'}" in lines
    assert f"report: {out / 'report.html'}" in lines and f"summary: {out / 'demo.json'}" in lines
    assert lines[-1] == f"1 of 1 checks failed (NO above); see {out / 'report.html'}"


def test_reward_kl_plot_draws_dpo_from_pi_sft_through_the_betas(monkeypatch, tmp_path):
    """README's frontier and the third check start DPO's line at pi_sft (KL 0); so does the plot."""
    import numpy as np

    import preftune.report as report
    from preftune.demo.demo_report import draw_figures

    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.setdefault(path.name, fig))

    def evaluation(method, beta, kl, reward):
        return {"method": method, "beta": beta, "label": f"{method}-{beta}", "kl": kl,
                "kl_se": 0.1, "mean_reward": {"policy": reward, "reference": 0.07},
                "mean_reward_se": {"policy": 0.1, "reference": 0.14}, "win_rate": 0.8,
                "win_rate_ci": [0.7, 0.9], "n_prompts": 16}

    evals = [evaluation("DPO", 0.1, 10.11, 3.60), evaluation("DPO", 1.0, 1.57, 2.46),
             evaluation("DPO", 0.5, 2.92, 2.98), evaluation("Preferred-FT", None, 0.62, 0.56)]
    draw_figures(DemoPaths(tmp_path), [], evals)
    (ax,) = figures["reward_kl.png"].axes
    lines = [np.column_stack(line.get_data()).tolist() for line in ax.get_lines()]
    assert [[0.0, 0.07], [1.57, 2.46], [2.92, 2.98], [10.11, 3.60]] in lines


# ------------------------------------------------------------------ --human


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vote_as_the_latent_reward(link: str, n: int) -> int:
    """Log in through the printed link and pick the higher-r* side of `n` pairs, over HTTP."""
    base = link.split("/login")[0]
    votes = 0
    with httpx.Client(base_url=base, timeout=10, follow_redirects=True) as client:
        # The link asks "Sign in as researcher?"; its button POSTs, then redirects to the page.
        assert client.post(link.removeprefix(base)).status_code == 200
        while votes < n:
            pair = client.get("/api/next").json()["pair"]
            left, right = (world.sentiment_reward(pair["prompt"], pair[side])
                           for side in ("left", "right"))
            response = client.post("/api/vote", json={
                "pair_id": pair["pair_id"], "choice": "left" if left >= right else "right",
                "key": f"vote-{votes:06d}"})
            assert response.json()["saved"] is True
            votes += 1
    return votes


def test_human_demo_labels_over_http_then_trains_and_evaluates(quick_demo, tmp_path):
    out, _, _ = quick_demo
    shutil.copytree(out / "pi_sft", tmp_path / "pi_sft")  # step 2 is kept; the rest runs
    lines: list[str] = []
    settings = HumanLabeling(port=_free_port(), target=QUICK_SIZES.batch_size, wait_for_enter=False)
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_demo(tmp_path, QUICK_SIZES, echo=lines.append, progress=False,
                                         human=settings)
        except Exception as e:  # noqa: BLE001 - any failure in the thread is reported below
            result["error"] = e

    demo = threading.Thread(target=run, daemon=True)
    demo.start()
    deadline = time.monotonic() + 120
    while not any("/login?token=" in line for line in lines):
        assert demo.is_alive() and time.monotonic() < deadline, (result, lines)
        time.sleep(0.1)
    link = next(re.search(r"http://\S+/login\?token=\S+", line).group(0)
                for line in lines if "/login?token=" in line)
    _vote_as_the_latent_reward(link, settings.target)
    demo.join(timeout=180)
    assert not demo.is_alive() and "error" not in result, result.get("error")
    rows = [json.loads(line) for line in (tmp_path / "D.jsonl").read_text().splitlines()]
    assert len(rows) == settings.target and all(r["votes"] == 1 for r in rows)
    for row in rows:  # the exported preference is the one voted for
        assert (world.sentiment_reward(row["prompt"], row["chosen"])
                >= world.sentiment_reward(row["prompt"], row["rejected"]))
    assert (tmp_path / "labels.sqlite").is_file() and (tmp_path / "report.html").is_file()
    # The pairs nobody voted on are listed, not lost, and the demo says where.
    left_out = (tmp_path / "D.left_out.jsonl").read_text().splitlines()
    assert len(left_out) + len(rows) == QUICK_SIZES.train_prompts
    assert any(f"others are listed in {tmp_path / 'D.left_out.jsonl'}" in line for line in lines)
    assert result["summary"]["results"][1]["n_prompts"] == QUICK_SIZES.heldout_prompts
    with pytest.raises(httpx.TransportError):  # the server stopped once the votes were in
        httpx.get(link.split("/login")[0] + "/healthz", timeout=2)


def test_too_few_human_preferences_stop_the_demo_and_keep_the_votes(quick_demo, tmp_path):
    from preftune.demo.human import label_with_people

    out, _, _ = quick_demo
    settings = HumanLabeling(port=_free_port(), target=2, wait_for_enter=False)
    lines: list[str] = []
    errors: list[Exception] = []

    def label() -> None:
        try:
            label_with_people(out / "pairs.jsonl", tmp_path / "labels.sqlite", tmp_path / "D.jsonl",
                              settings, echo=lines.append, min_pairs=5)
        except UserError as e:
            errors.append(e)

    worker = threading.Thread(target=label, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while not any("/login?token=" in line for line in lines):
        assert worker.is_alive() and time.monotonic() < deadline, lines
        time.sleep(0.05)
    link = re.search(r"http://\S+/login\?token=\S+", "\n".join(lines)).group(0)
    _vote_as_the_latent_reward(link, 2)
    worker.join(timeout=30)
    assert errors and "only 2 pairs have a preference" in str(errors[0])
    assert not (tmp_path / "D.jsonl").exists()  # a rerun serves the pairs again
    assert not (tmp_path / "D.left_out.jsonl").exists()  # no list of the pairs left out of no D
    store = Store(tmp_path / "labels.sqlite", must_exist=True)
    try:  # the demo serves each pair to its one person: `label status` counts what is left against 1
        assert store.recorded_overlap() == 1
    finally:
        store.close()


def test_human_labeling_offers_enter_only_when_stdin_is_a_terminal(quick_demo, tmp_path):
    """With stdin redirected or closed Enter cannot be read; the demo must not promise it."""
    from preftune.demo.human import label_with_people

    out, _, _ = quick_demo
    settings = HumanLabeling(port=_free_port(), target=1, wait_for_enter=True)
    lines: list[str] = []
    worker = threading.Thread(target=lambda: label_with_people(
        out / "pairs.jsonl", tmp_path / "labels.sqlite", tmp_path / "D.jsonl", settings,
        echo=lines.append), daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while not any("the demo continues after" in line for line in lines):
        assert worker.is_alive() and time.monotonic() < deadline, lines
        time.sleep(0.05)
    link = re.search(r"http://\S+/login\?token=\S+", "\n".join(lines)).group(0)
    _vote_as_the_latent_reward(link, 1)
    worker.join(timeout=30)
    assert "      the demo continues after 1 pairs" in lines, lines  # pytest's stdin: no terminal


def test_human_labeling_refuses_addresses_other_machines_reach(tmp_path):
    from preftune.demo.human import label_with_people

    with pytest.raises(UserError, match="this machine only"):
        label_with_people(tmp_path / "pairs.jsonl", tmp_path / "labels.sqlite",
                          tmp_path / "D.jsonl", HumanLabeling(host="0.0.0.0"))


# ------------------------------------------------------------------ options, folder, stops


def _with_pi_sft(source, target):
    """An earlier demo's folder stopped after step 2 (pairs record pi_sft's path, so they are
    sampled again here, in a second)."""
    shutil.copytree(source / "pi_sft", target / "pi_sft")


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "a-file"], "is a file"),
    (["--out", "a-file/sub"], "is inside a-file, a file"),
    (["--out", "other"], "already holds other files (notes.txt) and no earlier demo"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--seed", str(2**32)], "--seed must be between 0 and"),
    (["--target", "100"], "--target only applies to --human"),
    (["--human", "--target", "3"], "--target must be at least 16"),
    (["--human", "--port", "70000"], "--port must be between 1 and 65535"),
])
def test_bad_options_are_one_sentence_before_any_work(tmp_path, args, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(app, ["demo", "--quick", "--out", "new", *args])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "other" / "pi_sft").exists()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_demo_json_paths_are_absolute_and_print_as_typed(quick_demo):
    out, output, _ = quick_demo  # --out was the relative "out"
    summary = json.loads((out / "demo.json").read_text())
    artefacts = summary["artefacts"]
    paths = [summary["report"], artefacts["pi_sft"], artefacts["pairs"], artefacts["D"],
             *artefacts["prompts"], *artefacts["runs"].values(), *artefacts["evals"].values(),
             *artefacts["samples"].values(), *(row["folder"] for row in summary["results"])]
    assert all(os.path.isabs(p) and os.path.exists(p) for p in paths), paths
    assert "report: out/report.html" in output.replace("\n", "")


def test_stopped_training_resumes_from_its_checkpoint(quick_demo, tmp_path, monkeypatch):
    """SIGTERM during a DPO run: the demo stops there (exit 130, one message), keeps the run's
    checkpoint, and the same command resumes it; the result is the uninterrupted demo's."""
    import signal

    import preftune.train

    out, _, _ = quick_demo
    _with_pi_sft(out, tmp_path)
    real_step, calls = preftune.train.train_step, []

    def step_then_terminate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # train finishes this step and checkpoints
        return real_step(*args, **kwargs)

    monkeypatch.setattr(preftune.train, "train_step", step_then_terminate)
    command = ["demo", "--quick", "--out", str(tmp_path)]
    stopped = CliRunner().invoke(app, command)
    assert stopped.exit_code == 130, stopped.output
    assert "stopped during step 5/7" in stopped.output and "Run the same command again" in stopped.output
    run = planned_runs(DemoPaths(tmp_path), QUICK_SIZES.betas)[0]
    assert (run.folder / "checkpoints" / "step-000003").is_dir() and not run.final.exists()
    assert not (tmp_path / "runs" / "preferred-ft").exists()  # the stop stopped the demo

    monkeypatch.setattr(preftune.train, "train_step", real_step)
    resumed = CliRunner().invoke(app, command)
    assert resumed.exit_code == expected_status(tmp_path), resumed.output
    assert "Continuing the demo in" in resumed.output
    assert f"{run.name}: " in resumed.output and "resumed from step-000003" in resumed.output
    final = run.final / "model.safetensors"
    assert final.read_bytes() == (out / "runs" / run.name / "final" / "model.safetensors").read_bytes()

    def numbers(folder):
        return [{k: v for k, v in row.items() if k != "folder"}
                for row in json.loads((folder / "demo.json").read_text())["results"]]

    assert numbers(tmp_path) == numbers(out)


def test_ctrl_c_outside_training_says_where_it_stopped(quick_demo, tmp_path, monkeypatch):
    import preftune.demo.pipeline as pipeline

    out, _, _ = quick_demo
    _with_pi_sft(out, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "label_pairs_step", interrupted)
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 130, result.output
    assert "stopped during step 4/7" in result.output
    assert "Run the same command again to continue: preftune demo" in result.output
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == QUICK_SIZES.train_prompts
    assert not (tmp_path / "D.jsonl").exists()  # step 3 is kept, step 4 never ran


def test_sigterm_outside_training_stops_with_the_same_message(quick_demo, tmp_path):
    """A real SIGTERM in another process (without the fix it would end it without a word)."""
    import subprocess
    import sys

    out, _, _ = quick_demo
    _with_pi_sft(out, tmp_path)
    script = ("import os, signal, sys, time\n"
              "import preftune.demo.pipeline as p\n"
              "def terminated(*a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "p.sample_pairs_step = terminated\n"
              "from preftune.cli import main\n"
              f"sys.argv = ['preftune', 'demo', '--quick', '--out', {str(tmp_path)!r}]\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "stopped during step 3/7" in done.stdout


def test_other_seed_is_refused_before_the_prompt_files_change(quick_demo, tmp_path):
    out, _, _ = quick_demo
    _with_pi_sft(out, tmp_path)
    for name in ("prompts_train.jsonl", "prompts_heldout.jsonl"):
        shutil.copy2(out / name, tmp_path / name)
    result = CliRunner().invoke(app, ["demo", "--quick", "--seed", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "trained with other settings" in result.output
    for name in ("prompts_train.jsonl", "prompts_heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_votes_of_a_human_demo_are_not_relabelled_by_machine(quick_demo, tmp_path):
    out, _, _ = quick_demo
    _with_pi_sft(out, tmp_path)
    rows = [dict(json.loads(line), votes=1) for line in (out / "D.jsonl").read_text().splitlines()]
    (tmp_path / "D.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "holds your votes from a `preftune demo --human` run; add --human" in result.output


def test_a_moved_demo_folder_is_refused_in_one_sentence(quick_demo, tmp_path):
    out, _, _ = quick_demo
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(moved)])
    assert result.exit_code == 2, result.output
    text = result.output.replace("\n", "")
    assert f"holds a demo made in {out.resolve()} (its pairs.jsonl names pi_sft there)" in text
    assert "Continuing" not in text


def test_votes_of_a_stopped_human_demo_are_not_replaced_by_machine_labels(quick_demo, tmp_path):
    from preftune.labeling.pairs import load_pairs
    from preftune.labeling.store import Store

    out, _, _ = quick_demo
    _with_pi_sft(out, tmp_path)
    store = Store(tmp_path / "labels.sqlite", overlap=1)  # a --human run stopped after one vote
    try:
        store.add_pairs(load_pairs(out / "pairs.jsonl", for_people=True))
        store.add_annotator("researcher")
        person = store.open_annotator()
        store.record_vote(person, store.next_pair(person)["pair_id"], "left", None, "k1")
    finally:
        store.close()
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "labels.sqlite holds your votes on 1 pair from" in result.output.replace("\n", "")
    assert not (tmp_path / "D.jsonl").exists()


def test_a_run_report_older_than_its_evaluation_is_refreshed(quick_demo, tmp_path):
    from preftune.demo.pipeline import refresh_run_reports

    out, _, _ = quick_demo
    run = planned_runs(DemoPaths(out), QUICK_SIZES.betas)[0]
    copy = dataclasses.replace(run, folder=tmp_path / run.name)
    shutil.copytree(run.folder, copy.folder, ignore=shutil.ignore_patterns("reference_logps"))
    (copy.folder / "report.html").write_text("<p>written before the evaluation</p>")
    os.utime(copy.folder / "report.html", ns=(0, 0))
    assert refresh_run_reports([copy]) == [copy.name]
    assert "Win rates" in (copy.folder / "report.html").read_text()
    assert refresh_run_reports([copy]) == []  # up to date now: a rerun leaves it alone


# ------------------------------------------------------------------ preftune report on demo output


def test_report_refuses_a_file_and_the_demo_folder_itself(quick_demo, tmp_path):
    out, _, _ = quick_demo
    before = (out / "report.html").read_bytes()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "is a `preftune demo` folder" in result.output, result.output
    assert (out / "report.html").read_bytes() == before  # the demo's page is still the demo's
    result = CliRunner().invoke(app, ["report", str(out / "runs" / "dpo-beta0.1" / "metrics.jsonl")])
    assert result.exit_code == 2 and "is a file, not a run folder; pass its folder" in result.output
    # elsewhere, every evaluation of the demo in one generic page is fine
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path)])
    assert result.exit_code == 0 and "Win rates" in (tmp_path / "report.html").read_text()


def test_report_of_a_folder_with_neither_metrics_nor_evals_is_one_sentence(tmp_path):
    (tmp_path / "notes.json").write_text("{}")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither metrics.jsonl nor any eval.json" in result.output
    assert "Traceback" not in result.output


def test_a_full_disk_while_writing_the_prompt_files_is_one_sentence(tmp_path, monkeypatch):
    # Step 1 wrote the prompt files in place: a full disk printed an OSError traceback.
    import errno

    from preftune.demo.pipeline import write_prompts

    paths = DemoPaths(tmp_path / "demo")
    write_prompts(paths, QUICK_SIZES)
    earlier = paths.train_prompts.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match=rf"out of disk space while writing .*{paths.train_prompts.name}; "
                                        "any earlier .* there is unchanged; free some space and run the command again"):
        write_prompts(paths, QUICK_SIZES)
    assert paths.train_prompts.read_bytes() == earlier
