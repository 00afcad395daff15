"""A run killed with SIGKILL and resumed ends with weights bit-identical to one never stopped.

Each kill is a real `kill -9` of a `preftune train` subprocess (single-threaded CPU,
`train.deterministic`), at a point chosen by watching its checkpoint folder: right after the
N-th checkpoint is complete, in the middle of writing one (its `.tmp` folder exists), or after
a random delay. The run is then resumed with `--resume` until it finishes. The tiny GPT-2 keeps
its dropout on, so this also checks that RNG state, data position, optimizer and schedule are
all restored exactly.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    PAIRS,
    assert_bit_identical,
    checkpoint_dir,
    finish,
    metrics_without_speed,
    resume_to_the_end,
    run_config,
    start_training,
    train_in_process,
    wait_until,
    weights,
    write_config,
    write_pairs,
)

TOTAL_STEPS = 12  # 24 pairs / 4 per step x 2 epochs


def after_checkpoint(output_dir: Path, step: int):
    return lambda: (checkpoint_dir(output_dir, step) / "manifest.json").exists()


def mid_save(output_dir: Path, step: int):
    """True while checkpoint `step` is being written: weights there, manifest not yet."""
    tmp = checkpoint_dir(output_dir, step).with_name(f"step-{step:06d}.tmp")
    return lambda: (tmp / "model.safetensors").exists() and not (tmp / "manifest.json").exists()


def after_delay(output_dir: Path, seconds: float):
    """True `seconds` after this launch wrote its first checkpoint (one not there before)."""
    before = set((output_dir / "checkpoints").glob("step-*"))
    started: list[float] = []

    def condition() -> bool:
        if not started and set((output_dir / "checkpoints").glob("step-*")) - before:
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] >= seconds

    return condition


def kill_when(config_path: Path, condition, log: Path, resume: bool) -> str:
    """Launch training, SIGKILL it once `condition()` holds; says what happened, for the log."""
    proc = start_training(config_path, *(["--resume"] if resume else []), log=log)
    try:
        fired = wait_until(condition, proc)
        if fired:
            proc.send_signal(signal.SIGKILL)
    finally:
        code = finish(proc)
    assert fired or code == 0, f"training failed before the kill point (exit {code}): {log.read_text()[-2000:]}"
    return "killed" if fired else "finished first"


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path, dropout_model, pairs_path,
                                                                  uninterrupted):
    output_dir = tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", run_config(dropout_model, pairs_path, output_dir))
    log = tmp_path / "killed.log"
    outcome = kill_when(config, after_checkpoint(output_dir, 3), log, resume=False)
    assert outcome == "killed"
    assert not (output_dir / "final").exists()
    resume_to_the_end(config, log)
    assert "resumed from" in log.read_text()
    assert_bit_identical(weights(output_dir / "final"), uninterrupted)


@pytest.mark.slow
def test_repeated_sigkills_at_many_points_then_resume_is_bit_identical(tmp_path, dropout_model, pairs_path,
                                                                        uninterrupted):
    output_dir = tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", run_config(dropout_model, pairs_path, output_dir))
    log = tmp_path / "killed.log"
    delay = random.Random(8).uniform(0.05, 0.4)
    kill_points = [  # (what, condition factory called right before its launch)
        ("mid-save of checkpoint 2", lambda: mid_save(output_dir, 2)),
        ("right after checkpoint 4", lambda: after_checkpoint(output_dir, 4)),
        (f"{delay:.2f} s after the launch's first new checkpoint", lambda: after_delay(output_dir, delay)),
        ("mid-save of checkpoint 10", lambda: mid_save(output_dir, 10)),
    ]
    outcomes = []
    for i, (name, make_condition) in enumerate(kill_points):
        outcomes.append((name, kill_when(config, make_condition(), log, resume=i > 0)))
    print("kill points:", outcomes)
    assert [o for _, o in outcomes].count("killed") >= 3, outcomes
    resume_to_the_end(config, log)
    assert_bit_identical(weights(output_dir / "final"), uninterrupted)


@pytest.mark.slow
def test_lora_precompute_accumulation_and_packing_resume_bit_identical(tmp_path, dropout_model):
    """The settings users combine: LoRA adapters (with dropout) over a precomputed reference,
    micro-batches of 2 accumulated to steps of 4, packed rows, three epochs of 25 pairs (one
    sits out each epoch, drawn anew). SIGKILL between checkpoints, then SIGTERM: the final
    adapter, the metrics and the reference cache equal a run never stopped."""
    pytest.importorskip("peft")
    pairs = write_pairs(tmp_path / "pairs.jsonl", [*PAIRS, dict(PAIRS[0], pair_id="p24", prompt="Hi?\nAnswer:")])

    def config(name: str) -> dict:
        raw = run_config(dropout_model, pairs, tmp_path / name,
                         train={"batch_size": 2, "grad_accum": 2, "epochs": 3, "save_every": 4})
        raw["model"].update(reference="precompute", lora={"r": 4, "dropout": 0.1})
        raw["data"]["packing"] = "on"
        return raw

    whole = train_in_process(dict(config("whole"), train={**config("whole")["train"], "save_every": None}))
    output_dir = tmp_path / "killed"
    path = write_config(tmp_path / "killed.yaml", config("killed"))
    log = tmp_path / "killed.log"
    assert kill_when(path, lambda: logged_steps(output_dir) >= 6, log, resume=False) == "killed"
    proc = start_training(path, "--resume", log=log)
    try:
        assert wait_until(lambda: logged_steps(output_dir) >= 11, proc), log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
    finally:
        assert finish(proc) == 0, log.read_text()[-2000:]
    resume_to_the_end(path, log)
    text = log.read_text()
    assert "packing each micro-batch" in text and text.count("log-probs from the cache") == 2
    assert_bit_identical(weights(output_dir / "final"), weights(whole))
    assert metrics_without_speed(output_dir) == metrics_without_speed(tmp_path / "whole")
    caches = [sorted(p.name for p in (d / "reference_logps").iterdir()) for d in (output_dir, tmp_path / "whole")]
    assert caches[0] == caches[1] and len(caches[0]) == 1


def logged_steps(output_dir: Path) -> int:
    try:
        return sum('"grad_norm"' in line for line in (output_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0
