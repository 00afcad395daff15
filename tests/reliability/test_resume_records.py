"""What a resumed run records: each step once in metrics.jsonl and TensorBoard after a SIGKILL
between checkpoints, with the redone steps' numbers equal to the first attempt's; and a resume
whose config changes what the run computes (optimizer, loss, data order) is refused in one
sentence, not half-applied under a config.yaml that describes neither run."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from reliability_helpers import (
    PAIRS,
    assert_bit_identical,
    checkpoint_dir,
    finish,
    run_config,
    start_training,
    train_in_process,
    wait_until,
    weights,
    write_config,
    write_pairs,
)

from preftune.errors import UserError
from preftune.loggers import MetricsLogger


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_steps(output_dir) -> list[int]:
    return [r["step"] for r in records(output_dir) if "loss" in r]


def test_a_sigkill_between_checkpoints_leaves_each_step_once_in_the_records(
        tmp_path, dropout_model, pairs_path, uninterrupted):
    """Checkpoints every 4 steps, an eval every 2, killed after step 7: steps 5-7 and the eval
    at 6 are logged twice over the two launches, yet must be in metrics.jsonl (and TensorBoard)
    once, with the values the first attempt logged; evaluating does not change the weights."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "run"
    raw = run_config(dropout_model, pairs_path, output_dir,
                     train={"save_every": 4, "eval_every": 2, "loggers": ["jsonl", "tensorboard"]})
    raw["data"]["eval"] = str(write_pairs(tmp_path / "eval.jsonl", PAIRS[:4]))
    config = write_config(tmp_path / "run.yaml", raw)
    log = tmp_path / "run.log"
    proc = start_training(config, log=log)
    try:
        fired = wait_until(lambda: (output_dir / "metrics.jsonl").exists()
                           and len(train_steps(output_dir)) >= 7, proc)
        if fired:
            proc.send_signal(signal.SIGKILL)
    finally:
        finish(proc)
    assert fired, log.read_text()[-2000:]
    assert not checkpoint_dir(output_dir, 8).exists()  # killed between checkpoints 4 and 8
    first_attempt = {(r["step"], "eval/loss" in r): r for r in records(output_dir)}
    assert {5, 6, 7} <= {step for step, _ in first_attempt}

    proc = start_training(config, "--resume", log=log)
    assert finish(proc) == 0, log.read_text()[-3000:]
    assert train_steps(output_dir) == list(range(1, 13))
    assert [r["step"] for r in records(output_dir) if "eval/loss" in r] == [2, 4, 6, 8, 10, 12]
    for r in records(output_dir):  # the redone steps give the numbers logged the first time
        before = first_attempt.get((r["step"], "eval/loss" in r))
        if before is not None:
            assert {k: v for k, v in r.items() if k != "tokens_per_second"} == \
                {k: v for k, v in before.items() if k != "tokens_per_second"}
    events = EventAccumulator(str(output_dir / "tensorboard" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4, 6, 8, 10, 12]
    assert_bit_identical(weights(output_dir / "final"), uninterrupted)


def test_a_resumed_logger_drops_later_steps_and_a_line_cut_by_a_kill(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3, 4)] + [json.dumps({"note": "x"})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    with MetricsLogger(tmp_path, start_step=3) as logger:
        logger.log({"loss": 0.25}, step=4)
    assert records(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5},
                                 {"step": 3, "loss": 0.5}, {"note": "x"}, {"step": 4, "loss": 0.25}]


def test_a_run_resumed_at_its_last_step_logs_its_final_eval_once(tmp_path, dropout_model, pairs_path):
    """Killed while writing final/, after the last checkpoint and the final eval: the resume
    evaluates again, and that eval replaces the first attempt's line instead of joining it."""
    raw = run_config(dropout_model, pairs_path, tmp_path / "run", train={"save_every": 2, "max_steps": 2})
    raw["data"]["eval"] = str(write_pairs(tmp_path / "eval.jsonl", PAIRS[:4]))
    train_in_process(raw)
    shutil.rmtree(tmp_path / "run" / "final")  # as a kill during its write leaves it
    train_in_process(raw, resume=True)
    assert [(r["step"], "eval/loss" in r) for r in records(tmp_path / "run")] == \
        [(1, False), (2, False), (2, True)]


# ------------------------------------------------------------------------------ changed config


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, dropout_model, pairs_path):
    """A run stopped after 2 of its 12 steps (checkpoint step-000002) and its config."""
    output_dir = tmp_path_factory.mktemp("changed") / "run"
    raw = run_config(dropout_model, pairs_path, output_dir, train={"save_every": 2, "max_steps": 2})
    train_in_process(raw)
    return output_dir, raw


