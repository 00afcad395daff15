"""State carried across steps is the same on every rank: two DDP processes with TR-DPO's reference
sync and BCO's running reward mean train like one process with the same global batch."""

from __future__ import annotations

import pytest
import yaml
from dist_helpers import (
    assert_runs_match,
    assert_same_rows,
    max_weight_difference,
    metrics,
    preftune_cmd,
    run_command,
    train_in_process,
    write_config,
)

TOLERANCE = 1e-5


def _with_carried_state(path):
    raw = yaml.safe_load(path.read_text())
    raw["model"]["reference_sync"] = {"every": 2, "alpha": 0.6}
    raw["loss"] = {"type": ["sigmoid", "bco_pair"], "weights": [0.8, 0.2], "beta": 0.1}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow  # about a minute: one 2-process launch and one single-process run
def test_ddp_with_reference_sync_and_bco_pair_trains_like_one_process(tiny_llama, tmp_path):
    single = train_in_process(_with_carried_state(
        write_config(tmp_path / "one", tiny_llama, nproc=1, save_every=2)))
    config = _with_carried_state(write_config(tmp_path / "two", tiny_llama, nproc=2, distributed="ddp",
                                              save_every=2))
    result = run_command(preftune_cmd(config, "--nproc", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    two = tmp_path / "two" / "run"
    assert_runs_match(single, two, TOLERANCE)  # losses, eval (which reads the shift), final weights
    assert_same_rows(metrics(single)[0], metrics(two)[0], ["bco/reward_shift"], TOLERANCE)
    shifts = [row["bco/reward_shift"] for row in metrics(two)[0].values()]
    assert shifts[0] == 0 and shifts[-1] != 0
    for step in ("step-000002", "step-000004"):  # the reference each run saved after its syncs
        reference = f"checkpoints/{step}/reference"
        assert max_weight_difference(single / reference, two / reference) <= TOLERANCE
