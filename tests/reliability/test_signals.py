"""SIGTERM or SIGINT during `preftune train`: the current step finishes, a checkpoint is written,
the process exits 0 and prints the command that resumes it; that command's config, resumed,
ends with the weights of a run never stopped."""

from __future__ import annotations

import json
import signal

import pytest
from reliability_helpers import (
    assert_bit_identical,
    finish,
    run_config,
    start_training,
    train_in_process,
    wait_until,
    weights,
    write_config,
)

from preftune.checkpoint import is_complete, list_checkpoints
from preftune.config import load_config


def logged_steps(output_dir) -> int:
    try:
        text = (output_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return sum('"grad_norm"' in line for line in text.splitlines())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_exits_0_and_names_the_resume_command(tmp_path, dropout_model, pairs_path,
                                                                   uninterrupted, signum):
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml",
                          run_config(dropout_model, pairs_path, output_dir, train={"save_every": None}))
    log = tmp_path / "run.log"
    proc = start_training(config, log=log)
    try:
        assert wait_until(lambda: logged_steps(output_dir) >= 2, proc), log.read_text()[-2000:]
        proc.send_signal(signum)
    finally:
        code = finish(proc)
    out = log.read_text()
    assert code == 0, out[-3000:]
    [saved] = list_checkpoints(output_dir)
    assert is_complete(saved)
    step = int(saved.name.split("-")[1])
    assert 2 <= step < 12 and logged_steps(output_dir) == step  # stopped after the step it was in
    command = f"preftune train {output_dir / 'config.yaml'} --resume"
    assert command in out, out[-2000:]  # on one line, to copy whole
    assert not (output_dir / "final").exists()
    assert json.loads((saved / "manifest.json").read_text())["step"] == step

    resumed = load_config(output_dir / "config.yaml")  # what the printed command reads
    final = train_in_process(resumed.model_dump(mode="json"), resume=True)
    assert_bit_identical(weights(final), uninterrupted)
