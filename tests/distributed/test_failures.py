"""A mistake seen by every rank is reported once, in one sentence, not as a wall of tracebacks."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as torch_dist
from dist_helpers import preftune_cmd, run_command, torchrun_cmd, write_config

from preftune.distributed import rank_errors
from preftune.errors import UserError


def _no_worker_traceback(output: str) -> None:
    # torchrun's own frames may show; a frame of preftune's code means a rank dumped its stack.
    assert "preftune/train.py" not in output and "preftune/cli.py" not in output, output


@pytest.mark.slow  # about 25 s: two workers load the model before they reach the data
def test_data_error_on_every_rank_prints_one_sentence(tiny_llama, tmp_path):
    """Launched with --nproc: after the process group is up, both ranks fail on the data."""
    config = write_config(tmp_path, tiny_llama, nproc=2)
    missing = tmp_path / "missing.jsonl"
    result = run_command(preftune_cmd(config, f"data.train={missing}", "--nproc", "2"))
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output.count(f"data file {missing} does not exist") == 1, output
    assert "Traceback" not in output, output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("preftune: rank") and "of 2 failed (exit code 2)" in last, last


def test_config_error_under_torchrun_prints_one_sentence(tiny_llama, tmp_path):
    """Launched by torchrun itself: the ranks fail before any process group exists; torchrun's
    summary then shows the sentence where it would show a traceback."""
    config = write_config(tmp_path, tiny_llama, nproc=2)
    result = run_command(torchrun_cmd(2, config, "train.distributed=fsdpp"))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    printed = [line for line in output.splitlines() if line.startswith("[rank ")]
    assert len(printed) == 1 and "train.distributed" in printed[0], output
    assert "traceback : [rank" in output
    _no_worker_traceback(output)


@pytest.fixture
def fake_torchrun(monkeypatch):
    """The environment of rank 1 of 2, with a store standing in for torchrun's agent store."""
    assert not torch_dist.is_initialized()
    store = torch_dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(store.port), "TORCHELASTIC_RUN_ID": socket.gethostname()}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    return store


def _fail_with(error: Exception) -> int:
    with pytest.raises(SystemExit) as exit_info, rank_errors():
        raise error
    return exit_info.value.code


def test_same_user_error_on_two_ranks_prints_once(fake_torchrun, capsys):
    assert _fail_with(UserError("data file x.jsonl does not exist.")) == 2
    assert capsys.readouterr().err == "[rank 1] error: data file x.jsonl does not exist.\n"
    assert _fail_with(UserError("data file x.jsonl does not exist.")) == 2  # the other rank
    assert capsys.readouterr().err == ""
    assert _fail_with(UserError("another problem.")) == 2  # a different sentence is news
    assert "another problem." in capsys.readouterr().err


def test_errors_that_follow_another_ranks_failure_stay_quiet(fake_torchrun, capsys):
    assert _fail_with(UserError("out of disk space.")) == 2
    capsys.readouterr()
    # The peer of a collective has gone: this rank's error is a consequence, not news.
    assert _fail_with(RuntimeError("Connection closed by peer")) == 1
    assert capsys.readouterr().err == ""


def test_the_first_bug_keeps_its_traceback(fake_torchrun):
    with pytest.raises(ZeroDivisionError), rank_errors():
        1 / 0  # noqa: B018


def test_outside_torchrun_errors_pass_through(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError), rank_errors():
        raise UserError("plain.")