@pytest.mark.parametrize("section, values, refused", [
    ("optim", {"lr": 0.5}, "optim.lr 0.001 (now 0.5)"),  # the saved optimizer state would win
    ("optim", {"weight_decay": 0.1}, "optim.weight_decay"),
    ("loss", {"beta": 0.2}, "loss.beta"),
    ("train", {"seed": 1}, "train.seed"),  # another data order
    ("data", {"group_by_length": False}, "data.group_by_length"),
    ("model", {"lora": {"r": 4}}, "model.lora None (now {"),
    ("train", {"max_steps": 3, "eval_every": 1, "save_every": 3}, None),  # extend; other saving
    ("train", {"max_steps": 3, "batch_size": 2, "grad_accum": 2}, None),  # the same global batch
    ("model", {"reference": "precompute"}, None),  # the same reference log-probs
], ids=["lr", "weight_decay", "beta", "seed", "group_by_length", "lora", "max_steps", "micro-batches",
        "precompute"])
def test_a_resume_that_changes_what_the_run_computes_is_refused(tmp_path, two_step_run, section, values,
                                                                refused, capsys):
    stopped, raw = two_step_run
    output_dir = tmp_path / "run"
    shutil.copytree(stopped, output_dir)
    changed = json.loads(json.dumps(raw))
    changed["train"]["output_dir"] = str(output_dir)
    changed[section].update(values)
    if refused is None:
        train_in_process(changed, resume=True)
        assert train_steps(output_dir) == list(range(1, changed["train"]["max_steps"] + 1))
        # A changed length is said: a schedule other than constant now ends elsewhere.
        said = " ".join(capsys.readouterr().out.split())
        assert ("the run is now 3 steps long, not 2" in said) == ("max_steps" in values)
        return
    config_before = (output_dir / "config.yaml").read_text()
    with pytest.raises(UserError, match="was written with") as caught:
        train_in_process(changed, resume=True)
    message = str(caught.value)
    assert refused in message and "set it back" in message and message.count(". ") == 0
    assert (output_dir / "config.yaml").read_text() == config_before  # still the run's settings


@pytest.mark.parametrize("edit, refused", [
    (lambda rows: rows, None),  # the same pairs in a file elsewhere: data may move
    (lambda rows: rows[:-1], "other training data (24 pairs, now 23"),
    (lambda rows: [dict(rows[0], chosen=rows[0]["chosen"] + " more"), *rows[1:]], "the same number with"),
], ids=["moved", "fewer", "edited"])
def test_a_resume_on_other_training_data_is_refused(tmp_path, two_step_run, edit, refused):
    stopped, raw = two_step_run
    output_dir = tmp_path / "run"
    shutil.copytree(stopped, output_dir)
    changed = json.loads(json.dumps(raw))
    changed["train"]["output_dir"] = str(output_dir)
    changed["data"]["train"] = str(write_pairs(tmp_path / "moved.jsonl", edit(list(PAIRS))))
    if refused is None:
        train_in_process(changed, resume=True)
        assert train_steps(output_dir) == [1, 2]
        return
    with pytest.raises(UserError, match="restore the data the run started with") as caught:
        train_in_process(changed, resume=True)
    assert refused in str(caught.value)


def test_a_key_the_checkpoint_does_not_know_is_no_change(tmp_path, two_step_run):
    """A checkpoint written before a version that added a loss or optim key still resumes."""
    import torch

    from preftune.checkpoint import STATE_FILE, load_training_state, write_manifest

    stopped, raw = two_step_run
    output_dir = tmp_path / "run"
    shutil.copytree(stopped, output_dir)
    folder = checkpoint_dir(output_dir, 2)
    saved = load_training_state(folder)
    del saved["config"]["loss"]["rdpo_alpha"], saved["config"]["optim"]["max_grad_norm"]
    torch.save(saved, folder / STATE_FILE)
    (folder / "manifest.json").unlink()
    write_manifest(folder, 2)
    train_in_process(dict(raw, train={**raw["train"], "output_dir": str(output_dir), "max_steps": 3}),
                     resume=True)
    assert train_steps(output_dir) == [1, 2, 3]


@pytest.mark.parametrize("section, key, inert, acting", [
    ("data", "max_prompt_length", {"max_length": None, "max_prompt_length": 128},
     {"max_length": 512, "max_prompt_length": 128}),
    ("optim", "betas", {"name": "rmsprop", "betas": [0.8, 0.99]}, {"name": "adamw", "betas": [0.8, 0.99]}),
], ids=["max_prompt_length", "betas"])
def test_a_run_started_before_a_refusal_resumes_once_the_inert_key_is_dropped(tmp_path, section, key, inert,
                                                                               acting):
    """Such a run's config.yaml is now refused with 'remove KEY'; removed, the resume goes on,
    since the key did nothing. Dropped where it did act, it is still refused."""
    from preftune.config import validate_config
    from preftune.dist_checkpoint import _check_fixed_keys

    def saved_and_resumed(values):
        base = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}}
        base.setdefault(section, {}).update({k: v for k, v in values.items() if k != key})
        resumed = validate_config(base)
        saved = resumed.model_dump(mode="json")  # as its checkpoint holds it: validated back then
        saved[section][key] = values[key]
        return {"config": saved}, resumed

    saved, resumed = saved_and_resumed(inert)
    _check_fixed_keys(saved, tmp_path, resumed)  # the key did nothing: dropping it is no change
    saved, resumed = saved_and_resumed(acting)
    with pytest.raises(UserError, match=f"{section}.{key}"):
        _check_fixed_keys(saved, tmp_path, resumed)
