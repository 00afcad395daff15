"""A distributed run stopped by a signal and resumed ends where a run never stopped ends."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from dist_helpers import (
    REPO,
    assert_runs_match,
    metrics,
    preftune_cmd,
    run_command,
    train_in_process,
    worker_env,
    write_config,
)

from preftune.checkpoint import is_complete, latest_good_checkpoint

STEPS = 16


def _wait_for_steps(run, count: int, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be stopped"
        if (run / "metrics.jsonl").exists() and len(metrics(run)[0]) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {count} steps logged in {timeout}s")


def _sigterm_the_launcher(config, run) -> tuple[int, str]:
    """SIGTERM to `preftune train --nproc 2` alone, as a scheduler sends it, after step 2."""
    proc = subprocess.Popen(preftune_cmd(config, "--nproc", "2"), cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_steps(run, 2, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out + err


def test_sigterm_to_the_launcher_exits_0_once_the_workers_have_checkpointed(tiny_llama, tmp_path):
    """The launcher passes the signal on and waits: the workers save and exit 0, so must it.
    It exited 143 (torchrun's 128 + SIGTERM), which a scheduler reads as a failed job."""
    config = write_config(tmp_path, tiny_llama, nproc=2, max_steps=40)
    run = tmp_path / "run"
    code, output = _sigterm_the_launcher(config, run)
    assert code == 0, output
    assert output.count("stopped by signal") == 1, output
    stopped_at = latest_good_checkpoint(run)
    assert stopped_at is not None and is_complete(stopped_at), output
    assert f"preftune train {run / 'config.yaml'} --resume --nproc 2" in output


@pytest.mark.slow  # about a minute: two 2-process launches and one single-process run
def test_ddp_run_stopped_by_sigterm_resumes_like_a_run_never_stopped(tiny_llama, tmp_path):
    single = train_in_process(write_config(tmp_path / "one", tiny_llama, nproc=1, max_steps=STEPS))
    config = write_config(tmp_path / "two", tiny_llama, nproc=2, max_steps=STEPS)
    run = tmp_path / "two" / "run"
    code, output = _sigterm_the_launcher(config, run)
    assert code == 0, output
    stopped_at = latest_good_checkpoint(run)
    assert stopped_at is not None, output
    assert output.count("stopped by signal") == 1, output
    assert int(stopped_at.name.split("-")[1]) < STEPS
    assert not (run / "final").exists()

    result = run_command(preftune_cmd(config, "--resume", "--nproc", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and stopped_at.name in result.stdout  # rich wraps lines
    assert_runs_match(single, run, tol=1e-5)


@pytest.mark.slow  # about 45 s: two 2-process launches
def test_ddp_run_with_dropout_resumes_each_ranks_random_stream(tiny_model_factory, tmp_path):
    """Dropout draws as many random numbers as a rank's own micro-batches hold, so the ranks'
    streams part after the first step. Only rank 0's was saved, and every rank resumed with it:
    the resumed steps' losses and the final weights differed from the run never stopped (step
    3's loss by about 2e-3)."""
    gpt2 = tiny_model_factory("gpt2")  # GPT-2's configs keep dropout at 0.1
    overrides = ("model.disable_dropout=false", "train.deterministic=true")
    config = write_config(tmp_path, gpt2, nproc=2, save_every=2)
    whole = run_command(preftune_cmd(config, "--nproc", "2", *overrides))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    run = tmp_path / "run"
    resumed = run_command(preftune_cmd(config, "--nproc", "2", *overrides, f"train.output_dir={tmp_path / 'resumed'}",
                                       "--resume-from", run / "checkpoints" / "step-000002"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sorted(metrics(tmp_path / "resumed")[0]) == [3, 4]
    assert_runs_match(run, tmp_path / "resumed", tol=1e-6, steps={3, 4})
