"""What a person watching a run sees and keeps: the logged learning rate, the console lines,
the closing summary."""

import math

import pytest
from preftune_test_data import make_config, read_metrics

import preftune.train as train_module
from preftune.train import train


def _record_used_rates(monkeypatch) -> list[float]:
    """The learning rate of every optimizer.step() the run takes, as the optimizer sees it."""
    used: list[float] = []
    build = train_module.build_optimizer

    def recording(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording)
    return used


@pytest.mark.parametrize("scheduler, warmup, multipliers", [
    # 2 warmup steps ((i + 1) / 3), then decay over the 4 steps left: i = 2..5 of 6.
    ("linear", 2, [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", 2, [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                   0.5 * (1 + math.cos(3 * math.pi / 4))]),
    # A share below 1: 0.25 of 6 steps is 1.5, rounded up to the same 2 warmup steps.
    ("linear", 0.25, [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
])
def test_logged_learning_rate_is_the_rate_the_step_used(tmp_path, tiny_llama, pairs_file, monkeypatch,
                                                        one_torch_thread, scheduler, warmup, multipliers):
    # HF's Trainer logs the rate the optimizer step used; logging the one after
    # scheduler.step() shifts the curve a step early (a first step at twice its warmup rate,
    # and a last step at 0 that never trains).
    used = _record_used_rates(monkeypatch)
    lr = 1e-3
    train(make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 6},
                      optim={"lr": lr, "scheduler": scheduler, "warmup_steps": warmup}))
    logged = [m["learning_rate"] for m in read_metrics(tmp_path / "run", "learning_rate")]
    assert used == pytest.approx([lr * m for m in multipliers], rel=1e-9)
    assert logged == pytest.approx(used, rel=1e-9)


def test_a_log_file_gets_a_plain_progress_line_per_interval(monkeypatch, capsys):
    # Not a terminal: a live bar cannot redraw, so plain lines, at the first step, then at most
    # one per interval, then at the last; each with throughput and the time left.
    import preftune.progress as progress_module

    clock = iter(float(t) for t in range(0, 1000, 10))  # each call 10 s later
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    with progress_module.TrainProgress(10, interactive=False, every_s=30) as bar:
        for step in range(1, 11):
            bar.update(step, {"loss": 0.5, "rewards/accuracies": 0.75, "tokens_per_second": 1000.0 * step})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == \
        ["train: step 1/10 (10%)", "train: step 4/10 (40%)", "train: step 7/10 (70%)", "train: step 10/10 (100%)"]
    # Step 4: 40 s since the start for 4 steps, 6 to go; tokens/s the mean of steps 2-4.
    assert lines[1] == "train: step 4/10 (40%), loss 0.5000, acc 0.75, 3.0k tok/s, 0:00:40 elapsed, about 0:01:00 left"
    assert "left" not in lines[-1]


def test_a_piped_run_shows_progress_lines_and_ends_saying_where_its_metrics_are(
        tmp_path, tiny_llama, pairs_file, capsys, one_torch_thread):
    train(make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 2, "progress": True}))
    out = capsys.readouterr().out
    assert "train: step 1/2 (50%), loss 0.6931" in out and "train: step 2/2 (100%)" in out
    assert "tok/s" in out and "━" not in out  # no bar drawn into a log file
    assert f"metrics: {tmp_path / 'run' / 'metrics.jsonl'}" in out
    assert f"final policy: {tmp_path / 'run' / 'final'}" in out


