"""Under torchrun every rank acts on rank 0's view of train.output_dir: a folder holding a run
is refused once, in one sentence, by all ranks together; --overwrite is done by rank 0 alone
before any rank writes."""

import subprocess
import sys

import pytest
from reliability_helpers import REPO, child_env, run_config, write_config


def launch(config, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "preftune", "train", str(config), "--nproc", "2", *args]
    return subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two torchrun launches of two CPU workers
def test_two_ranks_refuse_a_run_folder_together_and_overwrite_it_once(tmp_path, dropout_model, pairs_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000009").mkdir(parents=True)
    earlier = '{"step": 9, "loss": 1.0}\n'
    (run / "metrics.jsonl").write_text(earlier)
    raw = run_config(dropout_model, pairs_path, run,
                     train={"distributed": "ddp", "batch_size": 2, "max_steps": 1, "save_every": None})
    config = write_config(tmp_path / "ddp.yaml", raw)

    refused = launch(config)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output
    assert output.count("already holds a run") == 1 and "Traceback" not in output, output
    assert (run / "metrics.jsonl").read_text() == earlier

    result = launch(config, "--overwrite")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("deleted the earlier run's") == 1, output
    assert not (run / "checkpoints").exists()  # this run saves no checkpoint of its own
    assert [line.split(",")[0] for line in (run / "metrics.jsonl").read_text().splitlines()] == ['{"step": 1']
    assert (run / "final").is_dir()
