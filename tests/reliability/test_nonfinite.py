"""A non-finite loss or gradient: the step is skipped and logged with the offending pairs; past
`train.max_bad_steps` the run stops with a clear error and a checkpoint, and no checkpoint
ever holds non-finite weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from reliability_helpers import PAIRS, checkpoint_dir, run_config, weights, write_pairs

import preftune.train as train_module
from preftune.checkpoint import is_complete, list_checkpoints
from preftune.config import validate_config
from preftune.errors import UserError
from preftune.train import train

POISONED = 5  # data position of the row whose log-probs turn NaN; written without a pair_id


@pytest.fixture
def poisoned_data(tmp_path, monkeypatch):
    """Pairs where row 6 of the file (position 5) makes its step's loss and gradients NaN."""
    rows = [dict(r) for r in PAIRS]
    del rows[POISONED]["pair_id"]  # so the log must name it by file and line
    path = write_pairs(tmp_path / "pairs.jsonl", rows)
    real_pair_logps = train_module.pair_logps

    def pair_logps(policy_logps, reference_logps, batch):
        logps = real_pair_logps(policy_logps, reference_logps, batch)
        if POISONED in batch.indices:  # NaN through the graph: the loss and every gradient
            logps = dataclasses.replace(logps, policy_chosen_logps=logps.policy_chosen_logps * float("nan"))
        return logps

    monkeypatch.setattr(train_module, "pair_logps", pair_logps)
    return path


def squash(text: str) -> str:
    """Console text without whitespace: rich wraps long lines wherever it likes."""
    return "".join(text.split())


def metric_lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "grad_norm" in m}


def test_a_non_finite_step_is_skipped_and_logged_with_its_pairs(tmp_path, dropout_model, poisoned_data, capsys):
    run = tmp_path / "run"
    train(validate_config(run_config(dropout_model, poisoned_data, run)))
    out = squash(capsys.readouterr().out)
    metrics = metric_lines(run)
    bad = sorted(step for step, m in metrics.items() if m["loss"] is None)
    assert len(bad) == 2  # the poisoned row comes once per epoch, two epochs
    for step in bad:
        assert squash(f"step {step}: non-finite loss or gradient") in out
        assert metrics[step]["grad_norm"] is None
        # Skipped means untouched: the weights after the bad step are those before it.
        before = weights(checkpoint_dir(run, step - 1) if step > 1 else dropout_model)
        after = weights(checkpoint_dir(run, step))
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert out.count(squash(f"{poisoned_data}, line {POISONED + 1}")) == 2
    assert all(m["loss"] is not None for step, m in metrics.items() if step not in bad)
    assert (run / "final" / "model.safetensors").exists()


def test_past_max_bad_steps_the_run_stops_with_a_checkpoint(tmp_path, dropout_model, poisoned_data):
    run = tmp_path / "run"
    raw = run_config(dropout_model, poisoned_data, run, train={"max_bad_steps": 0, "save_every": None})
    with pytest.raises(UserError, match=r"1 steps had a non-finite loss or gradient \(train.max_bad_steps is "
                                        r"0\); stopped with checkpoint .*step-0000\d\d") as caught:
        train(validate_config(raw))
    [saved] = list_checkpoints(run)
    assert str(saved) in str(caught.value) and is_complete(saved)
    assert not (run / "final").exists()
    # The checkpoint is taken before the bad step, so a resume with the data fixed retries it.
    assert json.loads((saved / "manifest.json").read_text())["step"] == int(saved.name.split("-")[1])
    # The step that stopped the run is logged like every other, so the user sees it.
    metrics = metric_lines(run)
    stopped_at = int(saved.name.split("-")[1]) + 1
    assert sorted(metrics)[-1:] == [stopped_at] and metrics[stopped_at]["loss"] is None


def test_a_run_stopped_by_max_bad_steps_resumes_counting_the_retried_step_once(tmp_path, dropout_model,
                                                                                poisoned_data):
    # The checkpoint is from before the bad step, yet it counted that step: resumed with one more
    # step allowed, the retried step was counted twice and the run stopped again at once.
    run = tmp_path / "run"
    raw = run_config(dropout_model, poisoned_data, run, train={"max_bad_steps": 0, "save_every": None})
    with pytest.raises(UserError, match=r"^1 steps"):
        train(validate_config(raw))
    [first_stop] = list_checkpoints(run)
    raw["train"]["max_bad_steps"] = 1
    with pytest.raises(UserError, match=r"^2 steps had a non-finite loss or gradient \(train.max_bad_steps is 1\)"):
        train(validate_config(raw), resume=True)
    # Skipped once more, then stopped at the poisoned row's next epoch, not again at once.
    bad = sorted(step for step, m in metric_lines(run).items() if m["loss"] is None)
    first = int(first_stop.name.split("-")[1]) + 1
    assert len(bad) == 2 and bad[0] == first and bad[1] > first


@pytest.mark.parametrize("save_every", [None, 1])
def test_float16_overflow_from_a_huge_lr_stops_clearly_and_saves_no_poisoned_weights(
        tmp_path, dropout_model, pairs_path, save_every):
    run = tmp_path / "run"
    raw = run_config(dropout_model, pairs_path, run, optim={"lr": 1e4, "warmup_steps": 0},
                     train={"max_bad_steps": 2, "save_every": save_every})
    raw["model"]["dtype"] = "float16"
    with pytest.raises(UserError, match="non-finite") as caught:
        train(validate_config(raw))
    assert "optim.lr" in str(caught.value)
    for folder in list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in weights(folder).values()), folder
    assert not (run / "final").exists()