def test_a_logger_package_that_is_missing_stops_the_run_before_the_model_loads(
        tmp_path, tiny_llama, pairs_file, monkeypatch):
    # Found when the logger opened, after the model, the data and (with model.reference:
    # precompute) the reference's pass over the whole data set: minutes to hours spent first.
    import sys

    from preftune.errors import UserError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now fails

    def load_causal_lm(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing logger was noticed")

    monkeypatch.setattr(train_module, "load_causal_lm", load_causal_lm)
    config = make_config(tmp_path, tiny_llama, pairs_file, train={"loggers": ["jsonl", "tensorboard"]})
    with pytest.raises(UserError, match=r"'tensorboard' is chosen but the tensorboard package is not "
                                        r"installed; run `pip install 'preftune\[tensorboard\]'`"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("terminal, jupyter, ci, bar", [
    (True, False, None, True), (True, False, "true", False),  # a CI job's log cannot redraw
    (False, False, None, False), (False, True, None, True),
])
def test_the_live_bar_is_for_terminals_and_notebooks_outside_ci(monkeypatch, terminal, jupyter, ci, bar):
    import types

    import preftune.progress as progress_module

    monkeypatch.setattr(progress_module, "Console",
                        lambda: types.SimpleNamespace(is_interactive=terminal, is_jupyter=jupyter))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert progress_module.interactive_terminal() is bar
    assert progress_module.TrainProgress(5, enabled=False).interactive is bar


def test_a_resume_that_extends_the_run_trains_its_next_step_at_the_new_schedules_rate(
        tmp_path, tiny_llama, pairs_file, monkeypatch, one_torch_thread):
    # 4 steps of linear decay, then resumed to 8: the checkpoint held the old schedule's rate for
    # step 5 (lr x 0, its end), so the extension's first step did not train, though the run
    # said the remaining rates follow the new length.
    lr = 1e-3
    short = make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 4, "save_every": 2},
                        optim={"lr": lr, "scheduler": "linear"})
    train(short)
    used = _record_used_rates(monkeypatch)
    longer = short.model_copy(update={"train": short.train.model_copy(update={"max_steps": 8})})
    train(longer, resume=True)
    assert used == pytest.approx([lr * (1 - i / 8) for i in range(4, 8)], rel=1e-9)
    logged = [m["learning_rate"] for m in read_metrics(tmp_path / "run", "learning_rate")]
    assert logged[4:] == pytest.approx(used, rel=1e-9)


def test_the_time_left_follows_the_recent_pace_not_a_slow_first_step(monkeypatch, capsys):
    # A first step of 100 s (compilation), then 1 s per step: at step 61 the pace is 1 s/step,
    # so 39 steps take about 39 s, not (160 s / 61 steps) x 39 = 102 s.
    import preftune.progress as progress_module

    times = iter([0.0, 100.0] + [100.0 + n for n in range(1, 100)])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(times))
    with progress_module.TrainProgress(100, interactive=False, every_s=30) as bar:
        for step in range(1, 62):
            bar.update(step, {"loss": 0.5, "rewards/accuracies": 0.5})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == \
        ["train: step 1/100 (1%)", "train: step 31/100 (31%)", "train: step 61/100 (61%)"]
    assert lines[-1].endswith("0:02:40 elapsed, about 0:00:39 left")


def test_num_tokens_is_trls_running_total_and_a_resume_continues_it(tmp_path, tiny_llama, pairs_file,
                                                                     one_torch_thread):
    # TRL logs num_tokens, the tokens trained on so far (W&B users plot against it); preftune
    # logged only tokens_per_second, so TRL's panel had no preftune line.
    from preftune.data.io import load_pairs
    from preftune.data.tokenize import tokenize_pairs
    from preftune.modeling import load_tokenizer

    config = make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 4, "save_every": 2})
    train(config)  # 16 pairs, 4 a step: one epoch, each pair once
    whole = [m["num_tokens"] for m in read_metrics(tmp_path / "run")]
    pairs, _ = tokenize_pairs(load_pairs(str(pairs_file)).pairs, load_tokenizer(str(tiny_llama)), config.data)
    assert whole[-1] == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert whole == sorted(set(whole))
    train(config, resume=str(tmp_path / "run" / "checkpoints" / "step-000002"))
    assert [m["num_tokens"] for m in read_metrics(tmp_path / "run")] == whole
